"""Training speed in one run, on one model: ssl_lab's step, its parts, and lightly's per-sample PIL way.

    python -m ssl_lab.bench                                 # ResNet-18 (ImageNet stem) at 32 px, batch 256
    python -m ssl_lab.bench trainer.channels_last=true      # any Hydra override of the train config
    python -m ssl_lab.bench backbone=resnet_tiny batch_size=128
    python -m ssl_lab.bench --steps 5 --variants            # also channels_last / bf16 / torch.compile
                                                            # (the model's, and the augmentation's)
    python -m ssl_lab.bench trainer.device=cuda --syncs     # on a GPU (timings synchronise CUDA); host syncs
    python -m ssl_lab.bench --variants-only                 # only the model settings side by side
    bash benchmarks/gpu.sh                                  # the whole GPU check, as a markdown table

Everything is built by the runner's own builder (ssl_lab/build.py) from the composed train config, so
the figures are those of the step that trains.
img/s counts source images per second; each gives the method's views (two, or multi-crop's). Figures are medians of
`--steps` timed steps after `--warmup` ones, the pipelines taking turns (in brackets: the range over
steps; a wide one says the run was disturbed); the reference's are means, as its workers deliver
batches in bursts. Timings on shared machines are noisy: compare the figures of one run, not of
different runs. benchmarks/README.md explains the figures and records measured ones.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from ssl_lab import build
from ssl_lab.build import TrainStep, pick_device
from ssl_lab.config import check_command_line, check_config, compose
from ssl_lab.data.augment import Augment
from ssl_lab.data.datasets import DataSplits, ImageSet, open_rgb
from ssl_lab.data.loader import batches, crop_seed, epoch_order
from ssl_lab.errors import run_reporting_errors
from ssl_lab.methods.base import Draw

# The speed goal's setting (benchmarks/README.md). The ImageNet stem: with the CIFAR stem (the runner's
# default at 32 px) ResNet-18's step runs at ~18 img/s on 2 CPU cores, not ~350, 15 s per 256 batch.
DEFAULTS = {
    "backbone": "resnet18",
    "backbone.cifar_stem": "false",
    "batch_size": "256",
    "data": "synthetic",
    "logger": "none",
}
RUN = 8  # steps timed together for the loop's pipelined full step
VARIANTS = {  # model settings compared by --variants
    "contiguous fp32": ["trainer.channels_last=false", "trainer.precision=32"],
    "channels_last fp32": ["trainer.channels_last=true", "trainer.precision=32"],
    "contiguous bf16": ["trainer.channels_last=false", "trainer.precision=bf16"],
    "channels_last bf16": ["trainer.channels_last=true", "trainer.precision=bf16"],
}


def compose_config(overrides: list[str]) -> DictConfig:
    """The train config with the bench's defaults, unless the command line sets the same key
    (choosing a backbone drops the default's backbone.* keys)."""
    given = {o.lstrip("+~").partition("=")[0] for o in overrides}
    defaults = [
        f"{k}={v}"
        for k, v in DEFAULTS.items()
        if k not in given and not (k.startswith("backbone.") and "backbone" in given)
    ]
    check_command_line(defaults + overrides)
    cfg = compose("train", defaults + overrides)
    check_config(cfg)
    return cfg


def build_step(
    cfg: DictConfig, device: torch.device, steps_per_epoch: int = 1, num_classes: int = 0
) -> TrainStep:
    """The runner's step of a new model, from the runner's builder (with the online linear probe when
    given the data's `num_classes`, as the runner builds it for labelled data)."""
    torch.manual_seed(cfg.seed)
    model = build.build_model(cfg, device)
    return build.build_step(
        cfg, model, instantiate(cfg.augment).to(device), steps_per_epoch, num_classes=num_classes
    )


def counted(fn: Callable[[int], object]) -> Callable[[], object]:
    """`fn(i)` with i = 0, 1, 2, ... on successive calls: the step index the runner passes."""
    steps = itertools.count()
    return lambda: fn(next(steps))


def timed(
    fns: dict[str, Callable[[], object]], steps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each call after `warmup` rounds. The functions take turns, so that a disturbance
    on a shared machine slows all of them alike and their ratios hold."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def report(
    name: str, batch_size: int, seconds: list[float], note: str = "", pipelined: bool = False
) -> float:
    """Prints img/s of the median step, and the range over steps (a wide one says the run was disturbed).
    Batches from DataLoader workers arrive in bursts (both workers finish at once): there, the mean."""
    if pipelined:
        rate, spread = batch_size / statistics.fmean(seconds), "(mean)"
    else:
        rate = batch_size / statistics.median(seconds)
        spread = f"({batch_size / max(seconds):.0f}-{batch_size / min(seconds):.0f})"
    print(f"  {name:30s} {rate:7.0f} img/s {spread:>12s}{note}", flush=True)
    return rate


class PerSampleViews(torch.utils.data.Dataset):
    """lightly's examples' way: each image to PIL (held in memory, or decoded from its file), torchvision
    transforms once per view of the method (each view's own settings: multi-crop's small crops too), in
    DataLoader workers."""

    def __init__(self, images: ImageSet, augments: list[Augment]) -> None:
        self.images = images
        self.transforms = [self.transform(a) for a in augments]

    @staticmethod
    def transform(a: Augment) -> Callable:
        from torchvision import transforms as T

        ops = [
            T.RandomResizedCrop(a.size, scale=a.crop_scale, ratio=a.crop_ratio),
            T.RandomHorizontalFlip(a.flip_p),
            T.RandomApply([T.ColorJitter(*a.jitter)], p=a.jitter_p),
            T.RandomGrayscale(a.gray_p),
        ]
        if a.blur_p:
            ops.append(T.RandomApply([T.GaussianBlur(a.blur_kernel, a.blur_sigma)], p=a.blur_p))
        if a.solarize_p:
            ops.append(T.RandomSolarize(a.solarize_threshold, p=a.solarize_p))
        return T.Compose([*ops, T.ToTensor(), T.Normalize(a.mean, a.std)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.images.images is None:
            image = open_rgb(self.images.files[i])
        else:
            image = Image.fromarray(self.images.images[i].permute(1, 2, 0).numpy())
        return tuple(transform(image) for transform in self.transforms)


def forever(epoch: Callable[[int], Iterator]) -> Iterator:
    return itertools.chain.from_iterable(map(epoch, itertools.count()))


def load_data(cfg: DictConfig) -> DataSplits:
    """cfg.data, loaded once per run of the bench (CIFAR-10's JPEGs take a while to decode)."""
    key = repr(cfg.data)
    if key not in _DATA:
        _DATA[key] = instantiate(cfg.data, num_workers=cfg.trainer.num_workers)
    return _DATA[key]


_DATA: dict[str, DataSplits] = {}


def to_device(images: torch.Tensor | tuple[torch.Tensor, ...], device: torch.device):
    """A batch (or its views' crops, from decoding workers) to the device, as ssl_lab/loop.py moves it."""
    if isinstance(images, tuple):
        return tuple(view.to(device, non_blocking=True) for view in images)
    return images.to(device, non_blocking=True)


def training_inputs(
    cfg: DictConfig, device: torch.device, workers: int | None = None
) -> tuple[DataSplits, TrainStep, torch.Generator, Iterator]:
    """The data, the runner's step, its augmentation stream and an endless stream of batches as the
    runner's loop draws them: from memory, or for a set decoded from files, each view cropped from the
    full image by `workers` (default trainer.num_workers) persistent decoding workers."""
    data = load_data(cfg)
    step = build_step(cfg, device, len(data.train) // cfg.batch_size, build.probe_classes(cfg, data))
    rng = torch.Generator(device).manual_seed(cfg.seed)
    crops = step.crop_plan() if data.train.images is None else None
    loader = forever(
        lambda epoch: batches(
            data.train, epoch_order(len(data.train), cfg.seed, epoch), cfg.batch_size, drop_last=True,
            num_workers=cfg.trainer.num_workers if workers is None else workers,
            pin_memory=device.type == "cuda", device=device, persistent=True, crops=crops,
            seed=crop_seed(cfg.seed, epoch),
        )
    )  # fmt: skip
    return data, step, rng, loader


def measure(
    cfg: DictConfig, steps: int, warmup: int, workers: int
) -> tuple[dict[str, list[float]], set[str]]:
    """Seconds per step of the four pipelines and the data paths alone, all on one model; and the names
    of those fed by DataLoader workers (their batches arrive in bursts: report their mean)."""
    device, b = pick_device(cfg.trainer.device), cfg.batch_size
    channels_last = cfg.trainer.channels_last
    data, step, rng, loader = training_inputs(cfg, device, workers)
    decoded = data.train.images is None  # ssl_lab's batches come from decoding workers too
    images, labels = next(loader)
    images, labels = to_device(images, device), labels if labels is None else labels.to(device)
    fixed = step.views(images, rng)
    sizes = [f"{a.size} px" for a in step.view_augments()]
    print("  views: " + ", ".join(f"{sizes.count(s)} x {s}" for s in dict.fromkeys(sizes))
          + f"; online linear probe {'on' if step.probe is not None else 'off'} (monitor.online_linear)",
          flush=True)  # fmt: skip

    def full_step(i: int) -> None:  # the runner's loop body (ssl_lab/loop.py)
        images, labels = next(loader)
        step(to_device(images, device), rng, i, labels)

    reference = torch.utils.data.DataLoader(
        PerSampleViews(data.train, step.view_augments()), batch_size=b, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
    )  # fmt: skip
    views = forever(lambda _: iter(reference))

    def reference_step(i: int) -> None:
        batch = [v.to(device, non_blocking=True) for v in next(views)]
        if channels_last:
            batch = [v.contiguous(memory_format=torch.channels_last) for v in batch]
        ready = iter(batch)  # the method's views in its own order, with what else it asks (MAE's noise)
        noise = lambda *shape: torch.rand(b, *shape, device=device)  # noqa: E731
        shared = lambda *shape: torch.rand(*shape, device=device)  # noqa: E731
        step.update(step.model.views(Draw(lambda **changes: next(ready), noise, shared)), i, labels)

    # The in-process pipelines take turns step by step. Those fed by workers cannot (the workers would
    # prepare batches while the others run), so they take turns with the others block by block: each
    # block first passes the batches its workers prefetched meanwhile (prefetch_factor 2), then times
    # whole turns of them.
    settle, turn = warmup + 2 * workers, max(1, workers)
    in_process = {"augment alone": lambda: step.views(images, rng),
                  "model step alone": counted(lambda i: step.update(fixed, i, labels))}  # fmt: skip
    if decoded:
        own = (({"ssl_lab data path alone": lambda: next(loader)}, settle, turn),
               ({"full ssl_lab step": counted(full_step)}, settle, turn))  # fmt: skip
    else:
        in_process["full ssl_lab step"] = counted(full_step)
        own = ()
    blocks = (
        (in_process, warmup, 1),
        *own,
        ({"reference data path alone": lambda: next(views)}, settle, turn),
        ({"reference (per-sample PIL)": counted(reference_step)}, settle, turn),
    )
    pipelined = {name for fns, _, k in blocks[1:] for name in fns}
    # The runner's loop: RUN steps in a row, synchronised once, each batch's views made while the step
    # before runs (trainer.overlap: on a side stream on GPUs), as ssl_lab/loop.py trains.
    prefetched = iter(build.Prefetch(step, (next(loader) for _ in itertools.count()), rng, device,
                                     cfg.trainer.overlap))  # fmt: skip

    def in_row(i: int) -> None:
        for j in range(RUN):
            views, batch_labels = next(prefetched)
            step.train_on(views, i * RUN + j, batch_labels)

    loop_name = f"full step, {RUN} in a row (loop)"
    times: dict[str, list[float]] = {}
    rounds = min(2, steps)  # a slow spell of the (virtual) machine then hits both sides
    for r in range(rounds):
        n = steps // rounds + (r < steps % rounds)
        for fns, skip, k in blocks:
            for name, t in timed(fns, -(-n // k) * k, skip, device).items():
                times.setdefault(name, []).extend(t)
        rows = max(1, n // RUN)
        times.setdefault(loop_name, []).extend(
            t / RUN for t in timed({loop_name: counted(in_row)}, rows, 1, device)[loop_name]
        )
    return times, pipelined


def syncs_per_step(cfg: DictConfig, steps: int, warmup: int) -> tuple[float, str] | None:
    """Host syncs per full step on CUDA (torch.cuda.set_sync_debug_mode warns at each) and where they
    happen ("file:line xN", most first); None on CPU, where nothing waits for a device."""
    import warnings
    from collections import Counter

    device = pick_device(cfg.trainer.device)
    if device.type != "cuda":
        return None
    _, step, rng, loader = training_inputs(cfg, device)
    for i in range(warmup):
        images, labels = next(loader)
        step(to_device(images, device), rng, i, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(warmup, warmup + steps):
                images, labels = next(loader)
                step(to_device(images, device), rng, i, labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return len(syncs) / steps, ", ".join(f"{at} x{n}" for at, n in where.most_common(4))


def compare_variants(overrides: list[str], steps: int, warmup: int, compile_too: bool) -> None:
    """The model step alone under each of VARIANTS (fresh models, taking turns), then the fastest
    of them compiled against itself uncompiled."""
    cfgs = {
        name: compose_config([*overrides, *extra, "trainer.compile=false"])
        for name, extra in VARIANTS.items()
    }
    cfg = next(iter(cfgs.values()))
    device, b, size = pick_device(cfg.trainer.device), cfg.batch_size, cfg.data.image_size
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device)
    views = build_step(cfg, device).views(images, torch.Generator(device).manual_seed(0))

    def step_of(cfg: DictConfig) -> Callable[[], object]:
        step = build_step(cfg, device)
        layout = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
        own_views = [v.contiguous(memory_format=layout) for v in views]
        return counted(lambda i: step.update(own_views, i))

    print("model step alone by setting (fresh model each, taking turns):")
    times = timed({name: step_of(c) for name, c in cfgs.items()}, steps, warmup, device)
    rates = {name: b / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        report(name, b, t, f"  {rates[name] / rates['contiguous fp32']:5.2f}x")
    if compile_too:
        best = max(rates, key=rates.get)
        compiled = step_of(compose_config([*overrides, *VARIANTS[best], "trainer.compile=true"]))
        first = timed({"first": compiled}, 1, 0, device)["first"][0]
        times = timed({best: step_of(cfgs[best]), "compiled": compiled}, steps, warmup, device)
        eager, rate = (b / statistics.median(times[k]) for k in (best, "compiled"))
        report(f"compile + {best}", b, times["compiled"], f"  {rate / eager:5.2f}x uncompiled, in turn with it "
               f"({eager:.0f} img/s); compiling took {first:.0f} s (not counted)")  # fmt: skip
        augment_compiled(overrides, images, steps, warmup)


def augment_compiled(overrides: list[str], images: torch.Tensor, steps: int, warmup: int) -> None:
    """The augmentation alone (the method's views of `images`, random draws included), eager against
    trainer.compile_augment, taking turns."""
    steps_of = {
        name: build_step(compose_config([*overrides, f"trainer.compile_augment={flag}"]), images.device)
        for name, flag in (("augment alone", "false"), ("augment alone, compiled", "true"))
    }
    rng = torch.Generator(images.device).manual_seed(0)
    fns = {name: (lambda step=step: step.views(images, rng)) for name, step in steps_of.items()}
    first = timed({"first": fns["augment alone, compiled"]}, 1, 0, images.device)["first"][0]
    times = timed(fns, steps, warmup, images.device)
    b = images.shape[0]
    eager, rate = (b / statistics.median(times[k]) for k in ("augment alone", "augment alone, compiled"))
    print("augmentation alone, eager and compiled (trainer.compile_augment), taking turns:")
    report("augment alone", b, times["augment alone"])
    report("augment alone, compiled", b, times["augment alone, compiled"],
           f"  {rate / eager:5.2f}x eager; compiling took {first:.0f} s (not counted)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], usage="%(prog)s [options] [overrides]"
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the train config, e.g. batch_size=128"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per figure (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    parser.add_argument("--variants", action="store_true", help="compare model settings of the model step")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of --variants")
    parser.add_argument("--variants-only", action="store_true", help="only --variants' comparison")
    parser.add_argument("--syncs", action="store_true", help="count host syncs per full step (CUDA)")
    args = parser.parse_intermixed_args(argv)
    cfg = compose_config(args.overrides)
    device, t = pick_device(cfg.trainer.device), cfg.trainer
    stem = {True: " (CIFAR stem: 3x3/1 conv, no max-pool)", False: " (ImageNet stem: 7x7/2 conv + max-pool)"}
    stem = stem.get(cfg.backbone.get("cifar_stem"), "")
    print(f"ssl_lab.bench: torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    print(f"  {cfg.method.name} + {cfg.backbone.name}{stem}, {cfg.data.image_size}x{cfg.data.image_size} px, "
          f"batch {cfg.batch_size}, data={cfg.data.name}, optimizer {cfg.optimizer._target_.split('.')[-1]}")  # fmt: skip
    print(f"  trainer: channels_last={t.channels_last} precision={t.precision} compile={t.compile} "
          f"compile_augment={t.compile_augment}")  # fmt: skip
    if args.variants_only:
        compare_variants(args.overrides, args.steps, args.warmup, not args.no_compile)
        return
    print(f"  img/s = source images/s (each gives the views below): median of {args.steps} steps after "
          f"{args.warmup} warm-up (range over steps)")  # fmt: skip
    rates = {}
    times, pipelined = measure(cfg, args.steps, args.warmup, args.workers)
    for name, seconds in times.items():
        note = f"  {args.workers} workers" if name in pipelined else ""
        rates[name] = report(name, cfg.batch_size, seconds, note, pipelined=name in pipelined)
    full = rates["full ssl_lab step"]
    print(f"  full / model step alone        {full / rates['model step alone']:7.2f}")
    loop = rates[f"full step, {RUN} in a row (loop)"]
    print(
        f"  loop / model step alone        {loop / rates['model step alone']:7.2f}  (trainer.overlap={t.overlap})"
    )
    print(f"  full / reference               {full / rates['reference (per-sample PIL)']:7.2f}x")
    if args.syncs:
        syncs = syncs_per_step(cfg, args.steps, args.warmup)
        shown = (
            "n/a on CPU" if syncs is None else f"{syncs[0]:.1f} (torch.cuda.set_sync_debug_mode) {syncs[1]}"
        )
        print(f"  host syncs per full step       {shown}")
    if args.variants:
        compare_variants(args.overrides, args.steps, args.warmup, not args.no_compile)


def cli() -> None:
    run_reporting_errors(main)


if __name__ == "__main__":
    cli()
