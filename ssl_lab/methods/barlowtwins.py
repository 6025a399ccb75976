"""Barlow Twins (Zbontar et al., 2021): the cross-correlation of the two views' embeddings, each
standardised over the batch, is driven to the identity: invariance on the diagonal, redundancy
reduction off it (facebookresearch/barlowtwins, main.py; solo-learn's CIFAR recipe for scale_loss)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import PositiveFloat, PositiveInt
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import mlp, off_diagonal_squares


def barlow_twins_loss(
    z0: torch.Tensor, z1: torch.Tensor, lambda_param: float, scale_loss: float = 1.0, gather: bool = False
) -> torch.Tensor:
    """scale_loss x (sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2), C = z0n^T z1n / N, each z standardised
    per feature over the batch (batch norm without affine, eps 1e-5: the official code's and lightly's).

    With `gather`, the batch is the global one: the embeddings are gathered with their gradients before
    the standardisation, as the official code's SyncBatchNorm and all-reduced C make it. Every process
    then computes the same loss, and DDP's mean of their gradients is the 1-process gradient (an
    all-reduce of C without the gathered gradients is off by the number of processes: lightly #1977)."""
    with torch.autocast(z0.device.type, enabled=False):  # fp32: C's entries are sums over the batch
        z0, z1 = z0.float(), z1.float()
        if gather:
            z0, z1 = distributed.gather_with_grad(z0), distributed.gather_with_grad(z1)
        z0n = F.batch_norm(z0, None, None, training=True, eps=1e-5)
        z1n = F.batch_norm(z1, None, None, training=True, eps=1e-5)
        c = z0n.T @ z1n / z0.shape[0]
        on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
        return scale_loss * (on_diagonal + lambda_param * off_diagonal_squares(c))


class BarlowTwins(Method):
    name = "barlowtwins"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: PositiveInt = 8192,
        proj_output_dim: PositiveInt = 8192,
        lambda_param: PositiveFloat = 0.0051,
        scale_loss: PositiveFloat = 1.0,
        proj_layers: PositiveInt = 3,
        proj_last_bias: bool = False,
        gather_distributed: bool = True,
        concat_views: bool = True,
        name: str = "barlowtwins",
    ) -> None:
        """The paper's defaults (sec. 4 and the official main.py): projector 8192-8192-8192 (Linear-BN-ReLU
        twice, then a Linear without bias, as the official code; lightly's head has one), lambda 0.0051, no loss scale (solo-learn's CIFAR recipe:
        2048-wide, scale_loss 0.1; its loss is scale_loss x lightly's BarlowTwinsLoss)."""
        super().__init__(backbone, concat_views)
        self.lambda_param, self.scale_loss, self.gather = lambda_param, scale_loss, gather_distributed
        # lightly's CIFAR-10 benchmark: 2 layers, the last Linear with a bias (proj_last_bias)
        dims = [self.num_features, *[proj_hidden_dim] * (proj_layers - 1), proj_output_dim]
        self.projector = mlp(dims, last_bias=proj_last_bias)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z0, z1 = self.embed_views(views, self.projector)
        return {"loss": barlow_twins_loss(z0, z1, self.lambda_param, self.scale_loss, self.gather)}
