"""The training loop: epochs of steps, the kNN monitor, checkpoints, and stopping cleanly on a signal.

`fit(run)` trains from `run.state` to `cfg.epochs`; `train_epoch` is one pass over the data. Everything
a run is made of is in `Run`, which ssl_lab.train.train builds.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ssl_lab import checkpoint, distributed
from ssl_lab.build import Prefetch, TrainStep
from ssl_lab.checkpoint import TrainState
from ssl_lab.data.datasets import DataSplits, ImageSet
from ssl_lab.data.loader import augment_seed, batches, crop_seed, epoch_order
from ssl_lab.errors import Interrupted, TrainingDiverged
from ssl_lab.eval.common import features
from ssl_lab.eval.knn import knn_accuracy, pixel_knn_accuracy
from ssl_lab.loggers import RunLogger


@dataclass
class Run:
    """One training run, built: its config, where it writes, its data, its step and its progress."""

    cfg: DictConfig
    resolved: dict[str, Any]  # the resolved config, as checkpoints and run_info record it
    run_dir: Path
    device: torch.device
    data: DataSplits
    step: TrainStep
    state: TrainState
    logger: RunLogger
    writer: checkpoint.Writer
    last_monitor: dict[str, float] = field(default_factory=dict)  # the monitor's latest figures
    test_knn_best: tuple[int, float] | None = None  # (epoch, top-1) of monitor.test_every's best

    @property
    def main_process(self) -> bool:
        return distributed.is_main()

    def save(self, name: str) -> None:
        if self.main_process:
            self.state.wandb_id = self.logger.run_id
            state = {**self.step.state_dict(), **self.state.state_dict(), "config": self.resolved}
            self.writer.save(state, self.run_dir / name)  # written in the background

    def monitor(self) -> float | None:
        """The kNN monitor's top-1, every process extracting and voting for its share (ssl_lab.eval.knn),
        and the online linear probe's top-1 on the same features. Logged as val/knn_top1 and
        val/online_top1 on the validation split; with data.val_size=0 as test/..."""
        monitored = self.data.monitored()
        if monitored is None:
            return None
        splits, split = monitored
        cfg = self.cfg
        queries, rows = self.features(splits.test)
        top1 = knn_accuracy(
            self.step.model, splits, cfg.monitor.k, cfg.monitor.temperature, queries=queries,
            **self.feature_options(),
        )["top1"]  # fmt: skip
        metrics = {f"{split}/knn_top1": top1}
        if self.step.probe is not None and self.state.step > 0:  # not before it has trained
            labels = splits.test.labels[rows.start : rows.stop]
            metrics[f"{split}/online_top1"] = self.step.probe.accuracy(queries, labels, len(splits.test))
        self.last_monitor = metrics
        if self.main_process:
            self.logger.log({**metrics, "epoch": self.state.epoch}, step=self.state.step)
        return top1

    def test_knn(self) -> float | None:
        """lightly's benchmark figure (monitor.test_every): kNN with every labelled training image as the
        bank and the test split as the queries, logged as test/knn_top1; the best so far is kept in
        `test_knn_best` (epoch, top-1: since this process started; metrics.jsonl holds every epoch's) and
        reported at the end. Not a figure to select on."""
        if self.data.memory is None or self.data.test is None:
            return None
        cfg = self.cfg.monitor
        options = self.feature_options()
        top1 = knn_accuracy(self.step.model, self.data, cfg.k, cfg.temperature, **options)["top1"]
        if self.test_knn_best is None or top1 > self.test_knn_best[1]:
            self.test_knn_best = (self.state.epoch, top1)
        if self.main_process:
            self.logger.log({"test/knn_top1": top1, "epoch": self.state.epoch}, step=self.state.step)
        return top1

    def online_test(self) -> float | None:
        """The online linear probe on the test split, once at the end (test/online_top1, beside what
        eval=linear reports on the same split); None without a probe or when the monitor was on test."""
        monitored = self.data.monitored()
        if self.step.probe is None or monitored is None or monitored[1] == "test":
            return None
        queries, rows = self.features(self.data.test)
        labels = self.data.test.labels[rows.start : rows.stop]
        top1 = self.step.probe.accuracy(queries, labels, len(self.data.test))
        self.last_monitor["test/online_top1"] = top1
        if self.main_process:
            self.logger.log({"test/online_top1": top1, "epoch": self.state.epoch}, step=self.state.step)
        return top1

    def feature_options(self) -> dict[str, Any]:
        cfg = self.cfg
        return dict(device=self.device, batch_size=cfg.monitor.batch_size, autocast_dtype=self.step.autocast_dtype,
                    channels_last=cfg.trainer.channels_last, num_workers=cfg.trainer.num_workers)  # fmt: skip

    def features(self, images: ImageSet) -> tuple[torch.Tensor, range]:
        """This process's share of the evaluated network's features of `images`, and its rows."""
        rows = distributed.shard(len(images))
        model = self.step.model
        return features(
            model, images, self.data.mean, self.data.std, rows=rows, **self.feature_options()
        ), rows

    def pixel_baseline(self) -> float | None:
        """The monitor's kNN on raw pixels, once at the start (rank 0): what training must beat."""
        monitored = self.data.monitored()
        if monitored is None or not self.main_process:
            return None
        splits, split = monitored
        cfg = self.cfg.monitor
        result = pixel_knn_accuracy(splits, cfg.k, cfg.temperature, self.device)
        if result is None:
            return None
        self.logger.log({f"{split}/knn_top1_pixels": result["top1"]}, step=self.state.step)
        return result["top1"]

    def announce_baselines(self) -> None:
        if not self.main_process:
            return
        if self.data.memory is None:
            print(
                f"data={self.cfg.data.name} has no labels: no validation split and no kNN monitor, "
                "so the run returns nothing for a sweep to select on",
                flush=True,
            )
            return
        splits, split = self.data.monitored()
        sizes = f"{len(splits.memory)} bank / {len(splits.test)} queries"
        if split == "val":
            pixels = self.state.knn_pixels
            print(
                f"kNN top-1 on the validation split ({sizes}) at random init: {self.state.knn_init:.2f}%"
                + (f", on raw pixels: {pixels:.2f}%" if pixels is not None else ""),
                flush=True,
            )
        else:
            print(
                f"no validation split (data.val_size=0): the kNN monitor reports test/knn_top1 ({sizes}), "
                f"{self.state.knn_init:.2f}% at random init; do not choose hyperparameters on it",
                flush=True,
            )

    def announce_result(self, final: float | None) -> None:
        init, pixels = self.state.knn_init, self.state.knn_pixels
        if final is None or init is None:
            return
        split = self.data.monitored()[1]
        print(
            f"{split} kNN top-1: {final:.2f}% trained vs {init:.2f}% at random init ({final - init:+.2f} points)"
            + (
                f" and {pixels:.2f}% on raw pixels ({final - pixels:+.2f} points)"
                if pixels is not None
                else ""
            ),
            flush=True,
        )
        if self.test_knn_best is not None:
            epoch, top1 = self.test_knn_best
            print(f"test kNN top-1, best over epochs (lightly's benchmark figure, monitor.test_every): "
                  f"{top1:.2f}% after epoch {epoch}", flush=True)  # fmt: skip
        online = {name: value for name, value in self.last_monitor.items() if "online" in name}
        if online:
            print("online linear top-1: " + ", ".join(f"{n.split('/')[0]} {v:.2f}%" for n, v in online.items()),
                  flush=True)  # fmt: skip


class Stop:
    """SIGTERM, SIGUSR1/SIGUSR2 (SLURM's and submitit's warnings before the time limit) or a first
    Ctrl-C ask the loop to checkpoint and stop at the next log step (every trainer.log_every steps,
    where the processes agree on it); a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __enter__(self) -> Stop:
        self.previous = {
            s: signal.signal(s, self.handle)
            for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
        }
        return self

    def handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self) -> bool:
        """On every process, whether any was asked to stop: all stop at the same step."""
        return distributed.any_rank(self.signum is not None)


def fit(run: Run) -> None:
    """Train from where `run.state` stands to cfg.epochs: kNN monitor after epochs, last.pt every
    trainer.checkpoint_every epochs; on a signal, save last.pt and raise Interrupted."""
    cfg, state = run.cfg, run.state
    with Stop() as stop:
        while state.epoch < cfg.epochs:
            metrics = train_epoch(run, stop)
            if stop.requested():
                signum = stop.signum or signal.SIGTERM  # a rank told by another rank
                run.save("last.pt")
                run.writer.wait()
                print(
                    f"Stopped by {signal.Signals(signum).name} at epoch {state.epoch}, step {state.step}; "
                    f"saved {run.run_dir / 'last.pt'}. Run the same command with resume=true to continue.",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
                raise Interrupted(signum)
            state.epoch, state.batch_in_epoch, state.aug_rng = state.epoch + 1, 0, None
            top1 = test_top1 = None
            if cfg.monitor.every and state.epoch % cfg.monitor.every == 0 and state.epoch < cfg.epochs:
                top1 = run.monitor()
            every = cfg.monitor.test_every
            if every and (state.epoch % every == 0 or state.epoch == cfg.epochs):
                test_top1 = run.test_knn()
            if run.main_process and metrics:
                summary = f"epoch {state.epoch}/{cfg.epochs}  loss {metrics['train/loss']:.4f}"
                summary += f"  lr {metrics['train/lr']:.4g}  {metrics['train/img_per_s']:.0f} img/s"
                summary += f"  kNN top-1 {top1:.2f}%" if top1 is not None else ""
                summary += f"  test kNN {test_top1:.2f}%" if test_top1 is not None else ""
                online = run.last_monitor.get("val/online_top1", run.last_monitor.get("test/online_top1"))
                summary += f"  online linear {online:.2f}%" if top1 is not None and online is not None else ""
                print(summary, flush=True)
            if state.epoch % cfg.trainer.checkpoint_every == 0 or state.epoch == cfg.epochs:
                run.save("last.pt")


def train_epoch(run: Run, stop: Stop) -> dict[str, float]:
    """The steps of epoch `state.epoch` from `state.batch_in_epoch` on, until its end or a stop request
    (then `state.aug_rng` holds the augmentation stream for the resume); returns the last logged metrics.
    The loss stays on the device between log steps: no host sync per step."""
    cfg, state, device = run.cfg, run.state, run.device
    batch_size, steps_per_epoch = cfg.batch_size, len(run.data.train) // cfg.batch_size
    run.step.model.train()
    aug_rng = torch.Generator(device).manual_seed(augment_seed(cfg.seed, state.epoch))
    if state.aug_rng is not None and state.aug_rng_device == device.type:  # mid-epoch resume
        aug_rng.set_state(state.aug_rng)  # continue the augmentation stream
    elif state.aug_rng is not None:  # saved on another kind of device: its stream cannot continue here
        aug_rng.manual_seed(cfg.seed * 100_003 + state.epoch * 1_000_003 + state.batch_in_epoch)
        if run.main_process:
            print(f"resumed on {device.type} from a {state.aug_rng_device} run: the rest of epoch "
                  f"{state.epoch} draws a new augmentation stream", flush=True)  # fmt: skip
    order = epoch_order(len(run.data.train), cfg.seed, state.epoch)[state.batch_in_epoch * batch_size :]
    # Images decoded from files are cropped by the workers, from the full image (large images: ImageNet,
    # any folder); in-memory sets are cropped by the augmentation on the device.
    crops = run.step.crop_plan() if run.data.train.images is None else None
    loader = batches(
        run.data.train, order, batch_size, drop_last=True, num_workers=cfg.trainer.num_workers,
        pin_memory=device.type == "cuda", rank=distributed.rank(), world_size=distributed.world_size(),
        device=device, persistent=True, crops=crops, seed=crop_seed(cfg.seed, state.epoch),
    )  # fmt: skip
    bar = tqdm(
        total=steps_per_epoch, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
        disable=not (run.main_process and cfg.trainer.progress), leave=False,
        mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True,
    )  # fmt: skip
    metrics: dict[str, float] = {}
    nonfinite = torch.zeros(2, dtype=torch.bool, device=device)  # the loss, the gradients
    window: dict[str, torch.Tensor] = {}  # sums of the step's outputs (loss, the method's scalars)
    window_steps, window_start = 0, time.perf_counter()
    # each batch's views made while the previous step runs (on a side stream on GPUs: trainer.overlap)
    for views, labels in Prefetch(run.step, loader, aug_rng, device, cfg.trainer.overlap):
        out = run.step.train_on(views, state.step, labels)
        state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + 1
        nonfinite |= torch.stack([~torch.isfinite(out["loss"]), run.step.gradients_broken(out)])
        for name, value in out.items():
            window[name] = window[name] + value.float() if name in window else value.float()
        window_steps += 1
        bar.update()
        if state.step % cfg.trainer.log_every == 0 or state.batch_in_epoch == steps_per_epoch:
            check_finite(nonfinite, state, run.run_dir, run.writer)
            seconds = time.perf_counter() - window_start
            names = list(window)
            values = [window.pop(n) / window_steps for n in names]
            if cfg.monitor.health:  # ssl_lab.health: the evaluated network on this step's first view
                signals = run.step.health(views[0])
                names, values = [*names, *signals], [*values, *signals.values()]
            means = distributed.mean(torch.stack(values)).tolist()  # one collective and one sync for all
            metrics = {
                **{f"train/{name}": value for name, value in zip(names, means)},
                "train/lr": run.step.lr,
                "train/img_per_s": window_steps * batch_size / seconds,
                "epoch": state.epoch,
            }
            run.logger.log(metrics, step=state.step)
            bar.set_postfix(
                loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.3g}",
                img_s=f"{metrics['train/img_per_s']:.0f}", refresh=False,
            )  # fmt: skip
            window_steps, window_start = 0, time.perf_counter()
            if stop.requested():  # agreed at log steps, where the loop syncs anyway
                break
    bar.close()
    check_finite(nonfinite, state, run.run_dir, run.writer)
    if state.batch_in_epoch < steps_per_epoch:
        state.aug_rng, state.aug_rng_device = aug_rng.get_state(), device.type
    return metrics


def check_finite(
    nonfinite: torch.Tensor, state: TrainState, run_dir: Path, writer: checkpoint.Writer
) -> None:
    """Raise TrainingDiverged if any process's loss or gradients (`nonfinite`: [loss, gradients]) were
    NaN/inf since the last check, before anything of them is logged or saved."""
    loss, gradients = distributed.total(nonfinite.long()).tolist()
    if loss or gradients:
        writer.wait()  # the last good checkpoint, on disk
        last = run_dir / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        what = "the loss became NaN/inf" if loss else "the gradients became NaN/inf (the loss was finite)"
        raise TrainingDiverged(
            f"{what} in epoch {state.epoch} (by step {state.step}); {kept}. "
            "Lower optimizer.base_lr, add trainer.grad_clip=1.0, or use trainer.precision=32"
        )
