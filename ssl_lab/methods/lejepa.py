"""LeJEPA (Balestriero & LeCun, 2025): every view's projection pulled towards the mean projection of the
global views of its image (the prediction term), and SIGReg, which pushes the projections of each view
towards an isotropic Gaussian; no teacher, no stop-gradient, one trade-off weight. arXiv 2511.08544;
rbalestr-lab/lejepa MINIMAL.md (the paper's reference code); lightly's LeJEPALoss and SIGReg."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ssl_lab import distributed
from ssl_lab.config import NonNegativeInt, PositiveFloat, PositiveInt, Probability
from ssl_lab.errors import UserError
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import MultiCrop, mlp


def slicing_directions(noise: torch.Tensor) -> torch.Tensor:
    """Random unit directions [D, M] (each column a direction, uniform on the sphere) from uniform
    noise [2, D, M] by Box-Muller: Gaussian columns, normalised. The official code draws
    torch.randn(D, M) each step; here the noise comes from the run's stream for the whole step
    (`draw.shared`), so every process slices along the same directions and a resumed run continues."""
    radius = torch.sqrt(-2.0 * torch.log1p(-noise[0].float()))  # 1 - u in (0, 1]: never log 0
    gaussian = radius * torch.cos(2 * math.pi * noise[1].float())
    return gaussian / gaussian.norm(dim=0, keepdim=True).clamp_min(1e-12)


def sigreg(proj: torch.Tensor, directions: torch.Tensor, knots: int = 17, t_max: float = 3.0) -> torch.Tensor:
    """SIGReg (the paper's eq. 11, MINIMAL.md): the Epps-Pulley statistic of each view's projections
    `proj` [V, N, D] along each direction of `directions` [D, M]: N x the integral over t of
    |empirical characteristic function - exp(-t^2 / 2)|^2 x exp(-t^2 / 2), by the trapezoid rule over
    `knots` points of [0, t_max] doubled (the integrand is even), averaged over views and directions.

    N is the global batch: the characteristic function's sums over the rows of every process are
    gathered with their gradients, so the statistic (and its gradient) is the one of the whole batch
    on 1 or N processes (lightly's gather_distributed=True). fp32, autocast off: cos and sin of
    arguments up to ~3 x 3 sigma in bf16 would lose the small differences the test measures."""
    with torch.autocast(proj.device.type, enabled=False):
        t = torch.linspace(0, t_max, knots, device=proj.device)
        dt = t_max / (knots - 1)
        trapezoid = torch.full_like(t, 2 * dt)
        trapezoid = torch.cat([trapezoid[:1] / 2, trapezoid[1:-1], trapezoid[-1:] / 2])
        gauss = torch.exp(-t.square() / 2)
        x = (proj.float() @ directions.float()).unsqueeze(-1) * t  # [V, N, M, knots]
        sums = torch.stack([x.cos().sum(-3), x.sin().sum(-3)])  # [2, V, M, knots]
        sums = distributed.gather_with_grad(sums.unsqueeze(0)).sum(0)
        n = proj.shape[-2] * distributed.world_size()
        cos_mean, sin_mean = sums[0] / n, sums[1] / n
        error = (cos_mean - gauss).square() + sin_mean.square()
        return ((error @ (trapezoid * gauss)) * n).mean()


def invariance_loss(proj: torch.Tensor, num_global: int) -> torch.Tensor:
    """The prediction term: the mean squared distance of every view's projection (`proj` [V, N, D],
    the global views first) to the mean of its image's `num_global` global ones (lightly's
    lejepa_invariance_loss; MINIMAL.md's all views are global)."""
    with torch.autocast(proj.device.type, enabled=False):
        proj = proj.float()
        return (proj[:num_global].mean(0) - proj).square().mean()


class LeJEPA(Method):
    name = "lejepa"

    def __init__(
        self,
        backbone: nn.Module,
        lambda_param: Probability = 0.05,
        num_slices: PositiveInt = 1024,
        knots: PositiveInt = 17,
        t_max: PositiveFloat = 3.0,
        proj_hidden_dim: PositiveInt = 2048,
        proj_output_dim: PositiveInt = 64,
        proj_layers: PositiveInt = 3,
        num_global_views: PositiveInt = 2,
        num_local_crops: NonNegativeInt = 0,
        local_crop_size: PositiveInt | None = None,
        local_crop_scale: Sequence[float] = (0.05, 0.3),
        global_crop_scale: Sequence[float] | None = None,
        name: str = "lejepa",
    ) -> None:
        """The paper's defaults (lightly's LeJEPALoss, LeJEPAProjectionHead and ImageNet benchmark):
        lambda 0.05 (the SIGReg weight; the prediction term weighs 1 - lambda), 1024 random directions a
        step, 17 knots on [0, 3], a 3-layer projector (Linear-BN-ReLU, 2048 wide) to 64 dimensions;
        views: 2 global (scale 0.3-1) and, with multi-crop, 6 local ones (96 px at 224, scale
        0.05-0.3). MINIMAL.md's Imagenette run: lambda 0.02, 4 global views, 16 dimensions."""
        super().__init__(backbone, concat_views=True)
        if knots < 2:
            raise UserError(
                f"method.knots={knots}: the trapezoid rule needs at least 2 points (the paper: 17)"
            )
        if num_global_views + num_local_crops < 2:
            raise UserError(
                f"method.num_global_views={num_global_views} with no local crops: the prediction term needs "
                "at least two views of each image; set method.num_global_views=2 (the paper)"
            )
        self.lambda_param, self.num_slices, self.knots, self.t_max = lambda_param, num_slices, knots, t_max
        self.crops = MultiCrop(
            backbone, num_local_crops, local_crop_size, local_crop_scale, global_crop_scale,
            ("LeJEPA", "0.05-0.3 and 0.3-1"), num_global=num_global_views,
        )  # fmt: skip
        if proj_layers < 2:
            raise UserError(
                f"method.proj_layers={proj_layers}: LeJEPA's projector has at least 2 layers (the paper: 3)"
            )
        dims = [self.num_features, *[proj_hidden_dim] * (proj_layers - 1), proj_output_dim]
        self.projector = mlp(dims)  # Linear-BN-ReLU, then a Linear (torchvision's MLP in MINIMAL.md)
        self.dim = proj_output_dim

    def check_batch(self, batch_size: int) -> None:
        if batch_size < 2:
            raise UserError(
                f"method=lejepa: SIGReg compares the distribution of a batch's projections with a Gaussian; "
                f"batch_size={batch_size} has one image: raise batch_size"
            )

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """The global views, the local ones, then the noise of this step's slicing directions (the same
        on every process)."""
        return [*self.crops.views(draw), draw.shared(2, self.dim, self.num_slices)]

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        *images, noise = views
        proj = torch.stack(self.embed_views(images, self.projector))  # [V, N, D]
        regulariser = sigreg(proj, slicing_directions(noise), self.knots, self.t_max)
        prediction = invariance_loss(proj, self.crops.num_global)
        loss = self.lambda_param * regulariser + (1 - self.lambda_param) * prediction
        return {"loss": loss, "sigreg_loss": regulariser.detach(), "invariance_loss": prediction.detach()}
