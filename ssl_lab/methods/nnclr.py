"""NNCLR (Dwibedi et al., 2021): the positive of a view is the nearest neighbour of its projection
in a FIFO support set of past projections; a predictor on the other view must match it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import PositiveFloat, PositiveInt
from ssl_lab.methods.base import Method, mlp
from ssl_lab.methods.simclr import nt_xent


class SupportSet(nn.Module):
    """A FIFO queue of embeddings; a buffer, so it travels in checkpoints."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        # Random unit vectors until filled, as in lightly and solo-learn.
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The support-set entry of highest cosine similarity to each row of z (no gradient)."""
        with torch.autocast(z.device.type, enabled=False):  # fp32: bf16 would blur the nearest
            sim = F.normalize(z.float(), dim=1) @ F.normalize(self.queue, dim=1).T
        return self.queue[sim.argmax(dim=1)]

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> None:
        size, n = self.queue.shape[0], z.shape[0]
        idx = (self.ptr + torch.arange(n, device=z.device)) % size
        self.queue[idx] = z.detach().to(self.queue.dtype)
        self.ptr.copy_((self.ptr + n) % size)


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
        gather_distributed: bool = True,
        name: str = "nnclr",
    ) -> None:
        super().__init__(backbone)
        self.temperature, self.gather = temperature, gather_distributed
        self.projector = mlp(
            [self.num_features, proj_hidden_dim, proj_hidden_dim, proj_output_dim], last_bn=True
        )
        self.predictor = mlp([proj_output_dim, pred_hidden_dim, proj_output_dim])
        self.support = SupportSet(queue_size, proj_output_dim)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z0, z1 = self.embed_views(views, self.projector)
        p0, p1 = self.predictor(torch.cat([z0, z1])).float().chunk(2)
        z0, z1 = z0.float(), z1.float()
        # Both neighbours come from the support set as it was before this batch is added.
        nn0, nn1 = self.support.nearest(z0), self.support.nearest(z1)
        t, g = self.temperature, self.gather
        loss = 0.5 * (nt_xent(nn0, p1, t, g) + nt_xent(nn1, p0, t, g))
        # After both look-ups, as in lightly's NNCLR example; every process adds every process's
        # embeddings, so all see the same support set whatever their number.
        self.support.push(distributed.gather(z1))
        return {"loss": loss}
