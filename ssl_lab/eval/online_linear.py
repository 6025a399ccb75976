"""The online linear probe (solo-learn's online classifier): a linear classifier (after a batch norm
without scale or shift, as MAE's linear probing) trained during pretraining on the detached features of
the evaluated network, scored on the validation split at
every kNN monitor.

    probe = OnlineLinear(model.encoder, num_classes, lr, schedule)
    with probe.capture():                  # a forward hook records the encoder's output...
        loss = model(views)["loss"]        # ...in the method's own training forward: no extra pass
    probe.step(labels, step, total_steps)  # after the method's update: its own optimizer

Nothing reaches the method: the features are detached, the probe has its own SGD optimizer (momentum
0.9, no weight decay, lr `monitor.online_linear_lr` for a batch of 256 scaled to the global batch, on
the run's scheduler), its gradients are summed over processes in one collective, and its weights are
drawn from their own generator, not torch's global one. A training step's probe reads the first call
of the encoder (the global views, concatenated when the method concatenates them; the first view
alone when it does not); a method whose step never calls its evaluated network whole (MAE's encoder
sees only the visible patches) gets one more pass of it, without gradients, over the first view.
Images whose label is -1 (held out as the validation split, or unlabelled: STL-10's unlabeled split)
do not train it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.eval.common import topk_hits
from ssl_lab.optim import schedule_step

IGNORE = -1  # the label of an image the probe must not train on


class OnlineLinear:
    def __init__(
        self,
        encoder: nn.Module,
        num_features: int,
        num_classes: int,
        lr: float,
        make_scheduler: Callable[[torch.optim.Optimizer], object],
        seed: int = 0,
    ) -> None:
        self.encoder = encoder
        device = next(encoder.parameters()).device
        # Features standardised by a batch norm without scale or shift (MAE's linear probing): the
        # probe's lr then suits any backbone's feature scale (a ResNet's pooled ReLU features at lr 0.1
        # diverged without it). Over the global batch on N processes, as the method's batch norms.
        self.norm = nn.BatchNorm1d(num_features, affine=False)
        if distributed.world_size() > 1:
            self.norm = distributed.SyncBatchNorm.convert(self.norm)
        self.linear = nn.Linear(num_features, num_classes)
        generator = torch.Generator().manual_seed(seed + 7919)  # the same on every process
        bound = 1 / num_features**0.5  # nn.Linear's own initialisation, from our generator
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound, generator=generator)
            self.linear.bias.uniform_(-bound, bound, generator=generator)
        self.head = nn.Sequential(self.norm, self.linear).to(device)
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=0.9, weight_decay=0)
        self.scheduler = make_scheduler(self.optimizer)
        self.captured: torch.Tensor | None = None
        self.capturing = False
        encoder.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.capturing and self.captured is None:
            self.captured = output.detach()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record the encoder's first output in this block (the method's training forward)."""
        self.captured, self.capturing = None, True
        try:
            yield
        finally:
            self.capturing = False

    def step(
        self,
        labels: torch.Tensor,
        first_view: torch.Tensor,
        step: int,
        total_steps: int,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """One SGD step on the captured features (or on a pass over `first_view` when the forward
        never called the encoder whole); returns `online_loss` and `online_top1` (%) on the training
        views' labelled rows, as tensors: no host sync."""
        features, rows = self.captured, labels.shape[0]
        self.captured = None
        if features is None or features.shape[0] % rows:
            device, dtype = first_view.device.type, autocast_dtype
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                features = self.encoder(first_view)
        targets = labels.to(features.device, non_blocking=True).repeat(features.shape[0] // rows)
        schedule_step(self.scheduler, step, total_steps)
        self.head.train()
        logits = self.head(features.float())
        loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        labelled = (targets != IGNORE).sum().float()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum.backward()
        # The mean over every labelled row of every process: the gradients of the sums and the count
        # go through one collective together, then the division (the same on 1 and N processes).
        params = list(self.linear.parameters())
        summed = distributed.total(torch.cat([*(p.grad.flatten() for p in params), labelled.view(1)]))
        count = summed[-1].clamp(min=1)
        for p, grad in zip(params, summed[:-1].split([p.numel() for p in params])):
            p.grad.copy_(grad.view_as(p) / count)
        self.optimizer.step()
        with torch.no_grad():
            hits = ((logits.argmax(dim=1) == targets) & (targets != IGNORE)).sum().float()
            local = labelled.clamp(min=1)
            return {"online_loss": loss_sum.detach() / local, "online_top1": 100 * hits / local}

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, labels: torch.Tensor, total: int) -> float:
        """Top-1 (%) over every process's share of `total` images: this process's `features` [n, D]
        and `labels` [n]."""
        self.head.eval()
        hits = topk_hits(self.head(features.float()), labels.to(features.device))
        return 100.0 * distributed.total(hits).item() / total

    def state_dict(self) -> dict:
        return {
            "linear": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["linear"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
