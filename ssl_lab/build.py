"""How a run is built from its config, in one place. The runner, the bench and the evaluation app all
build through here, so that what the bench measures is what trains.

    device = pick_device(cfg.trainer.device)
    model = build_model(cfg, device, world)       # the Method on its device: sync BN, channels_last
    step = build_step(cfg, model, augment, steps_per_epoch, rank, world)
    loss = step(uint8_images, rng, i)              # one optimisation step, as the runner takes it
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from timm.layers import convert_sync_batchnorm
from timm.scheduler.scheduler import Scheduler

from ssl_lab import distributed
from ssl_lab.data.augment import Augment
from ssl_lab.data.datasets import DataSplits
from ssl_lab.errors import UserError
from ssl_lab.eval.online_linear import OnlineLinear
from ssl_lab.health import health as feature_health
from ssl_lab.methods.base import Draw, Method
from ssl_lab.optim import build_optimizer, scaled_lr, schedule_step

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def pick_device(name: str) -> torch.device:
    """trainer.device as a device with its index (`cuda` -> `cuda:<current>`): tensors report their
    device with one, and `torch.device("cuda", 0) != torch.device("cuda")`, so a device kept without
    it never equals the device of what was put there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def precision_dtype(precision: str | int, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of trainer.precision; `auto` is bf16 on GPUs that support it and 32-bit on
    CPUs, where bf16's gain depends on the processor (benchmarks/README.md)."""
    if str(precision) == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return PRECISIONS[str(precision)]


def check_batch_divides(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise UserError(
            f"batch_size={batch_size} (global) does not divide over {processes} processes; "
            f"use a multiple of {processes}"
        )


def build_model(cfg: DictConfig, device: torch.device, world: int = 1) -> Method:
    """cfg.method around cfg.backbone, on `device`, with cfg.trainer's memory layout; with several
    processes, batch norm over the global batch (trainer.sync_batchnorm)."""
    model = instantiate(cfg.method, backbone=instantiate(cfg.backbone))
    if world > 1:
        model = sync_batchnorm(model, sync_batchnorm_mode(cfg.trainer.sync_batchnorm), device)
    model = model.to(device)
    if device.type == "cuda":
        if cfg.trainer.deterministic:  # comparable runs (check_ddp): no TF32, no per-shape algorithms
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        else:
            # Fixed shapes: cuDNN's autotuner pays after the first steps. TF32 stays as torch has it
            # (off for matmuls), so the losses' fp32 matmuls stay fp32.
            torch.backends.cudnn.benchmark = True
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def sync_batchnorm_mode(value: str | bool) -> str:
    """trainer.sync_batchnorm: ssl_lab | torch | false (true: ssl_lab)."""
    text = str(value).lower()
    return {"true": "ssl_lab"}.get(text, text)


def sync_batchnorm(model: Method, mode: str, device: torch.device) -> Method:
    """Batch norm over the global batch. `ssl_lab`: distributed.SyncBatchNorm on any device, no host
    sync; `torch`: torch's SyncBatchNorm (GPUs only; it syncs the host once per layer per step) through
    timm's converter, which keeps timm's BatchNormAct2d activations; `false`: per process."""
    if mode == "false":
        return model
    foreign = distributed.foreign_batchnorms(model)
    if foreign:
        name, kind = foreign[0]
        raise UserError(
            f"{name} is a {kind.__module__}.{kind.__qualname__}, a batch norm with a forward of its own that "
            f"trainer.sync_batchnorm={mode} cannot replace without changing the network; "
            "use trainer.sync_batchnorm=false (batch norm per process)"
        )
    if mode == "torch":
        if any(getattr(m, "splits_global_batch", False) for m in model.modules()):
            raise UserError(
                "trainer.sync_batchnorm=torch would replace backbone.bn_splits' split batch norms; "
                "use trainer.sync_batchnorm=ssl_lab (it leaves them over their splits)"
            )
        if device.type != "cuda":
            raise UserError(
                "trainer.sync_batchnorm=torch needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
                "use trainer.sync_batchnorm=ssl_lab"
            )
        # .train(): timm 1.0.10's converter leaves the layers it makes in training mode
        return convert_sync_batchnorm(model).train(model.training)
    return distributed.SyncBatchNorm.convert(model)


class TrainStep:
    """One optimisation step as the runner takes it: the method's views of a uint8 batch (`views`),
    forward under autocast, backward, the method's hook on the gradients, optimizer step and the
    method's post-step update (`update`).
    Its state (model, optimizer, scheduler, scaler) is what a checkpoint holds besides the progress."""

    def __init__(
        self,
        model: Method,
        forward: Callable[[list[torch.Tensor]], dict[str, torch.Tensor]],
        augment: Augment,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler,
        scaler: torch.amp.GradScaler,
        autocast_dtype: torch.dtype | None,
        grad_clip: float | None,
        channels_last: bool,
        batch_size: int,
        steps_per_epoch: int,
        epochs: int,
        rank: int = 0,
        world: int = 1,
        probe: OnlineLinear | None = None,
        compile_augment: bool = False,
    ) -> None:
        self.model, self.forward, self.augment, self.probe = model, forward, augment, probe
        self.compile_augment = compile_augment
        self.compiled: dict[Augment, Callable] = {}  # each view's augmentation, compiled on first use
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.autocast_dtype, self.grad_clip, self.channels_last = autocast_dtype, grad_clip, channels_last
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.steps_per_epoch, self.total_steps = max(1, steps_per_epoch), steps_per_epoch * epochs
        self.variants: dict[str, Augment] = {}

    def view_augment(self, index: int, changes: dict) -> Augment:
        """The augmentation of the method's `index`-th view, drawn with `changes` (Method.views)."""
        augment = self.augment.for_view(index)  # asymmetric recipes set views apart (augment.views)
        if not changes:
            return augment
        key = repr((min(index, len(self.augment.views)), sorted(changes.items())))  # hashable
        if key not in self.variants:
            self.variants[key] = augment.variant(**changes).to(self.augment.mean_t.device)
        return self.variants[key]

    def apply(self, augment: Augment) -> Callable:
        """`augment.apply`, or with trainer.compile_augment that function compiled (one graph per
        augmentation, compiled on its first batch): its pixel ops fused into few kernels, where eager
        runs over a hundred small ones, which bounds the step on GPUs at 32 px. The random draws
        (`sample_params`) stay eager, on the run's stream, so the views are the same draws."""
        if not self.compile_augment:
            return augment.apply
        if augment not in self.compiled:
            self.compiled[augment] = torch.compile(augment.apply, fullgraph=True, dynamic=False)
        return self.compiled[augment]

    def view_augments(self) -> list[Augment]:
        """The augmentation of each of the method's views, in order (Method.views with its changes)."""
        drawn = itertools.count()
        augments: list[Augment] = []
        count = Draw(
            lambda **changes: augments.append(self.view_augment(next(drawn), changes)),
            torch.empty,
            torch.empty,
        )
        self.model.views(count)
        return augments

    def crop_plan(self) -> list[tuple[tuple[float, float], tuple[float, float], int]]:
        """Each view's (crop_scale, crop_ratio, size): what decoding workers need to crop the views of
        large images from the full decoded image (data sets not held in memory)."""
        return [(a.crop_scale, a.crop_ratio, a.size) for a in self.view_augments()]

    def views(
        self, images: torch.Tensor | tuple[torch.Tensor, ...], rng: torch.Generator
    ) -> list[torch.Tensor]:
        """The method's views of this process's images: a uint8 batch, or the views' crops of it that
        decoding workers made (a tuple, one batch per view, in `crop_plan` order). Parameters are drawn
        for the whole global batch and sliced, so every sample gets the same views whatever the number
        of processes."""
        drawn = itertools.count()
        cropped = isinstance(images, tuple | list)

        def draw(**changes) -> torch.Tensor:
            index = next(drawn)
            augment = self.view_augment(index, changes)
            source = images[index] if cropped else images
            params = augment.sample_params(
                self.batch_size, *source.shape[-2:], generator=rng, device=source.device
            )
            if self.world > 1:
                local = self.batch_size // self.world
                params = {k: v[self.rank * local : (self.rank + 1) * local] for k, v in params.items()}
            view = self.apply(augment)(source, params, cropped=cropped)
            return view.contiguous(memory_format=torch.channels_last) if self.channels_last else view

        def noise(*shape: int) -> torch.Tensor:  # drawn for the global batch and sliced, as the views
            device = (images[0] if cropped else images).device
            u = torch.rand(self.batch_size, *shape, generator=rng, device=device)
            local = self.batch_size // self.world
            return u[self.rank * local : (self.rank + 1) * local] if self.world > 1 else u

        def shared(*shape: int) -> torch.Tensor:  # every process draws the same from the same stream
            return torch.rand(*shape, generator=rng, device=(images[0] if cropped else images).device)

        return self.model.views(Draw(draw, noise, shared))

    def update(
        self, views: list[torch.Tensor], step: int, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Forward (under autocast), backward and update, then the online linear probe's step on the
        forward's features when there is one and `labels`; returns the training step's outputs (the
        loss, any scalars it logs, the probe's), detached: no sync."""
        self.model.set_progress(step, self.steps_per_epoch, self.total_steps)
        dtype = self.autocast_dtype
        probing = self.probe is not None and labels is not None
        capture = self.probe.capture() if probing else contextlib.nullcontext()
        with capture, torch.autocast(views[0].device.type, dtype=dtype, enabled=dtype is not None):
            out = self.forward(views)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        self.scaler.unscale_(self.optimizer)  # nothing to do unless fp16
        norm = grad_norm(self.optimizer)  # before any clipping, the method's (DINO's) included
        if self.scaler.is_enabled():  # fp16: an overflowed step, skipped by the scaler, logs 0
            norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
        self.model.after_backward(step, step // self.steps_per_epoch)
        if self.grad_clip:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.after_step(step, self.total_steps)
        out = {name: value.detach() for name, value in out.items()} | {"grad_norm": norm}
        if probing:
            out |= self.probe.step(labels, views[0], step, self.total_steps, dtype)
        return out

    def __call__(
        self,
        images: torch.Tensor | tuple[torch.Tensor, ...],
        rng: torch.Generator,
        step: int,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Step `step` (0-based) on a uint8 batch (or its views' crops) already on the device; `labels`
        (-1: none) train the online linear probe, if the step has one."""
        return self.train_on(self.views(images, rng), step, labels)

    def train_on(
        self, views: list[torch.Tensor], step: int, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Step `step` on views already made (`views`, or `Prefetch`): the schedule, then `update`."""
        schedule_step(self.scheduler, step, self.total_steps)
        return self.update(views, step, labels)

    def gradients_broken(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Whether step `out`'s gradients were non-finite while its loss may be finite, on the device.
        In bf16 and fp32: any NaN/inf in them (the optimizer step has put it in the weights). In fp16
        an overflow now and then is the loss scaler's business (it skips that step and halves its
        scale); gradients that stay non-finite however far it scales them down drive the scale below
        1, which no healthy fp16 run reaches (it starts at 2^16)."""
        if self.scaler.is_enabled():
            scale = getattr(self.scaler, "_scale", None)  # the scaler's tensor: reading it does not sync
            return torch.zeros_like(out["loss"], dtype=torch.bool) if scale is None else (scale < 1).squeeze()
        return ~torch.isfinite(out["grad_norm"])

    def health(self, first_view: torch.Tensor) -> dict[str, torch.Tensor]:
        """ssl_lab.health's figures of the evaluated network on `first_view` (the runner: log steps)."""
        return feature_health(self.model.encoder, first_view, self.autocast_dtype)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.probe is not None:
            state["online_linear"] = self.probe.state_dict()
        return state

    def load_state_dict(self, state: dict, schedule: bool = True) -> None:
        """Without `schedule` the lr schedule keeps the new run's (e.g. a resume with other epochs)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if schedule:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.probe is not None and "online_linear" in state:  # else: a run saved without one
            self.probe.load_state_dict(state["online_linear"])


class Prefetch:
    """The views of each batch from `batches` (uint8 images, or the views' crops, and labels), made one
    batch ahead: the runner's loop trains on batch i while batch i+1 is fetched and augmented. On a GPU
    with `overlap`, that happens on a side stream, so the augmentation's many small kernels run beside
    the model step instead of after it; the training stream waits for the side stream before it uses
    the views (no host sync). The random stream is drawn in the same order either way (views i, then
    views i+1 after step i is launched: a step draws nothing from it), so the run is the same with
    and without the overlap; batch i+1 is made when the caller asks for it, so a caller that stops
    after step i leaves the random stream where a checkpoint expects it."""

    def __init__(
        self,
        step: TrainStep,
        batches: Iterator[tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor | None]],
        rng: torch.Generator,
        device: torch.device,
        overlap: bool = True,
    ) -> None:
        self.step, self.batches, self.rng, self.device = step, iter(batches), rng, device
        self.side = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None]]:
        ready = self.prepare()
        while ready is not None:
            views, labels = ready
            if self.side is not None:  # the training stream uses what the side stream made
                main = torch.cuda.current_stream(self.device)
                main.wait_stream(self.side)
                for tensor in [*views, *([] if labels is None else [labels])]:
                    tensor.record_stream(main)
            yield views, labels  # the caller launches step i ...
            ready = self.prepare()  # ... and batch i+1 is made meanwhile

    def prepare(self) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
        if self.side is None:
            batch = next(self.batches, None)
            return None if batch is None else self.make(*batch)
        # the side stream may reuse memory the training stream freed: it starts after what was queued
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            batch = next(self.batches, None)  # a set held on the GPU is gathered here, on the side stream
            return None if batch is None else self.make(*batch)

    def make(
        self, images: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if isinstance(images, tuple):  # the views' crops
            images = tuple(view.to(self.device, non_blocking=True) for view in images)
        else:
            images = images.to(self.device, non_blocking=True)
        labels = None if labels is None else labels.to(self.device, non_blocking=True)
        return self.step.views(images, self.rng), labels


def grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The l2 norm of all the gradients of `optimizer`'s parameters together, on the device (one foreach
    pass; NaN or inf when any of them is)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def probe_classes(cfg: DictConfig, data: DataSplits) -> int:
    """The classes of the online linear probe: the data's, when monitor.online_linear and the
    training images have labels; else 0 (no probe), said once."""
    if not cfg.monitor.online_linear:
        return 0
    if data.memory is None or data.train.labels is None:
        if distributed.is_main():
            print(f"data={cfg.data.name} has no labels for its training images: no online linear probe "
                  "(monitor.online_linear); evaluate with eval=linear", flush=True)  # fmt: skip
        return 0
    return data.num_classes


def build_step(
    cfg: DictConfig,
    model: Method,
    augment: Augment,
    steps_per_epoch: int,
    rank: int = 0,
    world: int = 1,
    num_classes: int = 0,
) -> TrainStep:
    """The optimizer (with batch-size lr scaling), the per-step schedule, the fp16 grad scaler, DDP
    (several processes) and torch.compile (trainer.compile) around `model`; the online linear probe
    (monitor.online_linear) when the data has `num_classes` labels."""
    model.check_batch(cfg.batch_size)  # before the runner writes anything
    device = next(model.parameters()).device
    dtype = precision_dtype(cfg.trainer.precision, device)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.batch_size)

    def schedule(optimizer: torch.optim.Optimizer) -> Scheduler:  # the method's, and the probe's
        return instantiate(
            cfg.scheduler, optimizer=optimizer, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs
        )

    scheduler = schedule(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    forward: Callable = model  # Method.forward([views]) is the training step
    if world > 1:  # through the wrapper, which syncs gradients
        forward = distributed.data_parallel(model, device)
    probe = None
    if cfg.monitor.online_linear and num_classes:  # before torch.compile, which traces its hook
        probe = OnlineLinear(
            model.encoder, model.num_features, num_classes,
            scaled_lr(cfg.monitor.online_linear_lr, cfg.batch_size, "linear"),
            schedule, seed=cfg.seed,
        )  # fmt: skip
    if cfg.trainer.compile:
        forward = torch.compile(forward)
    return TrainStep(
        model, forward, augment, optimizer, scheduler, scaler, dtype, cfg.trainer.grad_clip,
        cfg.trainer.channels_last, cfg.batch_size, steps_per_epoch, cfg.epochs, rank, world, probe,
        cfg.trainer.compile_augment,
    )  # fmt: skip
