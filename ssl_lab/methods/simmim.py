"""SimMIM (Xie et al., 2022): masked image modelling with a simple recipe. A learnt mask token replaces
random 32 px squares of the image (60 % of them) at the encoder's input; a linear layer predicts each
masked patch's pixels from its output token; the loss is L1 on the masked pixels only
(microsoft/SimMIM: models/simmim.py, data/data_simmim.py, configs/vit_base__800ep)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ssl_lab.config import PositiveInt, Probability
from ssl_lab.errors import UserError
from ssl_lab.methods.base import Method
from ssl_lab.methods.mae import patchify
from ssl_lab.methods.masks import random_mask
from ssl_lab.methods.parts import check_vit, vit_tokens
from ssl_lab.methods.parts import crop_scale as check_crop_scale


def simmim_loss(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """models/simmim.py's loss: the absolute error between the predicted and the (normalised) input
    pixels, summed over the masked patches' pixels and channels, divided by the masked pixel count
    (+1e-5) and the 3 channels: the mean absolute error over the masked pixels. `pred` [B, N, p*p*3] in
    patchify's order; `mask` [B, N] (True: masked). fp32, autocast off."""
    with torch.autocast(pred.device.type, enabled=False):
        target = patchify(images.float(), patch_size)
        error = (pred.float() - target).abs().sum(dim=-1)  # [B, N]: over the patch's pixels and channels
        masked_pixels = mask.float().sum() * patch_size**2
        return (error * mask).sum() / (masked_pixels + 1e-5) / images.shape[1]


class SimMIM(Method):
    name = "simmim"
    evaluated_head = None  # nothing to fine-tune from but the encoder

    def __init__(
        self,
        backbone: nn.Module,
        mask_ratio: Probability = 0.6,
        mask_patch_size: PositiveInt | None = None,
        crop_scale: Sequence[float] | None = (0.67, 1.0),
        colour_augment: bool = False,
        name: str = "simmim",
    ) -> None:
        """The paper's ViT-B/16 settings (configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep
        .yaml): 60 % of the 32 px mask patches masked, one view cropped at scale 0.67-1 (aspect 3/4-4/3)
        and flipped, no colour augmentation (data_simmim.py). `mask_patch_size` is in pixels and a
        multiple of the ViT's patch; None: twice the patch (the paper's 32 over 16 px patches; 8 px for
        vit_tiny's 4 px patches at 32 px)."""
        check_vit(backbone, "simmim")
        super().__init__(backbone, concat_views=True)
        self.patch_size = backbone.patch_embed.patch_size[0]
        mask_patch_size = mask_patch_size or 2 * self.patch_size
        grid = tuple(backbone.patch_embed.grid_size)
        if mask_patch_size % self.patch_size or any(g * self.patch_size % mask_patch_size for g in grid):
            raise UserError(
                f"method.mask_patch_size={mask_patch_size} must be a multiple of the ViT's {self.patch_size} px "
                f"patch that divides its {grid[0] * self.patch_size} px input (SimMIM: 32 over 16 px patches "
                f"at 224 px; e.g. 8 at 32 px with 4 px patches)"
            )
        self.scale = mask_patch_size // self.patch_size
        self.mask_grid = (grid[0] // self.scale, grid[1] // self.scale)
        cells = self.mask_grid[0] * self.mask_grid[1]
        self.num_masked = int(math.ceil(cells * mask_ratio))  # data_simmim.py's mask_count
        if not 0 < self.num_masked < cells:
            raise UserError(
                f"method.mask_ratio={mask_ratio} masks {self.num_masked} of the {cells} mask patches: it "
                f"must mask at least one and leave one (SimMIM: 0.6)"
            )
        self.crop_scale = check_crop_scale("crop_scale", crop_scale)
        self.colour_augment = colour_augment
        self.mask_token = nn.Parameter(torch.zeros(1, self.num_features))
        trunc_normal_(self.mask_token, std=0.02)  # models/simmim.py
        # The paper's decoder: a 1x1 convolution to stride^2 x 3 values and a pixel shuffle, the same as
        # this linear layer on each patch token in patchify's pixel order.
        self.decoder = nn.Linear(self.num_features, self.patch_size**2 * 3)

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """One view, then the noise that decides which mask patches it masks (the run's stream)."""
        changes: dict = {"crop_ratio": (3 / 4, 4 / 3)}
        if self.crop_scale is not None:
            changes["crop_scale"] = self.crop_scale
        if not self.colour_augment:
            changes.update(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
        return [draw(**changes), draw.noise(self.mask_grid[0] * self.mask_grid[1])]

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images, noise = views
        mask = random_mask(noise, self.num_masked, self.mask_grid, self.scale)
        tokens = vit_tokens(self.backbone, images, mask=mask, mask_token=self.mask_token)
        loss = simmim_loss(self.decoder(tokens.patches), images, mask, self.patch_size)
        return {"loss": loss}
