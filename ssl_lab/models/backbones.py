"""Backbones: feature extractors returning pooled features, with their width in `num_features`."""

from __future__ import annotations

import difflib

import timm
import torch
import torch.nn as nn
import torchvision

from ssl_lab import distributed
from ssl_lab.errors import UserError

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def torchvision_resnet(
    name: str = "resnet18", cifar_stem: bool = False, stem_relu: bool = True, bn_splits: int = 0
) -> nn.Module:
    """A torchvision ResNet without its classifier; `cifar_stem` swaps the 7x7/2 conv + max-pool
    for a 3x3/1 conv, which keeps the resolution that 32x32 images need.

    For lightly's CIFAR-10 benchmark backbone (`nn.Sequential(*ResNetGenerator("resnet-18").children())`
    drops the ReLU its forward applies after the stem): `stem_relu=false`. `bn_splits=n`: every batch
    norm over n splits of the global batch (SplitBatchNorm2d, the benchmark's MoCo row)."""
    if name not in TORCHVISION_RESNETS:
        raise UserError(
            f"unknown torchvision ResNet {name!r}; choose one of {', '.join(TORCHVISION_RESNETS)}"
        )
    if bn_splits < 0:
        raise UserError(f"backbone.bn_splits={bn_splits} must be 0 (plain batch norm) or a number of splits")
    model = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if not stem_relu:  # torchvision's blocks have ReLUs of their own: this one is the stem's only
        model.relu = nn.Identity()
    if bn_splits:
        model = SplitBatchNorm2d.convert(model, bn_splits)
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


class SplitBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics are those of `num_splits` equal, consecutive splits of the
    global batch, each on its own (lightly's SplitBatchNorm: one GPU behaving as `num_splits` GPUs
    with batch norm per GPU, MoCo's stand-in for shuffle BN). With several processes each holds
    num_splits / world of the splits, so the statistics are those of one process on the global batch.
    The running statistics follow the mean over the splits (lightly keeps one per split and averages
    them when switching to eval: the same numbers); with several processes they are averaged over the
    processes too, so every process evaluates the same network. Evaluation uses them as plain batch norm.

    lightly's splits are strided (sample i in split i mod n) and its running statistics per split; here
    they are consecutive, so that a split never straddles two processes. Over a shuffled batch either
    grouping is a random one."""

    splits_global_batch = True  # ssl_lab.distributed leaves it as it is: already world-invariant

    def __init__(self, num_features: int, num_splits: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.num_splits = num_splits

    @classmethod
    def convert(cls, module: nn.Module, num_splits: int) -> nn.Module:
        """`module` with every plain BatchNorm2d replaced, parameters and buffers kept."""
        if type(module) is nn.BatchNorm2d:
            split = cls(module.num_features, num_splits, module.eps, module.momentum)
            split.load_state_dict(module.state_dict())
            return split
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child, num_splits))
        return module

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        world = distributed.world_size()
        splits, (n, c, h, w) = self.num_splits // world, x.shape
        if self.num_splits % world or n % splits:
            raise UserError(
                f"backbone.bn_splits={self.num_splits} needs a multiple of the {world} processes that "
                f"splits each process's batch of {n} evenly; set backbone.bn_splits or batch_size to fit"
            )
        groups = x.float().view(splits, n // splits, c, h, w)  # fp32 statistics, as batch norm's
        var, mean = torch.var_mean(groups, dim=(1, 3, 4), correction=0, keepdim=True)
        y = (groups - mean) * torch.rsqrt(var + self.eps)
        y = y * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)
        with torch.no_grad():  # the mean of the splits' running statistics (unbiased variance)
            count = (n // splits) * h * w
            stats = torch.cat([mean.mean(0).flatten(), var.mean(0).flatten() * count / max(count - 1, 1)])
            stats = distributed.mean(stats).to(stats.device) if world > 1 else stats
            self.running_mean.lerp_(stats[:c], self.momentum)
            self.running_var.lerp_(stats[c:], self.momentum)
            self.num_batches_tracked.add_(1)
        return y.view(n, c, h, w).to(x.dtype)


def timm_model(name: str, image_size: int | None = None, kwargs: dict | None = None) -> nn.Module:
    """Any `timm.create_model` name as a pooled feature extractor (num_classes=0)."""
    kwargs = dict(kwargs or {})
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models()."
        raise UserError(f"timm has no model named {name!r}.{hint}")
    if image_size is not None and "img_size" not in kwargs:
        try:  # models with a fixed input grid (ViTs, Swin, ...) need to know the size
            return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
        except TypeError:  # the model takes any input size and has no img_size argument
            pass
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
