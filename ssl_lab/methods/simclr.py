"""SimCLR (Chen et al., 2020): a projection head and the NT-Xent loss over the 2N views."""

from __future__ import annotations

import torch
import torch.nn as nn

from ssl_lab.config import PositiveFloat, PositiveInt
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import mlp, nt_xent


class SimCLR(Method):
    name = "simclr"

    def __init__(
        self,
        backbone: nn.Module,
        temperature: PositiveFloat = 0.5,
        proj_hidden_dim: PositiveInt | None = None,
        proj_output_dim: PositiveInt = 128,
        proj_layers: PositiveInt = 2,
        proj_last_bn: bool | None = None,
        gather_distributed: bool = True,
        concat_views: bool = True,
        name: str = "simclr",
    ) -> None:
        super().__init__(backbone, concat_views)
        self.temperature, self.gather = temperature, gather_distributed
        hidden = proj_hidden_dim or self.num_features
        # 1: one Linear. 2: SimCLR's head, Linear-BN-ReLU-Linear. 3 (or more): SimCLRv2's, deeper, with
        # BN after every Linear, the last included. SimCLRv2's last BN has no shift; this one keeps its
        # learnable bias: a frozen one would not survive the conversion to SyncBatchNorm.
        # `proj_last_bn` overrides whether the last Linear has BN (lightly's SimCLRProjectionHead has
        # it with 2 layers too); null: only from 3 layers on.
        dims = [self.num_features, *[hidden] * (proj_layers - 1), proj_output_dim]
        self.projector = mlp(dims, last_bn=proj_layers > 2 if proj_last_bn is None else proj_last_bn)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z0, z1 = self.embed_views(views, self.projector)
        return {"loss": nt_xent(z0.float(), z1.float(), self.temperature, self.gather)}
