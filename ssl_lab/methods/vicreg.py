"""VICReg (Bardes, Ponce & LeCun, 2022): variance-invariance-covariance regularisation. The two views'
embeddings are pulled together (invariance), each feature's standard deviation over the batch is kept
above 1 (variance) and the features are decorrelated (covariance); no negatives, no teacher
(facebookresearch/vicreg, main_vicreg.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import NonNegativeFloat, PositiveFloat, PositiveInt
from ssl_lab.errors import UserError
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import mlp, off_diagonal_squares


def variance_term(z: torch.Tensor, eps: float) -> torch.Tensor:
    """mean over features of relu(1 - sqrt(var + eps)), var over the batch (unbiased, as torch.var)."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """The sum of the squared off-diagonal entries of z's covariance over the batch, over the number of
    features."""
    z = z - z.mean(dim=0)
    cov = z.T @ z / (z.shape[0] - 1)
    return off_diagonal_squares(cov) / z.shape[1]


def vicreg_loss(
    z0: torch.Tensor,
    z1: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
    gather: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The official loss (main_vicreg.py), also lightly's VICRegLoss: the invariance term (mean squared
    error) on this process's pairs, then, with `gather`, the embeddings of every process gathered with
    their gradients before the variance and covariance terms, which are statistics of the global batch
    (lightly PR #979). The variance term is the MEAN of the two branches' (the official code and lightly;
    solo-learn sums them, which doubles its weight). Also returns the three terms, detached."""
    with torch.autocast(z0.device.type, enabled=False):  # fp32: variances and covariances over the batch
        z0, z1 = z0.float(), z1.float()
        invariance = F.mse_loss(z0, z1)
        if gather:
            z0, z1 = distributed.gather_with_grad(z0), distributed.gather_with_grad(z1)
        variance = (variance_term(z0, eps) + variance_term(z1, eps)) / 2
        covariance = covariance_term(z0) + covariance_term(z1)
        loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    terms = {"invariance": invariance, "variance": variance, "covariance": covariance}
    return loss, {k: v.detach() for k, v in terms.items()}


class VICReg(Method):
    name = "vicreg"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: PositiveInt = 8192,
        proj_output_dim: PositiveInt = 8192,
        sim_loss_weight: NonNegativeFloat = 25.0,
        var_loss_weight: NonNegativeFloat = 25.0,
        cov_loss_weight: NonNegativeFloat = 1.0,
        eps: PositiveFloat = 1e-4,
        proj_layers: PositiveInt = 3,
        proj_last_bias: bool = False,
        gather_distributed: bool = True,
        concat_views: bool = True,
        name: str = "vicreg",
    ) -> None:
        """The paper's defaults (sec. 4.1, main_vicreg.py): expander 8192-8192-8192 (Linear-BN-ReLU twice,
        then a Linear without bias, as the official code; lightly's head has one), lambda = mu = 25, nu = 1, eps 1e-4 (solo-learn's CIFAR recipe:
        2048 wide)."""
        if not sim_loss_weight + var_loss_weight + cov_loss_weight > 0:
            raise UserError(
                "method.sim_loss_weight, var_loss_weight and cov_loss_weight are all 0, which leaves no loss "
                "to train: set at least one above 0 (the paper: 25, 25 and 1)"
            )
        super().__init__(backbone, concat_views)
        self.weights = (sim_loss_weight, var_loss_weight, cov_loss_weight)
        self.eps, self.gather = eps, gather_distributed
        # lightly's VICRegProjectionHead in its example: 2 layers, the last Linear with a bias
        dims = [self.num_features, *[proj_hidden_dim] * (proj_layers - 1), proj_output_dim]
        self.projector = mlp(dims, last_bias=proj_last_bias)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z0, z1 = self.embed_views(views, self.projector)
        loss, terms = vicreg_loss(z0, z1, *self.weights, eps=self.eps, gather=self.gather)
        return {"loss": loss, **terms}
