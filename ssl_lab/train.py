"""The runner: compose -> instantiate -> fit -> evaluate -> log.

    python -m ssl_lab.train method=nnclr backbone=resnet18 optimizer=lars batch_size=512

`train(cfg)` does the work and is what tests call; `main` adds Hydra and turns user errors into
one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from tqdm import tqdm

from ssl_lab import UserError, checkpoint, distributed
from ssl_lab.config import check_command_line, check_config, one_line, register_resolvers
from ssl_lab.data.datasets import DataSplits
from ssl_lab.data.loader import batches, epoch_order
from ssl_lab.eval.knn import knn_accuracy
from ssl_lab.loggers import RunLogger
from ssl_lab.optim import build_optimizer

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def precision_dtype(precision: str | int, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of trainer.precision; `auto` is bf16 on GPUs that support it and 32-bit on
    CPUs, where bf16's gain depends on the processor (benchmarks/README.md)."""
    if str(precision) == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return PRECISIONS[str(precision)]


class TrainingDiverged(Exception):
    """The loss became NaN or inf."""


class PeerFailed(Exception):
    """Another process of a multi-process run died, so this one cannot go on."""


REPORTED = {e.__name__: e for e in (UserError, TrainingDiverged, PeerFailed)}  # one line, no traceback
# what main() and the spawned workers turn into one line (Hydra/OmegaConf errors are the user's input)
USER_FACING = (*REPORTED.values(), InstantiationException, OmegaConfBaseException)


class Interrupted(Exception):
    """The run was asked to stop by a signal, after saving last.pt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stop:
    """SIGTERM, SIGUSR1/SIGUSR2 (SLURM's and submitit's warnings before the time limit) or a first
    Ctrl-C ask the loop to checkpoint and stop at the next step boundary; a second Ctrl-C stops at once."""

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


def train(cfg: DictConfig, run_dir: Path | None = None) -> float | None:
    """Pretrain as `cfg` says; returns the final kNN top-1 (None for unlabelled data)."""
    check_config(cfg)
    device = pick_device(cfg.trainer.device)
    distributed.init(device.type)
    rank, world = distributed.rank(), distributed.world_size()
    main_process = rank == 0
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", distributed.local_rank())
    check_batch_divides(cfg.batch_size, world)
    own_dir = run_dir or Path(HydraConfig.get().runtime.output_dir)
    run_dir = Path(distributed.broadcast_object(str(own_dir)))
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    elif own_dir != run_dir:  # the placeholder Hydra made for this rank (config._run_dir)
        with contextlib.suppress(OSError):
            own_dir.rmdir()
    autocast_dtype = precision_dtype(cfg.trainer.precision, device)
    eval_after = []  # composed now, so that a typo in eval_after fails before training, not after
    if main_process and cfg.eval_after:
        # imported here: ssl_lab.eval.run imports this module
        from ssl_lab.eval.run import eval_after_configs
        from ssl_lab.eval.run import evaluate as run_protocol

        eval_after = eval_after_configs(cfg, run_dir / "final.pt")
    torch.manual_seed(cfg.seed)

    data: DataSplits = instantiate(cfg.data, num_workers=cfg.trainer.num_workers)
    batch_size = cfg.batch_size
    if batch_size > len(data.train):
        raise UserError(
            f"batch_size={batch_size} is larger than the {len(data.train)} training images of data={cfg.data.name}; "
            f"use batch_size<={len(data.train)}"
        )
    steps_per_epoch = len(data.train) // batch_size

    model = instantiate(cfg.method, backbone=instantiate(cfg.backbone))
    if world > 1 and cfg.trainer.sync_batchnorm:  # batch norm over the global batch, as on one process
        convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm if device.type == "cuda" else None
        model = convert(model) if convert else distributed.SyncBatchNorm.convert(model)
    model = model.to(device)
    augment = instantiate(cfg.augment).to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model, batch_size)
    scheduler = instantiate(
        cfg.scheduler, optimizer=optimizer, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    # Under DDP the step goes through the wrapper (Method.forward(view0, view1)), which syncs gradients.
    training_step = model.training_step
    if world > 1:
        training_step = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )
    if cfg.trainer.compile:
        training_step = torch.compile(training_step)

    # ------------------------------------------------------------------ resume
    epoch, batch_in_epoch, step, aug_state, run_id, knn_init = 0, 0, 0, None, None, None
    if cfg.resume:
        state = load_resume_state(run_dir, cfg)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise UserError(
                f"{run_dir / 'last.pt'} holds a different model or optimizer than this config builds "
                f"({one_line(str(e))[:120]}...); resume with the run's own overrides"
            ) from None
        if state["config"]["epochs"] == cfg.epochs:
            scheduler.load_state_dict(state["scheduler"])
        elif main_process:  # the schedule is a function of (step, total steps): follow the new total
            print(
                f"epochs changed from {state['config']['epochs']} to {cfg.epochs}: the lr schedule follows the new total"
            )
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        aug_state, run_id, knn_init = state["aug_rng"], state["wandb_id"], state["knn_init"]
        if main_process:
            print(f"Resuming {run_dir} at epoch {epoch}, step {step}", flush=True)
            drop_metrics_after(run_dir, step)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if main_process:
        write_run_info(run_dir, resolved, resumed=bool(cfg.resume))
    logger = RunLogger(run_dir, cfg.logger, resolved, run_id, enabled=main_process)

    def save(name: str) -> None:
        if main_process:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": checkpoint.rng_state(),
                "aug_rng": aug_state,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "step": step,
                "config": resolved,
                "wandb_id": logger.run_id,
                "knn_init": knn_init,
            }
            checkpoint.save(state, run_dir / name)

    def evaluate() -> float | None:
        """kNN top-1 on rank 0 (the others wait): computed once, not once per process."""
        if data.memory is None:
            return None
        top1 = None
        if main_process:
            top1 = knn_top1(model, data, cfg, device, autocast_dtype)
            logger.log({"val/knn_top1": top1, "epoch": epoch}, step=step)
        distributed.barrier()
        return top1

    # ------------------------------------------------------------------ fit
    exit_code, status, error = 1, "failed", None
    try:
        if epoch == 0 and batch_in_epoch == 0:
            knn_init = evaluate()
            if knn_init is not None and main_process:
                print(f"kNN top-1 at random init: {knn_init:.2f}%", flush=True)
        metrics: dict[str, float] = {}
        with Stop() as stop:
            while epoch < cfg.epochs:
                model.train()
                aug_rng = torch.Generator(device).manual_seed(cfg.seed * 100_003 + epoch + 7)
                if aug_state is not None:  # mid-epoch resume: continue the augmentation stream
                    aug_rng.set_state(aug_state)
                order = epoch_order(len(data.train), cfg.seed, epoch)[batch_in_epoch * batch_size :]
                loader = batches(
                    data.train, order, batch_size, drop_last=True, num_workers=cfg.trainer.num_workers,
                    pin_memory=device.type == "cuda", rank=rank, world_size=world,
                )  # fmt: skip
                bar = tqdm(
                    total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                    disable=not (main_process and cfg.trainer.progress), leave=False,
                    mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True,
                )  # fmt: skip
                nonfinite = torch.zeros((), dtype=torch.bool, device=device)
                window_loss = torch.zeros((), device=device)  # summed on the device: no sync per step
                window_steps, window_start = 0, time.perf_counter()
                for images, _ in loader:
                    scheduler.step_update(step)
                    images = images.to(device, non_blocking=True)
                    views = two_views(
                        augment, images, batch_size, aug_rng, rank, world, cfg.trainer.channels_last
                    )
                    loss = optimization_step(
                        training_step, views, optimizer, scaler, autocast_dtype, cfg.trainer.grad_clip
                    )
                    step, batch_in_epoch = step + 1, batch_in_epoch + 1
                    nonfinite |= ~torch.isfinite(loss)
                    window_loss += loss
                    window_steps += 1
                    bar.update()
                    if step % cfg.trainer.log_every == 0 or batch_in_epoch == steps_per_epoch:
                        check_finite(nonfinite, epoch, step, run_dir)
                        seconds = time.perf_counter() - window_start
                        metrics = {
                            "train/loss": distributed.mean(window_loss / window_steps).item(),
                            "train/lr": optimizer.param_groups[0]["lr"],
                            "train/img_per_s": window_steps * batch_size / seconds,
                            "epoch": epoch,
                        }
                        logger.log(metrics, step=step)
                        bar.set_postfix(
                            loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.3g}",
                            img_s=f"{metrics['train/img_per_s']:.0f}", refresh=False,
                        )  # fmt: skip
                        window_loss.zero_()
                        window_steps, window_start = 0, time.perf_counter()
                    if distributed.any_rank(stop.signum is not None):
                        break
                bar.close()
                if distributed.any_rank(stop.signum is not None):
                    check_finite(nonfinite, epoch, step, run_dir)
                    aug_state = aug_rng.get_state()
                    save("last.pt")
                    name = signal.Signals(stop.signum or signal.SIGTERM).name
                    print(
                        f"Stopped by {name} at epoch {epoch}, step {step}; saved {run_dir / 'last.pt'}. "
                        "Run the same command with resume=true to continue.",
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
                    signum = stop.signum or signal.SIGTERM  # a rank told by another rank
                    exit_code = 128 + signum
                    raise Interrupted(signum)
                check_finite(nonfinite, epoch, step, run_dir)
                epoch, batch_in_epoch, aug_state = epoch + 1, 0, None
                top1 = None
                if cfg.monitor.every and epoch % cfg.monitor.every == 0 and epoch < cfg.epochs:
                    top1 = evaluate()
                if main_process and metrics:
                    summary = f"epoch {epoch}/{cfg.epochs}  loss {metrics['train/loss']:.4f}"
                    summary += f"  lr {metrics['train/lr']:.4g}  {metrics['train/img_per_s']:.0f} img/s"
                    summary += f"  kNN top-1 {top1:.2f}%" if top1 is not None else ""
                    print(summary, flush=True)
                if epoch % cfg.trainer.checkpoint_every == 0 or epoch == cfg.epochs:
                    save("last.pt")

        final = evaluate()
        save("final.pt")
        if main_process:
            print(f"Run dir: {run_dir}", flush=True)
            if final is not None and knn_init is not None:
                print(
                    f"kNN top-1: {final:.2f}% trained vs {knn_init:.2f}% at random init "
                    f"({final - knn_init:+.2f} points)",
                    flush=True,
                )
            for eval_cfg in eval_after:
                run_protocol(eval_cfg, logger, data=data if eval_cfg.get("data") is None else None)
        exit_code, status = 0, "finished"
        return final
    except Interrupted:
        status = "interrupted"
        raise
    except Exception as e:
        if distributed.lost_peer(e):
            e = PeerFailed(
                f"process {rank} lost contact with the others at step {step} ({one_line(str(e))[:90]}...): "
                f"another process failed, see its message. {run_dir / 'last.pt'} holds the last epoch: "
                "fix the cause, then run the same command with resume=true"
            )
            error = str(e)
            raise e from None
        error = user_message(e)
        raise
    finally:
        logger.finish(exit_code)
        if main_process:
            set_status(run_dir, status, error)
        distributed.shutdown()


# ---------------------------------------------------------------------------- helpers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu"
        )
    return device


def check_batch_divides(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise UserError(
            f"batch_size={batch_size} (global) does not divide over {processes} processes; "
            f"use a multiple of {processes}"
        )


def two_views(
    augment: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int,
    rng: torch.Generator,
    rank: int = 0,
    world: int = 1,
    channels_last: bool = False,
) -> list[torch.Tensor]:
    """Two augmented views of this process's images. Parameters are drawn for the whole global batch
    and sliced, so every sample gets the same views whatever the number of processes."""
    views = []
    for _ in range(2):
        params = augment.sample_params(batch_size, *images.shape[-2:], generator=rng, device=images.device)
        if world > 1:
            local = batch_size // world
            params = {k: v[rank * local : (rank + 1) * local] for k, v in params.items()}
        view = augment.apply(images, params)
        views.append(view.contiguous(memory_format=torch.channels_last) if channels_last else view)
    return views


def optimization_step(
    training_step,
    views: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast_dtype: torch.dtype | None,
    grad_clip: float | None,
) -> torch.Tensor:
    """Forward (under autocast), backward and update; returns the detached loss (no sync)."""
    with torch.autocast(views[0].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = training_step(*views)["loss"]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def check_finite(nonfinite: torch.Tensor, epoch: int, step: int, run_dir: Path) -> None:
    if distributed.any_rank(nonfinite, nonfinite.device):
        last = run_dir / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"the loss became NaN/inf in epoch {epoch} (by step {step}); {kept}. "
            "Lower optimizer.base_lr, add trainer.grad_clip=1.0, or use trainer.precision=32"
        )


def knn_top1(model: torch.nn.Module, data: DataSplits, cfg: DictConfig, device, dtype) -> float:
    """The kNN monitor: weighted kNN top-1 (%) of the backbone's features (eval=knn's computation)."""
    return knn_accuracy(
        model, data, cfg.monitor.k, cfg.monitor.temperature, device=device, batch_size=cfg.monitor.batch_size,
        autocast_dtype=dtype, channels_last=cfg.trainer.channels_last, num_workers=cfg.trainer.num_workers,
    )["top1"]  # fmt: skip


def load_resume_state(run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    path = run_dir / "last.pt"
    if not path.exists():
        raise UserError(
            f"resume={cfg.resume} but there is nothing to resume: no {path}. Run without resume to start "
            "a new run, or pass resume=<run dir> of a run that wrote last.pt"
        )
    return checkpoint.load(path)


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Rows logged after the checkpoint belong to work that is now redone: move them aside."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            kept = json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError):  # a line cut short by kill -9
            kept = False
        (keep if kept else drop).append(line if line.endswith("\n") else line + "\n")
    if drop:
        with open(run_dir / "metrics.discarded.jsonl", "a") as f:
            f.writelines(drop)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def write_run_info(run_dir: Path, resolved: dict, resumed: bool) -> None:
    """What a run needs to be repeated: the resolved config, the command, the code and its versions."""
    if not resumed:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if resumed and info_path.exists() else {"starts": []}
    info["status"] = "running"
    info.pop("error", None)  # of an earlier start that failed
    info["starts"].append(
        {
            "time": datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, "-m", "ssl_lab.train", *sys.argv[1:]]),
            "cwd": str(Path.cwd()),
            "host": platform.node(),
            "git": git_state(),
            "versions": package_versions(),
        }
    )
    write_json(info_path, info)


def set_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """run_info.json's `status` (running, finished, failed, interrupted) and the error of a failed run:
    what `python -m ssl_lab.report` shows for each job of a sweep."""
    path = run_dir / "run_info.json"
    info = json.loads(path.read_text()) if path.exists() else {"starts": []}
    info["status"] = status
    if error:
        info["error"] = error
    write_json(path, info)


def write_json(path: Path, data: dict) -> None:
    """Atomically (temp file + rename): a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def git_state() -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("ssl_lab", "torch", "torchvision", "timm", "hydra-core", "omegaconf", "wandb", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


register_resolvers()


class JobFailed(Exception):
    """A sweep job's error, already reported on one line: Hydra marks the job failed and goes on with
    the others (a plain sys.exit would end the whole sweep)."""


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and distributed.is_main():
        print(f"job #{hydra_cfg.job.num}: {' '.join(hydra_cfg.overrides.task)}", flush=True)
    try:
        top1 = launch(cfg, run_dir)
    except Interrupted as e:
        sys.exit(128 + e.signum)
    except USER_FACING as e:
        message = user_message(e)
        if distributed.is_main():  # the same error on every process: say it once
            print(f"error: {message}", file=sys.stderr, flush=True)
        if multirun:
            if not (run_dir / "run_info.json").exists():  # failed before training started
                set_status(run_dir, "failed", message)
            raise JobFailed(message) from None
        sys.exit(exit_status(e))
    return top1 if top1 is None or math.isfinite(top1) else None


def launch(cfg: DictConfig, run_dir: Path) -> float | None:
    """train() here, or on trainer.nproc_per_node new processes (a sweep job that uses several)."""
    nproc = cfg.trainer.nproc_per_node
    if nproc == 1:
        return train(cfg)
    if distributed.world_size() > 1:
        raise UserError(
            f"trainer.nproc_per_node={nproc} but this process was itself launched as one of "
            f"{distributed.world_size()} (torchrun/SLURM); drop trainer.nproc_per_node or the launcher"
        )
    if pick_device(cfg.trainer.device).type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(
            f"trainer.nproc_per_node={nproc} but this machine has {torch.cuda.device_count()} GPUs; "
            f"use trainer.nproc_per_node<={torch.cuda.device_count()}"
        )
    check_config(cfg)
    check_batch_divides(cfg.batch_size, nproc)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # Hydra's resolvers live in this process
    with tempfile.TemporaryDirectory(prefix="ssl_lab-errors-") as errors:
        try:
            return distributed.spawn(_spawned_worker, (resolved, str(run_dir), errors), nproc)
        except ChildFailedError:
            failures = [json.loads(p.read_text()) for p in Path(errors).glob("*.json")]
            if not failures:
                raise  # a crash, not an error of ours: torch's report says which process and why
            # the root cause first: a process's own error before another's "lost contact"
            failure = min(failures, key=lambda f: (f["kind"] == "PeerFailed", f["rank"]))
            if failure["kind"] == "Interrupted":
                raise Interrupted(failure["signum"]) from None
            raise REPORTED[failure["kind"]](failure["message"]) from None
        except SignalException as e:  # SIGTERM/SIGINT to this process: the workers saved and stopped
            raise Interrupted(e.sigval) from None


def _spawned_worker(config: dict, run_dir: str, errors: str) -> float | None:
    """One process of `launch`: train, and leave an error where the parent reads it."""
    rank = distributed.rank()
    try:
        return train(OmegaConf.create(config), Path(run_dir))
    except Interrupted as e:
        failure, code = {"kind": "Interrupted", "signum": e.signum}, 128 + e.signum
    except USER_FACING as e:
        kind = type(e).__name__ if type(e) in REPORTED.values() else "UserError"
        failure, code = {"kind": kind, "message": user_message(e)}, exit_status(e)
    (Path(errors) / f"{rank}.json").write_text(json.dumps({**failure, "rank": rank}))
    sys.exit(code)


def exit_status(e: BaseException) -> int:
    """1 when the run itself failed (diverged, lost a process), 2 for bad input."""
    return 1 if isinstance(e, TrainingDiverged | PeerFailed) else 2


def user_message(e: BaseException) -> str:
    """One line for the user; a UserError raised while Hydra instantiates arrives wrapped."""
    if isinstance(e, InstantiationException) and isinstance(e.__cause__, UserError):
        e = e.__cause__
    if isinstance(e, MissingMandatoryValue):
        return f"{e.full_key} is missing: add {e.full_key}=<value> to the command line"
    if isinstance(e, tuple(REPORTED.values())):
        return str(e)
    return one_line(str(e))


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
