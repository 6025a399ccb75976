"""SimSiam (Chen & He, 2021): a predictor on one view regresses the other view's projection, which
is held constant by a stop-gradient; no negatives, no momentum teacher."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ssl_lab.config import PositiveInt
from ssl_lab.health import feature_std
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import mlp, negative_cosine


class SimSiam(Method):
    name = "simsiam"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: PositiveInt = 2048,
        proj_output_dim: PositiveInt = 2048,
        pred_hidden_dim: PositiveInt = 512,
        proj_layers: PositiveInt = 3,
        proj_last_affine: bool = False,
        fixed_predictor_lr: bool = True,
        predictor: bool = True,
        concat_views: bool = True,
        name: str = "simsiam",
    ) -> None:
        super().__init__(backbone, concat_views)
        self.fixed_predictor_lr = fixed_predictor_lr
        # The paper's projector (sec. 3, baseline settings): 3 layers, BN after each, the output's
        # without its learnable scale and shift (the official code's BatchNorm1d(dim, affine=False)).
        # lightly's CIFAR-10 benchmark: 2 layers (the paper's CIFAR projector, sec. 4.2), the last BN
        # with its scale and shift (proj_last_affine).
        dims = [self.num_features, *[proj_hidden_dim] * (proj_layers - 1), proj_output_dim]
        self.projector = mlp(dims, last_bn=True, last_affine=proj_last_affine)
        # The predictor: a bottleneck (2048 -> 512 -> 2048), BN on its hidden layer only. Without it
        # (the paper's table 1 ablation) SimSiam collapses: docs/health.md shows what that looks like.
        self.predictor = (
            mlp([proj_output_dim, pred_hidden_dim, proj_output_dim]) if predictor else nn.Identity()
        )

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z0, z1 = self.embed_views(views, self.projector)
        p0, p1 = self.per_view(self.predictor, [z0, z1])
        # The paper's eq. 4 (and algorithm 1): the mean of the two terms, z stop-gradiented in both.
        loss = 0.5 * (negative_cosine(p0, z1) + negative_cosine(p1, z0))
        with torch.no_grad():  # the paper's fig. 2 collapse check: ~0 collapsed, ~1/sqrt(dim) healthy
            z_std = sum(feature_std(z) for z in (z0, z1)) / 2
        return {"loss": loss, "z_std": z_std}

    def param_groups(self) -> list[dict[str, Any]]:
        """The predictor in a group of its own whose lr the schedule leaves at its initial value
        (the paper's sec. 4.2, `--fix-pred-lr` in its code: facebookresearch/simsiam #11)."""
        predictor = {id(p) for p in self.predictor.parameters()}
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"name": "encoder", "params": [(n, p) for n, p in trainable if id(p) not in predictor]},
            {
                "name": "predictor",
                "params": [(n, p) for n, p in trainable if id(p) in predictor],
                "fixed_lr": self.fixed_predictor_lr,
            },
        ]
        return [group for group in groups if group["params"]]  # no predictor: one group
