"""eval=finetune: fine-tune backbone + a linear head on a class-balanced fraction of the labels
(`label_fraction` 0.01, 0.1 or 1.0, as the SimCLR papers' 1 % / 10 % / 100 % semi-supervised setting).

The subset is fixed by `subset_seed` alone, so every run and every method sees the same images. The
fine-tuned network is saved as `finetune_<pct>.pt` in the run dir: the teacher of eval=distill.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import checkpoint
from ssl_lab.config import LabelFraction, NonNegativeFloat, PositiveFloat, PositiveInt
from ssl_lab.errors import UserError
from ssl_lab.eval.common import EvalContext, copy_backbone, fit, percent, test_accuracy, train_augment


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of `fraction` of the images of every class (at least one per class), drawn with
    `seed`: the same labels and seed always give the same subset."""
    if not 0 < fraction <= 1:
        raise UserError(f"eval.label_fraction={fraction} must be in (0, 1], e.g. 0.01, 0.1 or 1.0")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique(sorted=True):
        members = (labels == c).nonzero()[:, 0]
        take = max(1, math.floor(fraction * len(members) + 0.5))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def classifier(backbone: nn.Module, num_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(backbone, nn.Linear(num_features, num_classes))


def evaluate(
    ctx: EvalContext,
    label_fraction: LabelFraction = 0.1,
    subset_seed: int = 0,
    epochs: PositiveInt = 30,
    batch_size: PositiveInt = 256,
    base_lr: PositiveFloat = 0.05,
    weight_decay: NonNegativeFloat = 0.0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    save: bool = True,
) -> dict[str, float]:
    memory = ctx.data.memory
    labelled = memory.select(balanced_subset(memory.labels, label_fraction, subset_seed))
    net = classifier(copy_backbone(ctx), ctx.model.num_features, ctx.data.num_classes).to(ctx.device)
    net = net.to(memory_format=torch.channels_last) if ctx.channels_last else net
    net.train()

    def loss_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(x), labels)

    name = f"finetune_{percent(label_fraction)}"
    fit(ctx, list(net.parameters()), labelled, loss_fn, epochs, batch_size, base_lr, weight_decay,
        augment=train_augment(ctx, crop_scale), desc=f"fine-tune on {len(labelled)} labels")  # fmt: skip
    result = test_accuracy(ctx, net)
    if save:
        state = {"model": net.state_dict(), "config": ctx.pretrain_config, "num_classes": ctx.data.num_classes,
                 "label_fraction": label_fraction, "labelled_images": len(labelled)}  # fmt: skip
        checkpoint.save(state, ctx.run_dir / f"{name}.pt")
    return {f"eval/{name}_top1": result["top1"], f"eval/{name}_top5": result["top5"],
            f"eval/{name}_labels": len(labelled)}  # fmt: skip
