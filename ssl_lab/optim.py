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
    # a cosine schedule of the weight decay from weight_decay to this, per step (DINO: 0.04 -> 0.4)
    weight_decay_end: NonNegativeFloat | None = None
    exclude_bias_and_norm: bool = True  # no weight decay (nor LARS adaptation) on biases and norms


# Flags a method's param_groups() may set on a group (ssl_lab.methods.base), beside "params".
GROUP_FLAGS = {"fixed_lr", "no_decay", "lr_scale", "weight_decay_end"}


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """`base_lr` is the rate for a batch of 256; scale it to the global batch size."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / 256)
    raise UserError(f"optimizer.lr_scaling={rule!r} is not known; use linear or sqrt")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters a timm model lists in its `no_weight_decay()` (a ViT's position embedding and
    tokens), with their full names in `model`."""
    names = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    return names


def declared_groups(model: nn.Module) -> list[dict]:
    """The method's parameter groups (Method.param_groups), or one group of every trainable parameter;
    each trainable parameter must be in exactly one."""
    groups = model.param_groups() if callable(getattr(model, "param_groups", None)) else None
    if groups is None:
        return [{"params": [(n, p) for n, p in model.named_parameters() if p.requires_grad]}]
    seen = [id(p) for g in groups for _, p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if len(seen) != len(set(seen)) or set(seen) != trainable:
        raise ValueError(f"{type(model).__name__}.param_groups() must hold each trainable parameter once")
    unknown = {k for g in groups for k in g} - GROUP_FLAGS - {"params", "name"}
    if unknown:
        raise ValueError(f"{type(model).__name__}.param_groups(): unknown flags {sorted(unknown)}")
    return groups


def build_optimizer(cfg: DictConfig, model: nn.Module, batch_size: int) -> torch.optim.Optimizer:
    """The method's parameter groups, each split in two: biases, normalisation parameters (ndim <= 1, or
    named *.bias: timm's rule) and what timm lists in `no_weight_decay()` get no weight decay and, under
    LARS, no adaptation; the weights get both, even at weight_decay=0."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    optimizer_class = hydra.utils.get_class(kwargs.pop("_target_"))
    own = OptimizerKeys(**{f.name: kwargs.pop(f.name) for f in fields(OptimizerKeys) if f.name in kwargs})
    lr = scaled_lr(own.base_lr, batch_size, own.lr_scaling)
    lars = "always_adapt" in inspect.signature(optimizer_class).parameters
    always_adapt = kwargs.pop("always_adapt", True)
    excluded_names = no_weight_decay_names(model)
    # Split here, not with timm's param_groups_weight_decay: at weight_decay=0 that makes one group,
    # and LARS must still tell the weights from the biases and norms. Excluded first, as timm orders
    # them, so that the optimizer state of earlier checkpoints still lines up.
    groups = []
    for declared in declared_groups(model):
        flags = {k: v for k, v in declared.items() if k in GROUP_FLAGS - {"no_decay"}}
        excluded, weights = [], []
        for name, p in declared["params"]:
            is_excluded = declared.get("no_decay", False) or (
                own.exclude_bias_and_norm
                and (p.ndim <= 1 or name.endswith(".bias") or name in excluded_names)
            )
            (excluded if is_excluded else weights).append(p)
        decay_end = flags.pop("weight_decay_end", own.weight_decay_end)
        scheduled = (
            {}
            if decay_end is None
            else {"weight_decay_end": decay_end, "initial_weight_decay": own.weight_decay}
        )
        pair = [
            {"params": excluded, "weight_decay": 0.0, **flags},
            {"params": weights, "weight_decay": own.weight_decay, **flags, **scheduled},
        ]
        if lars:
            # timm's LARS adapts a group only when its weight_decay is non-zero unless the group's own
            # `always_adapt` is set (step() reads group["always_adapt"]): without this, weight_decay=0
            # would train with plain SGD at LARS-scale learning rates.
            pair[0]["always_adapt"], pair[1]["always_adapt"] = False, always_adapt
        groups += [g for g in pair if g["params"]]
    return optimizer_class(groups, lr=lr, weight_decay=own.weight_decay, **kwargs)


def schedule_step(scheduler: Scheduler, step: int, total_steps: int) -> None:
    """The lr (and any weight-decay schedule) of optimizer step `step`: timm's per-step schedule, then
    groups with `fixed_lr` back at their initial lr (SimSiam's predictor: neither warm-up nor decay,
    as solo-learn's static_lr), `weight_decay_end` groups on their cosine (DINO's utils.cosine_scheduler)."""
    scheduler.step_update(step)
    for group in scheduler.optimizer.param_groups:
        if group.get("fixed_lr"):
            group["lr"] = group["initial_lr"] * group.get("lr_scale", 1.0)
        if group.get("weight_decay_end") is not None:
            start, end = group["initial_weight_decay"], group["weight_decay_end"]
            done = step / max(1, total_steps - 1)
            group["weight_decay"] = end + (start - end) * (1 + math.cos(math.pi * done)) / 2


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


class EpochCosine(CosineLRScheduler):
    """timm's cosine over epochs, the lr held for each epoch's steps: torch's CosineAnnealingLR(T_max=
    epochs) stepped once an epoch, as Lightning steps it (lightly's CIFAR-10 benchmark)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, lr_min: float
    ) -> None:
        self.steps_per_epoch = max(1, steps_per_epoch)
        super().__init__(optimizer, t_initial=max(1, epochs), lr_min=lr_min, t_in_epochs=False)

    def _get_lr(self, t: int) -> list[float]:
        return super()._get_lr(t // self.steps_per_epoch)


def cosine_by_epoch(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, min_lr_ratio: Probability = 0.0
) -> Scheduler:
    """Cosine decay from the peak lr at epoch 0 to min_lr_ratio * peak, one value per epoch, no warm-up."""
    return EpochCosine(optimizer, steps_per_epoch, epochs, min_lr_ratio * optimizer.param_groups[0]["lr"])


def constant(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: NonNegativeFloat = 0
) -> Scheduler:
    warmup = round(warmup_epochs * steps_per_epoch)
    return StepLRScheduler(
        optimizer, decay_t=10**12, decay_rate=1.0, warmup_t=warmup, warmup_lr_init=0.0, t_in_epochs=False
    )
