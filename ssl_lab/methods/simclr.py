"""SimCLR (Chen et al., 2020): a projection head and the NT-Xent loss over the 2N views."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab.methods.base import Method, mlp


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy. Row i of z0 and row i of z1 are positives;
    every other of the 2N embeddings is a negative (the same loss as lightly's NTXentLoss)."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class SimCLR(Method):
    name = "simclr"

    def __init__(
        self,
        backbone: nn.Module,
        temperature: float = 0.5,
        proj_hidden_dim: int | None = None,
        proj_output_dim: int = 128,
        name: str = "simclr",
    ) -> None:
        super().__init__(backbone)
        self.temperature = temperature
        hidden = proj_hidden_dim or self.num_features
        self.projector = mlp([self.num_features, hidden, proj_output_dim])

    def training_step(self, view0: torch.Tensor, view1: torch.Tensor) -> dict[str, torch.Tensor]:
        z0, z1 = self.embed_views(view0, view1, self.projector)
        return {"loss": nt_xent(z0.float(), z1.float(), self.temperature)}
