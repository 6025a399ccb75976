"""eval=linear: the standard linear evaluation, MoCo v3's (Chen, Xie and He 2021;
facebookresearch/moco-v3 main_lincls.py).

A linear layer (weights ~ N(0, 0.01), bias 0) on the frozen backbone, in eval mode so that batch norm
neither learns nor updates its statistics; every step sees a random resized crop (scale (0.08, 1)) +
horizontal flip of the labelled train images through the frozen network; SGD with momentum 0.9 (not
Nesterov's), lr = base_lr x batch/256, cosine decay to 0, no weight decay, 90 epochs of batch 1024:
main_lincls.py's defaults for a ResNet. The crop keeps the image size (RandomResizedCrop(32) for
CIFAR's 32 px images, 224 on ImageNet) and the test images are evaluated as they are (ImageNet's
Resize(256) + CenterCrop(224) has no counterpart at 32 px). The cosine is stepped per iteration
rather than per epoch. At the end a check confirms that every backbone parameter and buffer is
exactly as loaded: a linear probe that silently fine-tunes is a known way to report a wrong number.

eval=linear_fast is the quick variant on cached features.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab.config import NonNegativeFloat, PositiveFloat, PositiveInt
from ssl_lab.eval.common import (
    EvalContext,
    check_unchanged,
    fit,
    frozen_state,
    test_accuracy,
    train_augment,
)


def evaluate(
    ctx: EvalContext,
    epochs: PositiveInt = 90,
    batch_size: PositiveInt = 1024,
    base_lr: PositiveFloat = 0.1,
    weight_decay: NonNegativeFloat = 0.0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    test_batch_size: PositiveInt = 512,
) -> dict[str, float]:
    backbone = ctx.backbone
    backbone.requires_grad_(False)
    before = frozen_state(backbone)
    head = nn.Linear(ctx.model.num_features, ctx.data.num_classes).to(ctx.device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    backbone.eval()

    def loss_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = backbone(x)
        return F.cross_entropy(head(feats.float()), labels)

    fit(ctx, list(head.parameters()), ctx.data.memory, loss_fn, epochs, batch_size, base_lr,
        weight_decay, augment=train_augment(ctx, crop_scale), desc="linear probe", nesterov=False)  # fmt: skip
    result = test_accuracy(ctx, nn.Sequential(backbone, head).eval(), test_batch_size)
    check_unchanged(backbone, before, "the backbone")
    return {"eval/linear_top1": result["top1"], "eval/linear_top5": result["top5"]}
