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
