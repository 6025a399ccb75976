"""I-JEPA (Assran et al., 2023): from the patches of a large context block, a narrow ViT predictor
predicts the representations that a momentum target encoder gives to 4 target blocks of the same
image (layer-normalised), in latent space, with no augmentation beyond the crop. facebookresearch/ijepa:
src/train.py, src/masks/multiblock.py, src/models/vision_transformer.py, src/helper.py and
configs/in1k_vith14_ep300.yaml.

The blocks' sizes vary from image to image, so the context and target patches travel in fixed-shape
lists padded to the largest size the settings allow, the padding hidden from attention
(parts.key_padding_mask) and from the loss: no host sync and one compiled graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from ssl_lab import distributed
from ssl_lab.config import PositiveInt, Probability
from ssl_lab.errors import UserError
from ssl_lab.methods.base import Method
from ssl_lab.methods.mae import sincos_pos_embed, transformer_init
from ssl_lab.methods.masks import block_size, first_true, multiblock_masks, multiblock_noise
from ssl_lab.methods.parts import (
    MomentumTeacher,
    check_vit,
    key_padding_mask,
    vit_tokens,
)
from ssl_lab.methods.parts import crop_scale as check_crop_scale

# helper.py's init_model: MAE's, with every Linear truncated-normal (std 0.02)
ijepa_init = partial(transformer_init, linear_init=partial(nn.init.trunc_normal_, std=0.02))


class IJEPAPredictor(nn.Module):
    """vision_transformer.py's VisionTransformerPredictor: the context tokens projected to `dim` with a
    fixed sine-cosine position embedding, one mask token (plus its position) per target patch,
    `depth` Transformer blocks over both, and the target tokens projected back to the encoder's width."""

    def __init__(
        self, in_dim: int, grid: tuple[int, int], dim: int = 384, depth: int = 12, heads: int = 12,
        mlp_ratio: float = 4.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid)[0], persistent=False)  # [N, dim]
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(dim)
        self.proj = nn.Linear(dim, in_dim)
        self.apply(ijepa_init)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(
        self, context: torch.Tensor, context_idx: torch.Tensor, context_valid: torch.Tensor,
        target_idx: torch.Tensor, target_valid: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """context [B, C, in_dim] at patches `context_idx` [B, C] (`context_valid`: which are real);
        targets `target_idx` [B, T, P] (`target_valid`). Returns the predictions [B, T, P, in_dim],
        each image's T target blocks predicted apart (the context repeated, as the official
        x.repeat(npred, 1, 1))."""
        b, t, p = target_idx.shape
        x = self.embed(context) + self.pos_embed[context_idx].to(context.dtype)
        x = x.repeat_interleave(t, dim=0)  # [B*T, C, dim]: image-major
        queries = self.mask_token.to(x.dtype) + self.pos_embed[target_idx.flatten(0, 1)].to(x.dtype)
        x = torch.cat([x, queries], dim=1)
        valid = torch.cat([context_valid.repeat_interleave(t, dim=0), target_valid.flatten(0, 1)], dim=1)
        mask = key_padding_mask(valid)
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return self.proj(self.norm(x[:, -p:])).view(b, t, p, -1)


def ijepa_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """train.py's loss: the smooth L1 (beta 1) between the predictions and the target encoder's
    layer-normalised outputs (`target`, detached), averaged over every real target patch and feature
    of the global batch (`valid` [..., P]: the padding counts for nothing). The official mean is per
    process, then averaged over processes, with the same patch count everywhere; here the counts vary
    by image, so the sum is over this process's patches and the count over all (a collective, no
    sync), and DDP's gradient average gives the global mean on 1 and N processes alike. fp32."""
    with torch.autocast(pred.device.type, enabled=False):
        per_patch = F.smooth_l1_loss(pred.float(), target.detach().float(), reduction="none").mean(-1)
        count = distributed.total(valid.float().sum()) / distributed.world_size()
        return (per_patch * valid).sum() / count.clamp_min(1.0)


class IJEPA(Method):
    name = "ijepa"
    evaluated = "teacher.backbone"  # the target encoder, its patch tokens averaged (`pool`)
    evaluated_head = None

    def __init__(
        self,
        backbone: nn.Module,
        pred_dim: PositiveInt = 384,
        pred_depth: PositiveInt = 12,
        num_targets: PositiveInt = 4,
        target_scale: Sequence[float] = (0.15, 0.2),
        target_aspect: Sequence[float] = (0.75, 1.5),
        context_scale: Sequence[float] = (0.85, 1.0),
        min_keep: PositiveInt = 10,
        momentum_base: Probability = 0.996,
        momentum_end: Probability = 1.0,
        crop_scale: Sequence[float] | None = (0.3, 1.0),
        pool: str | None = "avg",
        fixed_pos_embed: bool = True,
        name: str = "ijepa",
    ) -> None:
        """The paper's defaults (in1k_vith14_ep300.yaml): a predictor 384 wide and 12 blocks deep (as
        many heads as the encoder), 4 target blocks at scale 0.15-0.2 and aspect 0.75-1.5, a context
        block at scale 0.85-1, a target encoder at momentum linear from 0.996 to 1, one view cropped at
        scale 0.3-1 with no flip and no colour augmentation. `pool`: how the evaluated target encoder
        pools its tokens ("avg": the mean of the patch tokens, the paper's evaluation; null: the
        backbone's own). `fixed_pos_embed`: the encoder's position embedding the fixed sine-cosine one
        (vision_transformer.py)."""
        check_vit(backbone, "ijepa")
        if pool is not None:
            if pool not in ("avg", "token"):
                raise UserError(
                    f"method.pool={pool!r}: choose avg (the paper), token ([CLS]) or null (the backbone's)"
                )
            if pool == "token" and getattr(backbone, "cls_token", None) is None:
                raise UserError(
                    "method.pool=token reads the [CLS] token, which this ViT has not "
                    "(backbone.kwargs.class_token=false): use method.pool=avg"
                )
            backbone.global_pool = pool
        super().__init__(backbone, concat_views=True)
        embed = backbone.patch_embed
        self.grid = tuple(embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        heads = backbone.blocks[0].attn.num_heads
        if pred_dim % heads:
            raise UserError(
                f"method.pred_dim={pred_dim} is not divisible by the encoder's {heads} heads, which the predictor "
                f"shares (the paper: 384 with 16); choose a multiple of {heads}"
            )
        self.num_targets, self.min_keep = num_targets, min_keep
        self.scales = (
            _pair("target_scale", target_scale), _pair("target_aspect", target_aspect, upper=None),
            _pair("context_scale", context_scale),
        )  # fmt: skip
        # the most patches a target or context block can take: the fixed lengths of their lists
        u = torch.linspace(0, 1, 100_001)
        h, w = block_size(u, self.grid, self.scales[0], self.scales[1])
        self.target_budget = int((h * w).max())
        h, w = block_size(u, self.grid, self.scales[2], (1.0, 1.0))
        self.context_budget = int((h * w).max())
        self.crop_scale = check_crop_scale("crop_scale", crop_scale)
        if fixed_pos_embed and backbone.pos_embed is not None:
            prefix = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
            backbone.pos_embed.data.copy_(sincos_pos_embed(backbone.pos_embed.shape[-1], self.grid, prefix))
            backbone.pos_embed.requires_grad_(False)
        self.predictor = IJEPAPredictor(self.num_features, self.grid, pred_dim, pred_depth, heads)
        self.teacher = MomentumTeacher({"backbone": backbone}, momentum_base, momentum_end, linear=True)

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """One view, cropped, with no flip and no colour augmentation (train.py's make_transforms with
        the configs' settings), then the noise of its blocks."""
        changes: dict = {"flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
        if self.crop_scale is not None:
            changes["crop_scale"] = self.crop_scale
        return [draw(**changes), draw.noise(multiblock_noise(self.num_targets))]

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images, noise = views
        if images.shape[-1] != self.grid[1] * self.backbone.patch_embed.patch_size[1]:
            raise UserError(
                f"method=ijepa: the view is {images.shape[-1]} px but the ViT was built for "
                f"{self.grid[1] * self.backbone.patch_embed.patch_size[1]} px; set backbone.image_size to the "
                "augmentation's size"
            )
        targets, context = multiblock_masks(
            noise, self.grid, self.num_targets, *self.scales, min_keep=self.min_keep
        )
        context_idx, context_valid = first_true(context, self.context_budget)
        target_idx, target_valid = first_true(targets, self.target_budget)  # [B, T, P]
        encoded = vit_tokens(self.backbone, images, keep=context_idx, valid=context_valid).patches
        pred = self.predictor(encoded, context_idx, context_valid, target_idx, target_valid)
        with torch.no_grad():
            h = vit_tokens(self.teacher.backbone, images).patches
            h = F.layer_norm(h.float(), (h.shape[-1],))
            b, t, p = target_idx.shape
            target = torch.gather(h, 1, target_idx.reshape(b, t * p, 1).expand(-1, -1, h.shape[-1]))
        loss = ijepa_loss(pred, target.view(b, t, p, -1), target_valid.float())
        return {
            "loss": loss,
            "context_patches": context_valid.float().sum(1).mean(),
            "target_patches": target_valid.float().sum(2).mean(),
            "momentum": self.teacher.momentum.clone(),
        }

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update({"backbone": self.backbone}, step, total_steps)


def _pair(key: str, value: Sequence[float], upper: float | None = 1.0) -> tuple[float, float]:
    if len(value) != 2 or not 0 < value[0] <= value[1] or (upper is not None and value[1] > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise UserError(f"method.{key}={list(value)} must be [min, max] with 0 < min <= max{bound}")
    return float(value[0]), float(value[1])
