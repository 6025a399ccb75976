"""eval=linear_fast: a quick linear probe on cached features, for monitoring and sweeps; not the
standard protocol (that is eval=linear).

The frozen backbone's features of the train and test images are computed once, without augmentation,
and a linear classifier trains on them, which takes seconds. The features are standardised with the
train split's statistics before the linear layer: MAE's linear probing (He et al. 2022, "Masked
Autoencoders Are Scalable Vision Learners", sec. A.2; facebookresearch/mae main_linprobe.py puts a
`BatchNorm1d(affine=False)` before the head), here with the whole train split's statistics instead of
a batch's. As in every protocol on a frozen backbone, a check at the end confirms that every backbone
parameter and buffer is exactly as loaded.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab.config import NonNegativeFloat, PositiveFloat, PositiveInt
from ssl_lab.errors import UserError
from ssl_lab.eval.common import (
    EvalContext,
    check_unchanged,
    context_features,
    frozen_state,
    sgd_cosine,
    topk,
)


class Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def linear_classifier(train_x: torch.Tensor, num_classes: int) -> nn.Sequential:
    """Standardise (with the statistics of `train_x`) + a zero-initialised linear layer."""
    head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(Standardize(train_x.mean(0), train_x.std(0).clamp(min=1e-6)), head)


def train_linear(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    base_lr: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Sequential:
    """A linear classifier trained on fixed features with SGD (Nesterov, cosine per step)."""
    classifier = linear_classifier(train_x, num_classes)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(train_x))
    steps_per_epoch = len(train_x) // batch_size
    optimizer, scheduler = sgd_cosine(
        classifier.parameters(), base_lr, batch_size, weight_decay, steps_per_epoch, epochs
    )
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for idx in order[: steps_per_epoch * batch_size].view(steps_per_epoch, batch_size):
            scheduler.step_update(step)
            loss = F.cross_entropy(classifier(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return classifier


def evaluate(
    ctx: EvalContext,
    epochs: PositiveInt = 100,
    batch_size: PositiveInt = 256,
    base_lr: PositiveFloat = 0.1,
    weight_decay: NonNegativeFloat = 0.0,
    feature_batch_size: PositiveInt = 512,
) -> dict[str, float]:
    if epochs < 1:
        raise UserError(f"eval.epochs={epochs} must be at least 1")
    backbone = ctx.backbone
    backbone.requires_grad_(False)
    before = frozen_state(backbone)
    train_x = context_features(ctx, ctx.data.memory, feature_batch_size)
    train_y = ctx.data.memory.labels.to(ctx.device)
    classifier = train_linear(
        train_x, train_y, ctx.data.num_classes, epochs, batch_size, base_lr, weight_decay, ctx.seed
    )
    test_x = context_features(ctx, ctx.data.test, feature_batch_size)
    with torch.no_grad():
        result = topk(classifier(test_x), ctx.data.test.labels)
    check_unchanged(backbone, before, "the backbone")
    return {"eval/linear_fast_top1": result["top1"], "eval/linear_fast_top5": result["top5"]}
