"""Augmentation and training-step throughput, side by side in one run.

    python benchmarks/augment.py [--batch 256] [--size 32] [--iters 10] [--device cpu|cuda]

Measures, on the same uint8 batch (img/s = source images per second, two views each):
  own        ssl_lab.data.augment.Augment (simclr_cifar / simclr_imagenet recipes), batched
  kornia     the same recipe with kornia.augmentation (per-sample parameters too)
  pil        torchvision transforms on PIL images one by one, as lightly's examples do (1 worker)
  step       model step alone (two views given), and the full ssl_lab step (augment + step)
and prints the ratios. Timings on shared machines are noisy: compare within one run.

Measured 2026-11-25 on the 2-core CPU dev machine (torch 2.14.1, 2 threads), two runs of

    python benchmarks/augment.py --backbone test_resnet --iters 10

      own simclr_cifar               11741 / 10532 img/s   (branch-free, issue 11)
      grouped simclr_cifar           10092 /  9664 img/s   (the code before issue 11, kept below)
      kornia simclr_cifar             4625 /  4755 img/s
      pil simclr_cifar                1255 /  1273 img/s
      own simclr_imagenet             8319 /  9733 img/s
      grouped simclr_imagenet         7873 /  7887 img/s
      simclr_cifar:    own / grouped (before) = 1.16x / 1.09x, own / kornia = 2.54x / 2.21x
      simclr_imagenet: own / grouped (before) = 1.06x / 1.23x, own / kornia = 2.00x / 2.72x
      step (test_resnet): full ssl_lab step = 90% / 97% of the model step alone

The own code is branch-free since issue 11: every op runs on the whole batch and torch.where keeps it
where a sample's parameters ask for it (no .any(), nonzero() or boolean-mask indexing: on a GPU each was
a host sync), colour jitter as each sample's blends before hue, hue, its blends after (six batched
blends, one hue), constants as buffers; it compiles with fullgraph=True. That alone measured 0.64-0.82x
of the grouped code on this CPU (hue on every sample, six blend passes); a leaner hue (one aminmax,
chroma for v*s, where-chains for the hue sector: 8.1 -> 4.5 ms per 256 images) made it faster than
before. It stays equal to torchvision's functional ops (tests/test_augment.py, a mixed batch of all 24
jitter orders sample by sample). Earlier (2026-11-24): grouping by op per slot and the closed-form
HSV->RGB gave 2.5x over per-order groups.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ssl_lab.data.augment import ORDERS, Augment, gaussian_blur, grayscale, resized_crop

JITTER = (0.4, 0.4, 0.4, 0.1)


def timed(fn: Callable[[], object], iters: int, warmup: int = 2, device: str = "cpu") -> float:
    """Median seconds per call."""
    times = []
    for i in range(warmup + iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def kornia_pipeline(size: int, blur: bool, mean, std) -> torch.nn.Module:
    import kornia.augmentation as K

    ops = [
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(*JITTER, p=0.8),
        K.RandomGrayscale(p=0.2),
    ]
    if blur:
        k = max(3, int(0.1 * size) + 1 - int(0.1 * size) % 2)
        ops.append(K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.5))
    ops.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    return K.AugmentationSequential(*ops)


def pil_pipeline(size: int, blur: bool, mean, std) -> Callable:
    from torchvision import transforms as T

    ops = [
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(*JITTER)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur:
        k = max(3, int(0.1 * size) + 1 - int(0.1 * size) % 2)
        ops.append(T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=0.5))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


# The colour ops as they were before issue 11 (each applied to the samples that draw it).


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), f)


def adjust_hue_before(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """adjust_hue as it was before issue 11 (torchvision's formulas, term by term)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    v, vs = maxc, maxc * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h * 6.0, 6.0)
        channels.append(v - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1)


OPS_BEFORE = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue_before)


class GroupedAugment(Augment):
    """The augmentation before it became branch-free (issue 11), kept here to be measured beside it:
    jitter only on the samples that draw it, each op per slot on the samples whose order puts it there
    (boolean masks, nonzero(): a host sync per call on a GPU), blur only on the blurred samples."""

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        x = resized_crop(images.float().div_(255), params["crop"], self.size, params["flip"])
        jitter = params["jitter"]
        if jitter.any():
            idx = jitter.nonzero()[:, 0]
            sub, factors = x[idx], params["factors"][idx]
            slots = ORDERS.to(x.device)[params["order"][idx]]
            for slot in range(4):
                for op, fn in enumerate(OPS_BEFORE):
                    here = (slots[:, slot] == op).nonzero()[:, 0]
                    if len(here):
                        sub[here] = fn(sub[here], factors[here, op])
            x[idx] = sub
        gray = params["gray"]
        if gray.any():
            x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        blur = params["blur"]
        if blur.any():
            idx = blur.nonzero()[:, 0]
            x[idx] = gaussian_blur(x[idx], self.blur_kernel, params["sigma"][idx])
        return (x - self.mean_t) / self.std_t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backbone", default="resnet18", help="torchvision resnet18 (CIFAR stem) or a timm name"
    )
    parser.add_argument("--step-iters", type=int, default=3)
    args = parser.parse_args()
    device, b, s = args.device, args.batch, args.size
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device)
    print(
        f"device={device} batch={b} size={s} threads={torch.get_num_threads()} (img/s: source images, 2 views each)"
    )

    results: dict[str, float] = {}
    for blur in (False, True):
        results.update(measure_recipe(images, blur, mean, std, args))

    for name, value in results.items():
        print(f"  {name:26s} {value:9.0f} img/s")
    for recipe in ("simclr_cifar", "simclr_imagenet"):
        own = results[f"own {recipe}"]
        print(
            f"  {recipe}: own / kornia = {own / results[f'kornia {recipe}']:.2f}x, "
            f"own / per-sample PIL = {own / results[f'pil {recipe}']:.2f}x, "
            f"own (branch-free) / grouped (before) = {own / results[f'grouped {recipe}']:.2f}x"
        )

    if args.step_iters:
        step_benchmark(args, images, mean, std)


def measure_recipe(images: torch.Tensor, blur: bool, mean, std, args) -> dict[str, float]:
    """img/s of the three pipelines for one recipe (two views per image)."""
    from PIL import Image

    device, b, s = args.device, args.batch, args.size
    recipe = "simclr_imagenet" if blur else "simclr_cifar"
    own = Augment(s, blur_p=0.5 if blur else 0.0, mean=mean, std=std).to(device)
    grouped = GroupedAugment(s, blur_p=0.5 if blur else 0.0, mean=mean, std=std).to(device)
    gen = torch.Generator(device).manual_seed(0)
    korn = kornia_pipeline(s, blur, mean, std).to(device)
    as_float = images.float() / 255
    pil_images = [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]
    pil = pil_pipeline(s, blur, mean, std)

    def per_sample() -> None:
        torch.stack([torch.stack([pil(im), pil(im)]) for im in pil_images]).to(device)

    return {
        f"own {recipe}": b / timed(lambda: [own(images, gen) for _ in range(2)], args.iters, device=device),
        f"grouped {recipe}": b
        / timed(lambda: [grouped(images, gen) for _ in range(2)], args.iters, device=device),
        f"kornia {recipe}": b / timed(lambda: [korn(as_float) for _ in range(2)], args.iters, device=device),
        f"pil {recipe}": b / timed(per_sample, max(2, args.iters // 3), warmup=1, device=device),
    }


def step_benchmark(args, images: torch.Tensor, mean, std) -> None:
    """Model step alone (views precomputed) vs the full ssl_lab step (augment + model step)."""
    import timm

    from ssl_lab.methods.simclr import SimCLR
    from ssl_lab.models.backbones import torchvision_resnet

    device = args.device
    if args.backbone == "resnet18":
        backbone = torchvision_resnet("resnet18", cifar_stem=True)
    else:
        backbone = timm.create_model(args.backbone, num_classes=0)
    model = SimCLR(backbone).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    aug = Augment(args.size, mean=mean, std=std).to(device)
    gen = torch.Generator(device).manual_seed(0)
    fixed = [aug(images, gen), aug(images, gen)]

    def model_step(views) -> None:
        loss = model.training_step(views)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    alone = args.batch / timed(lambda: model_step(fixed), args.step_iters, warmup=1, device=device)
    full = args.batch / timed(
        lambda: model_step([aug(images, gen), aug(images, gen)]), args.step_iters, warmup=1, device=device
    )
    print(f"  step ({args.backbone}): model alone {alone:.0f} img/s, full ssl_lab step {full:.0f} img/s "
          f"= {full / alone:.0%} of model alone")  # fmt: skip


if __name__ == "__main__":
    main()
