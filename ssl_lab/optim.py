"""Optimizers (SGD, AdamW, timm's LARS) with batch-size lr scaling, and per-iteration schedules."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Literal

import hydra.utils
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from ssl_lab.config import NonNegativeFloat, PositiveFloat, Probability
from ssl_lab.errors import UserError


@dataclass
class OptimizerKeys:
    """The keys of conf/optimizer/*.yaml that ssl_lab reads itself; the rest go to the optimizer class.
    Their types and ranges are what the config check holds a config to."""

    base_lr: PositiveFloat  # the rate for a batch of 256, scaled to batch_size by lr_scaling
    lr_scaling: Literal["linear", "sqrt"] = "linear"
    weight_decay: NonNegativeFloat = 0.0
    exclude_bias_and_norm: bool = True  # no weight decay (nor LARS adaptation) on biases and norms


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """`base_lr` is the rate for a batch of 256; scale it to the global batch size."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / 256)
    raise UserError(f"optimizer.lr_scaling={rule!r} is not known; use linear or sqrt")


def build_optimizer(cfg: DictConfig, model: nn.Module, batch_size: int) -> torch.optim.Optimizer:
    """Biases and normalisation parameters (ndim <= 1, or named *.bias: timm's rule) get no weight
    decay; under LARS they are not adapted either, while the weights are, even at weight_decay=0."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    optimizer_class = hydra.utils.get_class(kwargs.pop("_target_"))
    own = OptimizerKeys(**{f.name: kwargs.pop(f.name) for f in fields(OptimizerKeys) if f.name in kwargs})
    lr = scaled_lr(own.base_lr, batch_size, own.lr_scaling)
    # Split here, not with timm's param_groups_weight_decay: at weight_decay=0 that makes one group,
    # and LARS must still tell the weights from the biases and norms. Excluded first, as timm orders
    # them, so that the optimizer state of earlier checkpoints still lines up.
    excluded, weights = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_excluded = own.exclude_bias_and_norm and (p.ndim <= 1 or name.endswith(".bias"))
            (excluded if is_excluded else weights).append(p)
    groups = [
        {"params": excluded, "weight_decay": 0.0},
        {"params": weights, "weight_decay": own.weight_decay},
    ]
    if "always_adapt" in inspect.signature(optimizer_class).parameters:
        # timm's LARS adapts a group only when its weight_decay is non-zero unless the group's own
        # `always_adapt` is set (step() reads group["always_adapt"]): without this, weight_decay=0
        # would train with plain SGD at LARS-scale learning rates.
        groups[0]["always_adapt"], groups[1]["always_adapt"] = False, kwargs.pop("always_adapt", True)
    groups = [g for g in groups if g["params"]]
    return optimizer_class(groups, lr=lr, weight_decay=own.weight_decay, **kwargs)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: NonNegativeFloat = 10,
    min_lr_ratio: Probability = 0.0,
) -> Scheduler:
    """Linear warm-up from 0 to the peak lr, then cosine decay to min_lr_ratio * peak, per step."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(round(warmup_epochs * steps_per_epoch), total - 1)
    peak = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(
        optimizer,
        t_initial=total - warmup,
        lr_min=min_lr_ratio * peak,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def constant(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: NonNegativeFloat = 0
) -> Scheduler:
    warmup = round(warmup_epochs * steps_per_epoch)
    return StepLRScheduler(
        optimizer, decay_t=10**12, decay_rate=1.0, warmup_t=warmup, warmup_lr_init=0.0, t_in_epochs=False
    )
