"""What every method shares, and everything the runner asks a method. A new method is one file here
and one YAML in conf/method/; the runner, the optimizer builder and the evaluation only call these:

- `views(draw)`: the augmented views of a batch, global views first, then local views of one size
  (SimCLR: two; DINO with multi-crop: `[draw(), draw(), *(draw(size=96, crop_scale=(0.05, 0.4))
  for _ in range(6))]`). Views of equal size go through the backbone together (`per_view`).
  `draw.noise(*shape)` gives per-sample uniform noise [batch, *shape] from the same random stream
  (MAE's masks: `[draw(), draw.noise(num_patches)]`), so that it too is the same for a sample
  whatever the number of processes, and a resumed run continues it. `draw.shared(*shape)` gives
  uniform noise of exactly `shape`, the same on every process (LeJEPA's random slicing directions).
- `training_step(views)`: `{"loss": ..., **scalars}`; every other scalar (detached) is logged as
  `train/<name>`. The training progress is in tensors (`progress_step`, `epoch_now()`,
  `progress()`), so a compiled step reads it without recompiling: Python numbers that change each
  step would recompile it.
- `param_groups()`: the groups the optimizer builds, as `{"params": [(name, parameter), ...],
  **flags}`; flags: `fixed_lr` (the schedule does not touch it, SimSiam's predictor), `no_decay`
  (no weight decay and no LARS adaptation for any of its parameters), `lr_scale`,
  `weight_decay_end` (a cosine weight-decay schedule to this value, DINO). Biases, norms and what a
  timm model lists in `no_weight_decay()` get neither decay nor adaptation in any group.
- `check_batch(batch_size)`: refuse a global batch the method's settings cannot take, before the run
  writes anything.
- `after_backward(step, epoch)`: between backward (gradients unscaled) and the optimizer step, e.g.
  DINO drops its last layer's gradients in the first epoch.
- `after_step(step, total_steps)`: after each optimizer step, e.g. a momentum teacher's EMA update.
- `evaluated`: the module evaluation reads (the kNN monitor, every eval protocol, export), as a path
  in the method: the student's `backbone`, or DINO's `teacher.backbone`; `evaluated_head` the
  projection head that fine-tuning may start from (eval.from_head_layer).

Shared parts (losses, heads, queues, the momentum teacher) are in ssl_lab/methods/parts.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn


class Draw:
    """What `Method.views` receives: `draw(**changes)` one view of the batch, `draw.noise(*shape)`
    uniform noise in [0, 1) of shape [batch, *shape], one row per sample; `draw.shared(*shape)` uniform
    noise of shape `shape` for the whole step, the same on every process."""

    def __init__(
        self,
        view: Callable[..., torch.Tensor],
        noise: Callable[..., torch.Tensor] | None = None,
        shared: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.view, self._noise, self._shared = view, noise, shared

    def __call__(self, **changes) -> torch.Tensor:
        return self.view(**changes)

    def noise(self, *shape: int) -> torch.Tensor:
        if self._noise is None:
            raise TypeError("this draw gives no noise")
        return self._noise(*shape)

    def shared(self, *shape: int) -> torch.Tensor:
        if self._shared is None:
            raise TypeError("this draw gives no shared noise")
        return self._shared(*shape)


class Method(nn.Module):
    """A backbone plus method-specific heads. `forward(x)` gives the evaluated network's features (what
    evaluation and the kNN monitor read); `forward([views])` is the training step (the call DDP wraps)."""

    name: str = "method"
    evaluated: str = "backbone"
    evaluated_head: str | None = "projector"

    def __init__(self, backbone: nn.Module, concat_views: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features: int = backbone.num_features
        self.concat_views = concat_views
        # The optimizer steps taken, set by the runner before each step (a buffer: a compiled step
        # reads it as an input; not saved, the runner's progress is).
        self.register_buffer("progress_step", torch.zeros((), dtype=torch.long), persistent=False)
        self.steps_per_epoch, self.total_steps = 1, 1

    def forward(self, x: torch.Tensor | list[torch.Tensor]):
        if isinstance(x, (list, tuple)):  # not list | tuple: torch.compile before 2.5 cannot trace it
            return self.training_step(list(x))
        return self.encoder(x)

    @property
    def encoder(self) -> nn.Module:
        """The network that evaluation reads (`evaluated`)."""
        return self.get_submodule(self.evaluated)

    @property
    def encoder_head(self) -> nn.Module | None:
        """The projection head on top of `encoder` (fine-tuning from a head layer), if there is one."""
        if self.evaluated_head is None:
            return None
        try:
            return self.get_submodule(self.evaluated_head)
        except AttributeError:
            return None

    # ------------------------------------------------------------------ what the runner asks

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """The views of one batch; `draw(**changes)` makes one with the run's augmentation, `changes`
        overriding its settings for this view (e.g. size, crop_scale)."""
        return [draw(), draw()]

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """One group of every trainable parameter by default."""
        return [{"params": [(n, p) for n, p in self.named_parameters() if p.requires_grad]}]

    def check_batch(self, batch_size: int) -> None:
        """Before anything is written: a UserError if the global batch `batch_size` does not suit the
        method's settings (NNCLR: a queue smaller than the batch it adds each step)."""

    def after_backward(self, step: int, epoch: int) -> None:
        """Between backward and the optimizer step (gradients unscaled): nothing by default."""

    def after_step(self, step: int, total_steps: int) -> None:
        """After the optimizer step `step` (0-based) of `total_steps`: nothing by default."""

    # ------------------------------------------------------------------ the training progress

    def set_progress(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        """The runner, before step `step`: `fill_` launches a kernel with the number as its argument,
        no copy from the host and no sync."""
        self.progress_step.fill_(step)
        self.steps_per_epoch, self.total_steps = steps_per_epoch, max(1, total_steps)

    def epoch_now(self) -> torch.Tensor:
        """The current epoch (0-based), a tensor."""
        return torch.div(self.progress_step, self.steps_per_epoch, rounding_mode="floor")

    def progress(self) -> torch.Tensor:
        """The fraction of training done, in [0, 1), a float tensor."""
        return self.progress_step.float() / self.total_steps

    # ------------------------------------------------------------------ helpers for methods

    def per_view(
        self, module: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """`module` on each view. With `concat_views` (the default), consecutive views of equal size go
        through in one pass: bigger matmuls, and batch norm's statistics are over all of them, as
        SimCLR's global BN (2 global + 6 local crops: 2 passes, not 8). Without, one pass per view, so
        each view is normalised by its own statistics (lightly's examples call the model per view)."""
        if not self.concat_views:
            return [module(v) for v in views]
        groups: list[list[torch.Tensor]] = []
        for v in views:
            if groups and groups[-1][0].shape[1:] == v.shape[1:]:
                groups[-1].append(v)
            else:
                groups.append([v])
        out: list[torch.Tensor] = []
        for group in groups:
            out.extend(module(torch.cat(group)).chunk(len(group)) if len(group) > 1 else [module(group[0])])
        return out

    def embed_views(self, views: list[torch.Tensor], head: nn.Module) -> list[torch.Tensor]:
        """head(backbone(view)) for each view (see `per_view`)."""
        return self.per_view(lambda x: head(self.backbone(x)), views)
