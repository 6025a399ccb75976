"""NNCLR (Dwibedi et al., 2021): the positive of a view is the nearest neighbour of its projection
in a FIFO support set of past projections; a predictor on the other view must match it."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import PositiveFloat, PositiveInt
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import Queue, mlp, nt_xent


def nn_xent(nn0: torch.Tensor, p1: torch.Tensor, temperature: float, gather: bool = False) -> torch.Tensor:
    """The paper's loss (its eq. 1, as solo-learn computes it): each nearest neighbour NN(z0_i) against
    the other view's predictions of the whole batch, an N-way cross entropy whose target is p1_i.

    With `gather`, the predictions come from every process, with their gradients, and each local
    row's target sits at its rank's offset; the neighbours carry no gradient and stay local."""
    # fp32 with autocast off, as in nt_xent: bf16 logits at T=0.1 are resolved to ~0.05.
    with torch.autocast(p1.device.type, enabled=False):
        nn0, p1 = F.normalize(nn0.float(), dim=1), F.normalize(p1.float(), dim=1)
        n = p1.shape[0]
        all_p1 = distributed.gather_with_grad(p1) if gather else p1
        rows = torch.arange(n, device=p1.device) + (distributed.rank() * n if gather else 0)
        return F.cross_entropy(nn0 @ all_p1.T / temperature, rows)


class SupportSet(Queue):
    """NNCLR's support set: a FIFO queue of embeddings (parts.Queue) searched for nearest neighbours."""

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The support-set entry of highest cosine similarity to each row of z (no gradient)."""
        with torch.autocast(z.device.type, enabled=False):  # fp32: bf16 would blur the nearest
            sim = F.normalize(z.float(), dim=1) @ F.normalize(self.queue, dim=1).T
        return self.queue[sim.argmax(dim=1)]


class NNCLR(Method):
    name = "nnclr"

    def __init__(
        self,
        backbone: nn.Module,
        temperature: PositiveFloat = 0.1,
        queue_size: PositiveInt = 65536,
        proj_hidden_dim: PositiveInt = 2048,
        proj_output_dim: PositiveInt = 256,
        pred_hidden_dim: PositiveInt = 4096,
        proj_layers: PositiveInt = 3,
        gather_distributed: bool = True,
        loss: Literal["paper", "lightly"] = "paper",
        concat_views: bool = True,
        name: str = "nnclr",
    ) -> None:
        super().__init__(backbone, concat_views)
        self.temperature, self.gather = temperature, gather_distributed
        # paper: N-way, the other view's predictions are the candidates (the paper, solo-learn);
        # lightly: NT-Xent over the 2N neighbours and predictions (lightly's NNCLR example).
        self.criterion = nn_xent if loss == "paper" else nt_xent
        # The paper's projector: 3 layers, BN after each (lightly's CIFAR-10 benchmark: 2)
        dims = [self.num_features, *[proj_hidden_dim] * (proj_layers - 1), proj_output_dim]
        self.projector = mlp(dims, last_bn=True)
        self.predictor = mlp([proj_output_dim, pred_hidden_dim, proj_output_dim])
        self.support = SupportSet(queue_size, proj_output_dim)

    def check_batch(self, batch_size: int) -> None:
        self.support.check_batch(batch_size)  # each step adds the whole batch to the support set

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z0, z1 = self.embed_views(views, self.projector)
        p0, p1 = (p.float() for p in self.per_view(self.predictor, [z0, z1]))
        z0, z1 = z0.float(), z1.float()
        # Both neighbours come from the support set as it was before this batch is added.
        nn0, nn1 = self.support.nearest(z0), self.support.nearest(z1)
        t, g = self.temperature, self.gather
        loss = 0.5 * (self.criterion(nn0, p1, t, g) + self.criterion(nn1, p0, t, g))
        # After both look-ups, as in lightly's NNCLR example; every process adds every process's
        # embeddings, so all see the same support set whatever their number.
        self.support.push(distributed.gather(z1))
        return {"loss": loss}
