"""ssl_lab: config-driven self-supervised learning (SimCLR, NNCLR)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ssl_lab.errors import UserError

if TYPE_CHECKING:
    import torch.nn

__version__ = "0.1.0"
__all__ = ["UserError", "load_backbone"]


def load_backbone(path: str | Path) -> torch.nn.Module:
    """A pretrained backbone in eval mode, with `num_features`, from an export dir (python -m
    ssl_lab.export; or its backbone.json, .safetensors or .pt) or a pretraining run dir or .pt file."""
    from ssl_lab.export import load_backbone as load  # timm, torchvision, safetensors: only when used

    return load(path)
