"""BYOL (Grill et al., 2020): a predictor on the online network regresses the projection of the other
view by a momentum teacher (an EMA of the online backbone and projector); no negatives."""

from __future__ import annotations

import torch
import torch.nn as nn

from ssl_lab.config import PositiveFloat, PositiveInt, Probability
from ssl_lab.health import feature_std
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import MomentumTeacher, mlp, negative_cosine


def byol_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, target) averaged over the batch, the target detached: the squared distance of the
    unit vectors (the paper's eq. 2, before symmetrisation), fp32."""
    return 2 + 2 * negative_cosine(p, target)


class BYOL(Method):
    name = "byol"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: PositiveInt = 4096,
        proj_output_dim: PositiveInt = 256,
        pred_hidden_dim: PositiveInt = 4096,
        momentum_base: Probability = 0.996,  # the paper's tau_base (sec. 3.3; solo-learn CIFAR: 0.99)
        momentum_end: Probability = 1.0,
        loss_scale: PositiveFloat = 1.0,
        concat_views: bool = True,
        name: str = "byol",
    ) -> None:
        super().__init__(backbone, concat_views)
        # The loss times `loss_scale`: 0.25 gives lightly's gradient (its 0.5 (-cos + -cos) against the
        # paper's (2 - 2 cos) + (2 - 2 cos): 1/4 of it, with SGD a quarter of the step).
        self.loss_scale = loss_scale
        # The paper's MLPs (sec. 3.3): Linear 4096, BN, ReLU, Linear 256, for both heads.
        self.projector = mlp([self.num_features, proj_hidden_dim, proj_output_dim])
        self.predictor = mlp([proj_output_dim, pred_hidden_dim, proj_output_dim])
        # tau from momentum_base at the first optimizer step to momentum_end at the last, on a cosine
        self.teacher = MomentumTeacher(self.students(), momentum_base, momentum_end)

    def students(self) -> dict[str, nn.Module]:
        """What the teacher copies and follows."""
        return {"backbone": self.backbone, "projector": self.projector}

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z0, z1 = self.embed_views(views, self.projector)
        p0, p1 = self.per_view(self.predictor, [z0, z1])
        with torch.no_grad():  # the targets: no graph through the teacher
            t0, t1 = self.per_view(lambda x: self.teacher.projector(self.teacher.backbone(x)), views)
        # Symmetrised as the paper (sec. 3.1: L + L~), its code and solo-learn do: the sum of the two
        # views' terms, each a batch mean (lightly's example halves it).
        loss = self.loss_scale * (byol_loss(p0, t1) + byol_loss(p1, t0))
        with torch.no_grad():  # collapse shows as ~0; a spread-out projection ~ 1/sqrt(dim)
            z_std = sum(feature_std(z) for z in (z0, z1)) / 2
        return {"loss": loss, "momentum": self.teacher.momentum.clone(), "z_std": z_std}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update(self.students(), step, total_steps)
