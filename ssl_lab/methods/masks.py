"""Token masks for the masked-image methods, made on the device from uniform noise that the method asks
the run's random stream for (`draw.noise`, Method.views): a sample's mask is the same whatever the
number of processes and continues exactly on resume, as its views do. No host sync: every mask is
made with tensor operations of fixed shapes, so a compiled step traces it whole.

- `block_mask`: BEiT's, iBOT's and DINOv2's random rectangles of patches added until a target number
  of patches is masked (dinov2/data/masking.py MaskingGenerator; lightly's random_block_mask).
- `random_mask`: a fixed number of patches per image, each subset equally likely (MAE's and SimMIM's),
  optionally at a coarser grid of mask patches (SimMIM's 32 px mask patches over 16 px model patches).
- `sample_ratios`: which images of a batch are masked and how much (DINOv2's and iBOT's
  mask_probability and mask_ratio_min_max); `view_mask` puts the two together for one view.
"""

from __future__ import annotations

import math

import torch

from ssl_lab.errors import UserError

# Candidate rectangles drawn per image by `block_mask` (DINOv2's generator tries until the target is
# reached or 10 tries in a row fail): 32 reach 98-100 % of the target at its settings.
BLOCK_CANDIDATES = 32
VIEW_NOISE = 2 + 4 * BLOCK_CANDIDATES  # the noise values of one view's `view_mask`


def block_mask(
    noise: torch.Tensor,
    grid: tuple[int, int],
    num_masked: torch.Tensor,
    min_patches: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """Masks [B, H*W] (True: masked) of rectangles of patches, from `noise` [B, K, 4] uniform in [0, 1)
    (K candidate rectangles per image: area, aspect ratio, top, left) on a `grid` (H, W), each image
    masking at most `num_masked` [B] patches (0: none).

    DINOv2's MaskingGenerator, candidate by candidate: an area uniform between `min_patches` and the
    patches still to mask, a log-uniform aspect ratio (h / w) in `aspect`, h and w rounded from them,
    a uniform position; the rectangle is added if it fits in the grid (h < H, w < W, as DINOv2's) and
    masks at least one new patch but no more than are still to mask. DINOv2 stops after 10 failed
    tries in a row; here every image gets its K candidates."""
    b, k, _ = noise.shape
    h_grid, w_grid = grid
    device = noise.device
    rows = torch.arange(h_grid, device=device).view(1, h_grid, 1)
    cols = torch.arange(w_grid, device=device).view(1, 1, w_grid)
    mask = torch.zeros(b, h_grid, w_grid, dtype=torch.bool, device=device)
    count = torch.zeros(b, device=device)
    target = num_masked.to(device=device, dtype=torch.float32)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for i in range(k):
        u = noise[:, i].float()
        remaining = target - count
        area = min_patches + u[:, 0] * (remaining - min_patches)  # random.uniform(min_patches, remaining)
        ratio = torch.exp(log_lo + u[:, 1] * (log_hi - log_lo))
        h, w = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
        top = torch.floor(u[:, 2] * (h_grid - h + 1))  # random.randint(0, H - h)
        left = torch.floor(u[:, 3] * (w_grid - w + 1))
        block = (rows >= top.view(b, 1, 1)) & (rows < (top + h).view(b, 1, 1))
        block = block & (cols >= left.view(b, 1, 1)) & (cols < (left + w).view(b, 1, 1))
        new = (block & ~mask).sum(dim=(1, 2)).float()
        accept = (h < h_grid) & (w < w_grid) & (new > 0) & (new <= remaining)
        mask = mask | (block & accept.view(b, 1, 1))
        count = count + new * accept
    return mask.flatten(1)


def random_mask(
    noise: torch.Tensor, num_masked: int, grid: tuple[int, int] | None = None, scale: int = 1
) -> torch.Tensor:
    """Masks [B, N] with exactly `num_masked` of the N mask patches of each image masked, the ones of
    the highest `noise` [B, N] (MAE's random_masking, which keeps the lowest; SimMIM's permutation). With `scale` > 1, `grid` (H,
    W) is that of the mask patches and each covers scale x scale model patches: [B, H*scale * W*scale]
    in the model's row-major patch order (SimMIM's mask_patch_size / model_patch_size)."""
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    mask = rank >= noise.shape[1] - num_masked
    if scale == 1:
        return mask
    if grid is None:
        raise ValueError("random_mask: a grid is needed to scale the mask")
    h, w = grid
    mask = mask.view(-1, h, 1, w, 1).expand(-1, h, scale, w, scale)
    return mask.reshape(mask.shape[0], h * scale * w * scale)


def sample_ratios(noise: torch.Tensor, probability: float, ratio: tuple[float, float]) -> torch.Tensor:
    """From `noise` [B, 2]: each image masked with `probability`, at a fraction uniform in `ratio`
    (DINOv2's mask_probability 0.5 and mask_ratio_min_max (0.1, 0.5); iBOT's pred_ratio 0.3 +- 0.2);
    0 for the images left unmasked. DINOv2 spreads the fractions evenly over the batch (a linspace, then
    shuffled) and masks exactly half of it; here each image draws its own: the same distribution per
    image, drawn per sample so that it does not depend on how the batch is split over processes."""
    lo, hi = ratio
    if not 0 <= lo <= hi < 1:
        raise UserError(f"a mask ratio range {list(ratio)} must be [min, max] with 0 <= min <= max < 1")
    fraction = lo + noise[:, 1] * (hi - lo)
    return torch.where(noise[:, 0] < probability, fraction, torch.zeros_like(fraction))


def view_mask(
    noise: torch.Tensor,
    grid: tuple[int, int],
    probability: float,
    ratio: tuple[float, float],
    min_patches: int,
    aspect: tuple[float, float],
) -> torch.Tensor:
    """The block masks [B, H*W] of one view from its noise [B, VIEW_NOISE] (iBOT's and DINOv2's masking
    of a global crop): masked with `probability`, a target of int(fraction * H * W) patches with the
    fraction uniform in `ratio` (`sample_ratios`), in rectangles (`block_mask`)."""
    fraction = sample_ratios(noise[:, :2], probability, ratio)
    count = torch.floor(fraction * grid[0] * grid[1])
    rectangles = noise[:, 2:].reshape(noise.shape[0], BLOCK_CANDIDATES, 4)
    return block_mask(rectangles, grid, count, min_patches, aspect)


def block_size(
    u: torch.Tensor, grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA's _sample_block_size from one uniform `u` per block (the official code draws one for both
    the scale and the aspect ratio): a target of int(H W s) patches, s uniform in `scale`, an aspect
    ratio h / w uniform in `aspect`, h and w rounded from them and shrunk to fit inside the grid
    (h < H, w < W). Returns h and w as float tensors of u's shape."""
    h_grid, w_grid = grid
    s = scale[0] + u.float() * (scale[1] - scale[0])
    area = torch.floor(h_grid * w_grid * s)
    ratio = aspect[0] + u.float() * (aspect[1] - aspect[0])
    h = torch.round(torch.sqrt(area * ratio)).clamp(1, h_grid - 1)
    w = torch.round(torch.sqrt(area / ratio)).clamp(1, w_grid - 1)
    return h, w


def rectangle(
    h: torch.Tensor, w: torch.Tensor, u_top: torch.Tensor, u_left: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Masks [..., H*W] (True inside) of h x w rectangles at a uniform position (randint(0, H - h),
    randint(0, W - w), from uniform noise), for sizes of any leading shape."""
    h_grid, w_grid = grid
    top, left = torch.floor(u_top * (h_grid - h)), torch.floor(u_left * (w_grid - w))
    rows = torch.arange(h_grid, device=h.device).view(*([1] * h.dim()), h_grid, 1)
    cols = torch.arange(w_grid, device=h.device).view(*([1] * h.dim()), 1, w_grid)
    top, left, h, w = (x.unsqueeze(-1).unsqueeze(-1) for x in (top, left, h, w))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return inside.flatten(-2)


def multiblock_masks(
    noise: torch.Tensor,
    grid: tuple[int, int],
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_keep: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA's multi-block masks (src/masks/multiblock.py) from `noise` [B, multiblock_noise(num_targets)]:
    `num_targets` target rectangles of one size per image (scale `target_scale`, aspect
    `target_aspect`) and a square context rectangle (scale `context_scale`) from which every target
    patch is removed. Returns the targets [B, num_targets, H*W] and the context [B, H*W] (True: in).

    Where the official collator draws the block sizes once per batch of a process, here each image
    draws its own (the same distribution, independent of how the batch is split over processes); a
    context left with `min_keep` patches or fewer keeps its targets' patches (the official collator
    resamples, then lets targets overlap the context after 20 failures)."""
    b = noise.shape[0]
    u = noise.float()
    h, w = block_size(u[:, 0], grid, target_scale, target_aspect)
    positions = u[:, 1 : 1 + 2 * num_targets].view(b, num_targets, 2)
    targets = rectangle(
        h[:, None].expand(b, num_targets),
        w[:, None].expand(b, num_targets),
        positions[..., 0],
        positions[..., 1],
        grid,
    )  # [B, T, H*W]
    c = 1 + 2 * num_targets
    ch, cw = block_size(u[:, c], grid, context_scale, (1.0, 1.0))
    block = rectangle(ch, cw, u[:, c + 1], u[:, c + 2], grid)  # [B, H*W]
    context = block & ~targets.any(dim=1)
    enough = context.sum(dim=1, keepdim=True) > min_keep
    return targets, torch.where(enough, context, block)


def multiblock_noise(num_targets: int) -> int:
    """The noise values per image that `multiblock_masks` reads."""
    return 1 + 2 * num_targets + 3


def first_true(mask: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices [..., budget] of `mask`'s True entries [..., N] in ascending order, padded with False
    ones, and which of them are True: a fixed-shape list of a variable number of patches (the
    official code's torch.nonzero, which would wait for the host)."""
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :budget]
    return order, torch.gather(mask, -1, order)
