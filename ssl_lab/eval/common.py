"""What the evaluation protocols share: the loaded run, frozen features, a supervised training loop
(SGD with momentum and a per-step cosine schedule, every image once per epoch) and top-1/top-5 on the
test split."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.scheduler.scheduler import Scheduler
from tqdm import tqdm

from ssl_lab.data.augment import Augment, normalize, resized_crop
from ssl_lab.data.datasets import DataSplits, ImageSet
from ssl_lab.data.loader import batches, epoch_order
from ssl_lab.errors import UserError
from ssl_lab.optim import warmup_cosine


@dataclass
class EvalContext:
    """A pretrained run, loaded: its model (backbone + heads) and config, the labelled data, the device."""

    model: nn.Module  # the pretraining Method; `model.encoder` (Method.evaluated) is what is evaluated
    pretrain_config: dict[str, Any]  # the run's resolved config, from the checkpoint
    data: DataSplits
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    num_workers: int = 0
    seed: int = 0
    run_dir: Path = Path(".")
    progress: bool = False

    @property
    def backbone(self) -> nn.Module:
        return self.model.encoder

    def autocast(self) -> torch.autocast:
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def feature_options(self, batch_size: int) -> dict[str, Any]:
        """The keyword arguments of `features` for this device and these trainer settings."""
        return dict(device=self.device, batch_size=batch_size, autocast_dtype=self.autocast_dtype,
                    channels_last=self.channels_last, num_workers=self.num_workers)  # fmt: skip

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> the network's input (the eval transform: no augmentation)."""
        return self.prepare(
            normalize(images.to(self.device, non_blocking=True), self.data.mean, self.data.std)
        )


@torch.no_grad()
def features(
    backbone: nn.Module,
    images: ImageSet,
    mean,
    std,
    device: torch.device,
    batch_size: int = 512,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    num_workers: int = 0,
    rows: range | None = None,
) -> torch.Tensor:
    """Backbone features [N, D] (float32) of every image (or of the images at `rows`), in order, with
    the network in eval mode."""
    rows = range(len(images)) if rows is None else rows
    if not rows:
        return torch.empty(0, backbone.num_features, device=device)
    was_training = backbone.training
    backbone.eval()
    out = []
    for batch, _ in batches(images, torch.arange(rows.start, rows.stop), batch_size, drop_last=False,
                            num_workers=num_workers):  # fmt: skip
        x = normalize(batch.to(device, non_blocking=True), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(out)


def context_features(ctx: EvalContext, images: ImageSet, batch_size: int) -> torch.Tensor:
    return features(ctx.backbone, images, ctx.data.mean, ctx.data.std, **ctx.feature_options(batch_size))


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """Accuracy in percent for each k in topk."""
    return [100.0 * hits / len(labels) for hits in topk_hits(scores, labels, topk).tolist()]


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1,)) -> torch.Tensor:
    """How many rows have their label among the top k scores, for each k in topk (float64 counts)."""
    pred = scores.topk(max(topk), dim=1).indices
    hit = pred == labels[:, None].to(pred.device)
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in topk]).double()


def topk(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-5 is 100 when there are at most 5 classes)."""
    return topk_percent(topk_hits(logits, labels, top1_top5(logits.shape[1])), len(labels))


def top1_top5(num_classes: int) -> tuple[int, int]:
    """The k of top-1 and top-5 (top-5 is top-num_classes below 5 classes)."""
    return 1, min(5, num_classes)


def topk_percent(hits: torch.Tensor, n: int) -> dict[str, float]:
    """`topk_hits` of (1, 5) over `n` rows as top1/top5 percentages."""
    top1, top5 = (100.0 * h / n for h in hits.tolist())
    return {"top1": top1, "top5": top5}


def sgd_cosine(
    params,
    base_lr: float,
    batch_size: int,
    weight_decay: float,
    steps_per_epoch: int,
    epochs: int,
    nesterov: bool = True,
) -> tuple[torch.optim.Optimizer, Scheduler]:
    """The protocols' optimiser: SGD with momentum 0.9 (Nesterov's unless `nesterov=False`),
    lr = base_lr x batch/256, decayed to 0 by a cosine stepped per iteration
    (`scheduler.step_update(step)` before each step)."""
    optimizer = torch.optim.SGD(
        params, lr=base_lr * batch_size / 256, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay
    )
    return optimizer, warmup_cosine(optimizer, steps_per_epoch, epochs, warmup_epochs=0)


def even_batch_size(n: int, batch_size: int) -> int:
    """The size that splits `n` images into as many batches as `batch_size` would, as evenly as it
    can (500 labels, batch 256: two batches of 250, not one of 256 and a rest of 244 that drop_last
    would lose). Never one image left for the last batch, on which batch norm cannot train."""
    size = math.ceil(n / math.ceil(n / batch_size))
    while n % size == 1 and size > 2:
        size -= 1
    return size


def epoch_batches(
    ctx: EvalContext, images: ImageSet, epoch: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(uint8 images, labels) of one epoch: every image exactly once, in an order fixed by
    (seed, epoch), in batches of `even_batch_size`; none is dropped."""
    order = epoch_order(len(images), ctx.seed, epoch)
    return batches(images, order, even_batch_size(len(images), batch_size), drop_last=False,
                   num_workers=ctx.num_workers, pin_memory=ctx.device.type == "cuda")  # fmt: skip


@torch.no_grad()
def test_accuracy(ctx: EvalContext, net: nn.Module, batch_size: int = 512) -> dict[str, float]:
    """top1/top5 of `net` (images -> logits) on the test split."""
    was_training = net.training
    net.eval()
    logits = []
    for images, _ in batches(ctx.data.test, torch.arange(len(ctx.data.test)), batch_size, drop_last=False,
                             num_workers=ctx.num_workers):  # fmt: skip
        with ctx.autocast():
            logits.append(net(ctx.normalize(images)).float())
    net.train(was_training)
    return topk(torch.cat(logits), ctx.data.test.labels)


class CropFlip(Augment):
    """Augment's random resized crop + horizontal flip alone: the colour operations, off for supervised
    training, are skipped rather than run as no-ops on every batch (most of the time on a CPU)."""

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        x = resized_crop(images.float().div_(255), params["crop"], self.size, params["flip"])
        return (x - self.mean_t) / self.std_t


def train_augment(ctx: EvalContext, crop_scale=(0.08, 1.0)) -> Augment:
    """Random resized crop (at the image's own size) + flip, no colour changes: the augmentation of
    supervised fine-tuning and of the standard linear probe (MoCo v3, SimCLR, solo-learn)."""
    size = ctx.data.test.image_size if ctx.data.test is not None else ctx.data.train.image_size
    return CropFlip(size, crop_scale=crop_scale, jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                    mean=ctx.data.mean, std=ctx.data.std).to(ctx.device)  # fmt: skip


def fit(
    ctx: EvalContext,
    params: list[nn.Parameter],
    images: ImageSet,
    loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    epochs: int,
    batch_size: int,
    base_lr: float,
    weight_decay: float = 0.0,
    augment: Augment | None = None,
    desc: str = "",
    nesterov: bool = True,
) -> float:
    """Train `params` for `epochs` over `images` (every image once per epoch, `epoch_batches`) with
    `sgd_cosine`; `loss_fn(inputs, labels)` gives the loss of a batch. Returns the last loss."""
    if epochs < 1:
        raise UserError(f"eval.epochs={epochs} must be at least 1")
    batch_size = even_batch_size(len(images), batch_size)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    optimizer, scheduler = sgd_cosine(
        params, base_lr, batch_size, weight_decay, steps_per_epoch, epochs, nesterov
    )
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed + 1)
    # fp16 autocast (trainer.precision=16): gradients scaled so that small ones do not underflow
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.autocast_dtype == torch.float16)
    step, loss = 0, torch.zeros(())
    bar = tqdm(
        total=epochs * steps_per_epoch, desc=desc, disable=not ctx.progress, leave=False,
        mininterval=0.5 if sys.stderr.isatty() else 30,
    )  # fmt: skip
    for epoch in range(epochs):
        for uint8, labels in epoch_batches(ctx, images, epoch, batch_size):
            scheduler.step_update(step)
            uint8 = uint8.to(ctx.device, non_blocking=True)
            x = ctx.prepare(augment(uint8, generator)) if augment is not None else ctx.normalize(uint8)
            if labels is not None:
                labels = labels.to(ctx.device, non_blocking=True)
            with ctx.autocast():
                loss = loss_fn(x, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            bar.update()
    bar.close()
    loss = loss.item()
    if not math.isfinite(loss):
        raise UserError(f"{desc}: the loss became NaN/inf; lower eval.base_lr")
    return loss


def frozen_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_unchanged(module: nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    """The frozen-backbone check: every parameter and buffer (batch-norm statistics too) as before."""
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise RuntimeError(f"{what} changed during evaluation ({', '.join(changed[:3])}, ...): not frozen")


def percent(fraction: float) -> str:
    """0.01 -> '1pct', 0.1 -> '10pct', 0.005 -> '0.5pct': the label fraction in metric and file names."""
    return f"{fraction * 100:g}pct"
