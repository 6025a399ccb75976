"""MAE (He et al., 2022): masked autoencoders. A ViT encoder sees only a random 25 % of an image's
patches; a light decoder fills in mask tokens and predicts the pixels of the masked ones, each patch
normalised by its own mean and variance (facebookresearch/mae, models_mae.py and main_pretrain.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from ssl_lab.config import PositiveInt, Probability
from ssl_lab.errors import UserError
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import check_vit, vit_tokens
from ssl_lab.methods.parts import crop_scale as check_crop_scale


def sincos_pos_embed(dim: int, grid: tuple[int, int], prefix_tokens: int = 0) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embedding, [1, prefix_tokens + h * w, dim]: half of the
    channels encode the column, half the row, each as sin and cos at frequencies 1 / 10000^(i / (dim/4));
    zeros for the prefix ([CLS]) tokens (models_mae.py's get_2d_sincos_pos_embed)."""
    if dim % 4:
        raise UserError(f"MAE's sine-cosine position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    angles = [coord.reshape(-1, 1) * omega for coord in (cols, rows)]  # the official order: w, then h
    embed = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return torch.cat([torch.zeros(prefix_tokens, dim, dtype=torch.float64), embed]).float().unsqueeze(0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches in row-major order, pixels (row, column, channel)
    within each: the encoder's patch order and models_mae.py's (and lightly's utils.patchify)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch_size) * (w // patch_size), -1)


def mae_loss(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = True
) -> torch.Tensor:
    """The mean squared error over the masked patches (mask: 1 masked, 0 visible) of each image, against
    its pixels, each patch normalised to zero mean and unit (unbiased) variance with `norm_pix` (the
    paper's better target; models_mae.py's forward_loss). In fp32 with autocast off."""
    with torch.autocast(pred.device.type, enabled=False):
        target = patchify(images.float(), patch_size)
        if norm_pix:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6).sqrt()
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()


def random_masking(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From per-patch uniform noise [B, N]: the kept patches' indices [B, keep] (the lowest noise), the
    order that puts the shuffled tokens back [B, N], and the mask [B, N] (1 masked). Sorting, no
    boolean indexing: nothing waits for the host."""
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    return shuffle[:, :keep], restore, (restore >= keep).float()


def transformer_init(
    module: nn.Module, linear_init: Callable[[torch.Tensor], object] = nn.init.xavier_uniform_
) -> None:
    """models_mae.py's initialisation, for `module.apply`: Linear weights by `linear_init` (MAE's
    Xavier-uniform; I-JEPA's truncated normal, std 0.02) with zero bias, LayerNorms 1 and 0."""
    if isinstance(module, nn.Linear):
        linear_init(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAEDecoder(nn.Module):
    """The light decoder: the encoded tokens projected to `dim`, mask tokens in the masked patches'
    places, a fixed sine-cosine position embedding, `depth` Transformer blocks, and a linear prediction
    of each patch's p*p*3 pixels."""

    def __init__(
        self, in_dim: int, grid: tuple[int, int], patch_size: int, prefix_tokens: int = 1,
        dim: int = 512, depth: int = 8, heads: int = 16, mlp_ratio: float = 4.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.prefix_tokens = prefix_tokens
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid, prefix_tokens), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        )
        self.norm = norm(dim)
        self.predict = nn.Linear(dim, patch_size**2 * 3)
        self.apply(transformer_init)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """tokens: the encoder's [B, prefix + kept, in_dim]; restore: [B, N]. Returns [B, N, p*p*3]."""
        x = self.embed(tokens)
        prefix, visible = x[:, : self.prefix_tokens], x[:, self.prefix_tokens :]
        masked = self.mask_token.expand(x.shape[0], restore.shape[1] - visible.shape[1], -1).to(x.dtype)
        patches = torch.gather(
            torch.cat([visible, masked], dim=1), 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        )
        x = torch.cat([prefix, patches], dim=1) + self.pos_embed
        return self.predict(self.norm(self.blocks(x)))[:, self.prefix_tokens :]


class MAE(Method):
    name = "mae"
    evaluated_head = None  # nothing to fine-tune from but the encoder

    def __init__(
        self,
        backbone: nn.Module,
        mask_ratio: Probability = 0.75,
        decoder_dim: PositiveInt = 512,
        decoder_depth: PositiveInt = 8,
        decoder_heads: PositiveInt = 16,
        norm_pix_loss: bool = True,
        crop_scale: Sequence[float] | None = (0.2, 1.0),
        colour_augment: bool = False,
        init_encoder: bool = True,
        name: str = "mae",
    ) -> None:
        """The paper's defaults (ViT-L/16 on ImageNet): 75 % of the patches masked, a decoder 512 wide
        and 8 blocks deep with 16 heads, the per-patch normalised pixel target, one view cropped at
        scale 0.2-1 and flipped, with no colour augmentation (main_pretrain.py; the paper's table 1e:
        colour jitter hurts). `colour_augment=true` keeps the augmentation recipe's photometric ops;
        `crop_scale: null` its crop scale. `init_encoder`: the encoder re-initialised as models_mae.py
        does (Xavier-uniform Linears and patch projection, [CLS] N(0, 0.02)) with its position
        embedding the fixed sine-cosine one (not learnt)."""
        check_vit(backbone, "mae")  # its encoder sees only the visible patches
        super().__init__(backbone, concat_views=True)
        embed = backbone.patch_embed
        self.patch_size, self.grid = embed.patch_size[0], tuple(embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        if tuple(embed.img_size) != tuple(g * self.patch_size for g in self.grid):
            raise UserError(
                f"method=mae: the ViT's {embed.img_size[0]} px input is not a whole number of its "
                f"{self.patch_size} px patches, so the pixel target cannot be cut into patches: set "
                f"data.image_size (or backbone.image_size) to a multiple of {self.patch_size}"
            )
        if decoder_dim % decoder_heads:
            raise UserError(
                f"method.decoder_dim={decoder_dim} is not divisible by method.decoder_heads={decoder_heads}: "
                f"each head takes an equal share of the width (the paper: 512 and 16)"
            )
        self.keep = int(self.num_patches * (1 - mask_ratio))  # models_mae.py's len_keep
        if not 1 <= self.keep < self.num_patches:
            raise UserError(
                f"method.mask_ratio={mask_ratio} leaves {self.keep} of the {self.num_patches} patches "
                f"visible: it must keep at least one visible and one masked (e.g. 0.75)"
            )
        self.norm_pix_loss, self.colour_augment = norm_pix_loss, colour_augment
        self.crop_scale = check_crop_scale("crop_scale", crop_scale)
        if init_encoder:
            self.init_encoder(backbone)
        self.decoder = MAEDecoder(
            self.num_features, self.grid, self.patch_size, backbone.num_prefix_tokens,
            decoder_dim, decoder_depth, decoder_heads,
        )  # fmt: skip

    def init_encoder(self, vit: VisionTransformer) -> None:
        vit.apply(transformer_init)
        w = vit.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
        if vit.cls_token is not None:
            nn.init.normal_(vit.cls_token, std=0.02)
        if vit.pos_embed is not None:
            prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
            vit.pos_embed.data.copy_(sincos_pos_embed(vit.pos_embed.shape[-1], self.grid, prefix))
            vit.pos_embed.requires_grad_(False)
        if vit.reg_token is not None:
            trunc_normal_(vit.reg_token, std=0.02)

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """One view, then the per-patch noise that decides its mask (drawn with the views' stream for
        the global batch: a sample's mask does not depend on the number of processes)."""
        changes: dict = {} if self.crop_scale is None else {"crop_scale": self.crop_scale}
        if not self.colour_augment:
            changes.update(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
        return [draw(**changes), draw.noise(self.num_patches)]

    def encode_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The encoder on the kept patches only: [B, prefix + kept, D] (timm's forward_features with the
        masked patches dropped after the position embedding is added)."""
        return vit_tokens(self.backbone, images, keep=keep).sequence

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images, noise = views
        if noise.shape[1] != self.num_patches or images.shape[-1] != self.grid[1] * self.patch_size:
            raise UserError(
                f"method=mae: the view is {images.shape[-1]} px but the ViT was built for "
                f"{self.grid[1] * self.patch_size} px; set backbone.image_size to the augmentation's size"
            )
        keep, restore, mask = random_masking(noise, self.keep)
        pred = self.decoder(self.encode_visible(images, keep), restore)
        loss = mae_loss(pred, images, mask, self.patch_size, self.norm_pix_loss)
        return {"loss": loss}
