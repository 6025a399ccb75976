"""SimCLR (Chen et al., 2020): a projection head and the NT-Xent loss over the 2N views."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import PositiveFloat, PositiveInt
from ssl_lab.methods.base import Method, mlp


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float, gather: bool = False) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy. Row i of z0 and row i of z1 are positives;
    every other of the 2N embeddings is a negative (the same loss as lightly's NTXentLoss).

    With `gather`, the negatives come from every process: embeddings are gathered with their
    gradients, and each local row's positive sits at its rank's offset in the gathered batch."""
    # In fp32 with autocast off: under bf16 the logits at T=0.1 would be resolved to ~0.05.
    with torch.autocast(z0.device.type, enabled=False):
        z0, z1 = F.normalize(z0.float(), dim=1), F.normalize(z1.float(), dim=1)
        n = z0.shape[0]
        all0, all1 = (
            (distributed.gather_with_grad(z0), distributed.gather_with_grad(z1)) if gather else (z0, z1)
        )
        total = all0.shape[0]
        rows = torch.arange(n, device=z0.device) + (distributed.rank() * n if gather else 0)
        logits = torch.cat([z0, z1]) @ torch.cat([all0, all1]).T / temperature  # [2n, 2N]
        own = torch.cat([rows, rows + total])  # a view is not its own negative
        logits[torch.arange(2 * n, device=z0.device), own] = float("-inf")
        return F.cross_entropy(logits, torch.cat([rows + total, rows]))


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
