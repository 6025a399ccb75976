"""What every method shares: a backbone, the views it trains on, a training step, a post-step update.

The runner asks the method for everything method-specific, so a new method is one file here and one
YAML in conf/method/, whatever it needs:

- `views(draw)`: the augmented views of a batch. SimCLR and NNCLR take two; a multi-crop method takes
  e.g. `[draw(), draw(), *(draw(size=96, crop_scale=(0.05, 0.4)) for _ in range(6))]`.
- `training_step(views)`: the loss (and any logs) of one batch of views.
- `after_step(step, total_steps)`: runs after each optimizer step, e.g. a momentum teacher's EMA
  update (BYOL, MoCo v3, DINO).
"""

from __future__ import annotations

from collections.abc import Callable

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
    """A backbone plus method-specific heads. `forward(x)` gives backbone features (what evaluation
    uses); `forward([views])` is the training step (the call DDP wraps)."""

    name: str = "method"

    def __init__(self, backbone: nn.Module, concat_views: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features: int = backbone.num_features
        self.concat_views = concat_views

    def forward(self, x: torch.Tensor | list[torch.Tensor]):
        if isinstance(x, (list, tuple)):  # not list | tuple: torch.compile before 2.5 cannot trace it
            return self.training_step(list(x))
        return self.backbone(x)

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """The views of one batch; `draw(**changes)` makes one with the run's augmentation, `changes`
        overriding its settings for this view (e.g. size, crop_scale)."""
        return [draw(), draw()]

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """After the optimizer step `step` (0-based) of `total_steps`: nothing by default."""

    def per_view(self, module: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """`module` on each view. With `concat_views` (the default) in one pass: bigger matmuls, and
        batch norm's statistics are over the 2N images of the batch, as SimCLR's global BN; without,
        one pass per view, so each view is normalised by its own statistics (lightly's examples call
        the model once per view). Views of different sizes always take a pass each."""
        if self.concat_views and len({v.shape[1:] for v in views}) == 1:
            return list(module(torch.cat(views)).chunk(len(views)))
        return [module(v) for v in views]

    def embed_views(self, views: list[torch.Tensor], head: nn.Module) -> list[torch.Tensor]:
        """head(backbone(view)) for each view (see `per_view`)."""
        return self.per_view(lambda x: head(self.backbone(x)), views)
