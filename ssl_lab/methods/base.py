"""What every method shares: a backbone, a forward of both views in one pass, a training step."""

from __future__ import annotations

import torch
import torch.nn as nn


def mlp(dims: list[int], last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU blocks through `dims`; the last Linear has no ReLU (and BN only if `last_bn`)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(d_in, d_out, bias=last and not last_bn))
        if not last or last_bn:
            layers.append(nn.BatchNorm1d(d_out))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Method(nn.Module):
    """A backbone plus method-specific heads. `forward` gives backbone features (what evaluation
    uses); `training_step` takes the two augmented views and returns the loss and any logs."""

    name: str = "method"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features: int = backbone.num_features

    def forward(self, x: torch.Tensor, view1: torch.Tensor | None = None):
        """Backbone features of x; with a second view, the training step (the call DDP wraps)."""
        if view1 is not None:
            return self.training_step(x, view1)
        return self.backbone(x)

    def embed_views(
        self, view0: torch.Tensor, view1: torch.Tensor, head: nn.Module
    ) -> tuple[torch.Tensor, ...]:
        # One pass over both views: bigger matmuls, and batch norm sees the 2N images of the batch
        # as SimCLR's global BN does.
        z = head(self.backbone(torch.cat([view0, view1])))
        return z.chunk(2)

    def training_step(self, view0: torch.Tensor, view1: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError
