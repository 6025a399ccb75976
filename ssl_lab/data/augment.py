"""Batched augmentation on the training device, with per-sample random parameters.

Images arrive as uint8 [B,3,H,W] (one copy to the device, a quarter of float32's bytes). Every random
draw happens in `sample_params`, from the caller's generator, so runs are reproducible and a resumed
run continues the same stream; `apply` is deterministic given the parameters and matches
torchvision's functional ops (tests compare them):

- random resized crop: torchvision's sampling (area fraction in `crop_scale`, log-uniform aspect
  ratio, 10 tries, then a centre crop with the ratio clamped), bilinear resize of the crop;
- horizontal flip; colour jitter with probability `jitter_p`: brightness, contrast, saturation and
  hue factors as torchvision's ColorJitter draws them, applied in a random order per sample (as
  torchvision does per image);
- grayscale (ITU-R 601 luma, as torchvision); Gaussian blur with sigma uniform in `blur_sigma` and a kernel of
  `blur_kernel_frac` of the image size (odd); solarization (values at or above `solarize_threshold`
  inverted, torchvision's solarize); then normalisation.

`views` makes the views asymmetric: the i-th view of a batch takes the settings of `views[i]` over
these (BYOL's and solo-learn's NNCLR/BYOL recipes: blur p 1.0 / 0.1, solarize p 0 / 0.2), views past
the list take these settings.

Own code rather than kornia: benchmarks/augment.py measures both in one run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ssl_lab.config import PositiveFloat, PositiveInt, Probability, check_value, parameter_hints
from ssl_lab.errors import UserError

ORDERS = torch.tensor(list(itertools.permutations(range(4))))  # jitter op orders: 24 x 4
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
CROP_TRIES = 10


def _uniform(n: int, low: float, high: float, g: torch.Generator | None, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,1,H,W]"""
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn) in HSV space, as torchvision does (to float error:
    its formulas, with fewer full-size temporaries)."""
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    chroma = maxc - minc  # = v * s, so s itself is never needed
    inv = 1.0 / torch.where(chroma == 0, 1.0, chroma)
    rc, gc, bc = (maxc - r) * inv, (maxc - g) * inv, (maxc - b) * inv
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h6 = torch.remainder(h / 6.0 + shift.view(-1, 1, 1), 1.0) * 6.0
    # back to RGB, closed form: channel n is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        channels.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1)


# Each order without hue (op 3): its three blend ops in order, and the slot hue takes among them.
BLEND_OPS = torch.stack([row[row != 3] for row in ORDERS])  # [24, 3]
HUE_SLOT = (ORDERS == 3).int().argmax(dim=1)  # [24]


def blend(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per sample, brightness (op 0), contrast (1) or saturation (2) by `factor`: x blended with black,
    its mean grey or its grey image, as torchvision's adjust_* compute them; a factor of 1 leaves the
    sample as it is (in place: x is overwritten)."""
    gray = grayscale(x)
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    op, f = op.view(-1, 1, 1, 1), factor.view(-1, 1, 1, 1)
    other = gray * (op == 2) + mean * (op == 1)  # exact: the other terms add 0
    return x.mul_(f).add_(other * (1 - f)).clamp_(0, 1)


def solarize(x: torch.Tensor, threshold: float, active: torch.Tensor) -> torch.Tensor:
    """Values at or above `threshold` inverted (1 - x) in the samples where `active`: torchvision's
    solarize on [0, 1] floats."""
    return torch.where(active.view(-1, 1, 1, 1) & (x >= threshold), 1.0 - x, x)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable blur with one sigma per sample and reflect padding (torchvision's gaussian_blur)."""
    b, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    pos = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (pos[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.view(b, c, h, w)


def resized_crop(
    x: torch.Tensor, box: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop box (top, left, height, width) of each sample, resized to size x size with bilinear
    interpolation, sampling exactly where F.interpolate(align_corners=False) samples the crop;
    `flip` mirrors the result horizontally."""
    b, _, h, w = x.shape
    top, left, ch, cw = box.to(x.dtype).unbind(1)
    o = torch.arange(size, device=x.device, dtype=x.dtype) + 0.5
    ys = top[:, None] + (o[None] * ch[:, None] / size - 0.5).clamp(min=0)
    xs = left[:, None] + (o[None] * cw[:, None] / size - 0.5).clamp(min=0)
    ys = torch.minimum(ys, (top + ch - 1)[:, None])
    xs = torch.minimum(xs, (left + cw - 1)[:, None])
    if flip is not None:
        xs = torch.where(flip[:, None], xs.flip(1), xs)
    grid_y = (ys + 0.5) / h * 2 - 1
    grid_x = (xs + 0.5) / w * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_crops(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    g: torch.Generator | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[n, 4] boxes (top, left, height, width) on a height x width image, as torchvision's
    RandomResizedCrop.get_params draws them (the decoding workers draw theirs on the full image)."""
    area = height * width
    target = area * _uniform(n * CROP_TRIES, *scale, g, device).view(n, CROP_TRIES)
    log_ratio = _uniform(n * CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), g, device)
    aspect = log_ratio.view(n, CROP_TRIES).exp()
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(dim=1)  # the first valid try
    w = w.gather(1, first[:, None])[:, 0]
    h = h.gather(1, first[:, None])[:, 0]
    found = ok.any(dim=1)
    # fallback: the whole image, cropped to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, generator=g, device=device)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), torch.full_like(h, (height - fh) // 2))
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), torch.full_like(w, (width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], size: int | None = None
) -> torch.Tensor:
    """uint8 [B,3,H,W] -> normalised float32 (resized to `size` if given): the eval transform."""
    x = images.float().div_(255)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean_t = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class Augment(torch.nn.Module):
    """One random view per call: `view = augment(uint8_batch, generator)`."""

    def __init__(
        self,
        size: PositiveInt,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: Probability = 0.5,
        jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: Probability = 0.8,
        gray_p: Probability = 0.2,
        blur_p: Probability = 0.0,
        blur_kernel_frac: PositiveFloat = 0.1,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_p: Probability = 0.0,
        solarize_threshold: Probability = 0.5,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        views: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__()
        self.settings = dict(
            size=size, crop_scale=crop_scale, crop_ratio=crop_ratio, flip_p=flip_p, jitter=jitter,
            jitter_p=jitter_p, gray_p=gray_p, blur_p=blur_p, blur_kernel_frac=blur_kernel_frac,
            blur_sigma=blur_sigma, solarize_p=solarize_p, solarize_threshold=solarize_threshold,
            mean=mean, std=std,
        )  # fmt: skip
        self.size = size
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.flip_p, self.jitter, self.jitter_p, self.gray_p = flip_p, tuple(jitter), jitter_p, gray_p
        self.blur_p, self.blur_sigma = blur_p, tuple(blur_sigma)
        self.solarize_p, self.solarize_threshold = solarize_p, solarize_threshold
        kernel = int(blur_kernel_frac * size)
        self.blur_kernel = max(3, kernel + 1 - kernel % 2)  # odd, as the SimCLR paper's 10 %
        self.mean, self.std = tuple(mean), tuple(std)
        # Constants live on the device with the module: no host-to-device copy per call.
        self.register_buffer("mean_t", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std_t", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("blend_ops", BLEND_OPS.clone(), persistent=False)
        self.register_buffer("hue_slot", HUE_SLOT.clone(), persistent=False)
        # a module list, so that the views' buffers move with this module
        self.views = torch.nn.ModuleList(
            self.variant(f"augment.views[{i}]", **dict(changes)) for i, changes in enumerate(views)
        )

    def variant(self, where: str = "the augmentation", **changes) -> Augment:
        """The same augmentation with some settings changed (e.g. a multi-crop method's small crops:
        `variant(size=96, crop_scale=(0.05, 0.4))`), each checked against this class's signature;
        `where` names them in the error."""
        hints = parameter_hints(Augment)
        for key, value in changes.items():
            if key not in self.settings:
                raise UserError(
                    f"{where}: Augment has no setting {key!r}; choose from {', '.join(self.settings)}"
                )
            check_value(f"{where}.{key}", value, hints[key][0])
        return Augment(**{**self.settings, **changes})

    def for_view(self, index: int) -> Augment:
        """The augmentation of the `index`-th view of a batch (0-based): `views[index]`'s settings over
        these, or these past the list."""
        return self.views[index] if index < len(self.views) else self

    def sample_params(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None = None, device=None
    ) -> dict[str, torch.Tensor]:
        """Per-sample parameters: every tensor has the batch as its first dimension."""
        n, g = batch_size, generator
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        params = {"crop": sample_crops(n, height, width, self.crop_scale, self.crop_ratio, g, device)}
        params["flip"] = torch.rand(n, generator=g, device=device) < self.flip_p
        b, c, s, h = self.jitter
        params["jitter"] = torch.rand(n, generator=g, device=device) < self.jitter_p
        params["factors"] = torch.stack(
            [
                _uniform(n, max(0.0, 1 - b), 1 + b, g, device),
                _uniform(n, max(0.0, 1 - c), 1 + c, g, device),
                _uniform(n, max(0.0, 1 - s), 1 + s, g, device),
                _uniform(n, -h, h, g, device),
            ],
            dim=1,
        )
        params["order"] = torch.randint(len(ORDERS), (n,), generator=g, device=device)
        params["gray"] = torch.rand(n, generator=g, device=device) < self.gray_p
        params["blur"] = torch.rand(n, generator=g, device=device) < self.blur_p
        params["sigma"] = _uniform(n, *self.blur_sigma, g, device)
        if self.solarize_p > 0:  # drawn only then, so recipes without it keep their random stream
            params["solarize"] = torch.rand(n, generator=g, device=device) < self.solarize_p
        return params

    def apply(
        self, images: torch.Tensor, params: dict[str, torch.Tensor], cropped: bool = False
    ) -> torch.Tensor:
        """Branch-free: every op runs on the whole batch and `torch.where` keeps it for the samples
        whose parameters ask for it, so nothing depends on the data's values (no host sync on a GPU,
        no data-dependent shapes: the whole function compiles as one graph). `cropped`: the images
        are this view's crops already (decoding workers crop large images, `crop_views`), so only
        the flip is left of the geometric part."""
        if cropped:
            x = images.float().div_(255)
            x = torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
        else:
            x = resized_crop(images.float().div_(255), params["crop"], self.size, params["flip"])
        x = self.color_jitter(x, params["jitter"], params["factors"], params["order"])
        x = torch.where(params["gray"].view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        if self.blur_p > 0:  # a setting, not data
            blurred = gaussian_blur(x, self.blur_kernel, params["sigma"])
            x = torch.where(params["blur"].view(-1, 1, 1, 1), blurred, x)
        if self.solarize_p > 0:
            x = solarize(x, self.solarize_threshold, params["solarize"])
        return (x - self.mean_t) / self.std_t

    def color_jitter(
        self, x: torch.Tensor, jitter: torch.Tensor, factors: torch.Tensor, order: torch.Tensor
    ) -> torch.Tensor:
        """Brightness, contrast, saturation and hue in each sample's own order. The first three are
        blends with black, the mean grey or the grey image (torchvision's formulas), so a sample's
        order is: its blends before hue, hue, its blends after: six batched blend passes and one hue."""
        blend_ops, hue_slot = self.blend_ops[order], self.hue_slot[order]  # [B, 3], [B]
        blend_factors = factors.gather(1, blend_ops)
        slots = torch.arange(3, device=x.device)
        before = jitter[:, None] & (slots[None] < hue_slot[:, None])  # [B, 3]
        after = jitter[:, None] & (slots[None] >= hue_slot[:, None])
        for active in (before, after):
            for i in range(3):  # samples not in this pass get factor 1: unchanged
                x = blend(x, blend_ops[:, i], torch.where(active[:, i], blend_factors[:, i], 1.0))
            if active is before:
                x = torch.where(jitter.view(-1, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)
        return x

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = images.shape
        return self.apply(images, self.sample_params(b, h, w, generator, device=images.device))
