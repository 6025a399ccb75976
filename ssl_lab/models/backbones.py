"""Backbones: feature extractors returning pooled features, with their width in `num_features`."""

from __future__ import annotations

import difflib

import timm
import torch.nn as nn
import torchvision

from ssl_lab.errors import UserError

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def torchvision_resnet(name: str = "resnet18", cifar_stem: bool = False) -> nn.Module:
    """A torchvision ResNet without its classifier; `cifar_stem` swaps the 7x7/2 conv + max-pool
    for a 3x3/1 conv, which keeps the resolution that 32x32 images need."""
    if name not in TORCHVISION_RESNETS:
        raise UserError(
            f"unknown torchvision ResNet {name!r}; choose one of {', '.join(TORCHVISION_RESNETS)}"
        )
    model = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


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
