"""The runner: compose -> build -> fit -> evaluate -> log.

    python -m ssl_lab.train method=nnclr backbone=resnet18 optimizer=lars batch_size=512

`train(cfg)` does the work and is what tests call; it reads top to bottom. The parts live beside it:
ssl_lab/build.py (model and step), ssl_lab/loop.py (the epochs), ssl_lab/rundir.py (the run dir),
ssl_lab/errors.py (what the user sees), ssl_lab/launch.py (the command line and several processes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_lab import checkpoint, distributed
from ssl_lab.build import build_model, build_step, check_batch_divides, pick_device, probe_classes
from ssl_lab.checkpoint import TrainState
from ssl_lab.config import check_config
from ssl_lab.data.datasets import DataSplits
from ssl_lab.errors import UserError, one_line
from ssl_lab.eval.run import eval_after_configs, evaluate
from ssl_lab.loggers import RunLogger
from ssl_lab.loop import Run, fit
from ssl_lab.rundir import drop_metrics_after, recorded, resume_checkpoint, shared_run_dir, write_run_info


def train(cfg: DictConfig, run_dir: Path | None = None) -> float | None:
    """Pretrain as `cfg` says; returns the final kNN top-1 on the validation split (None without one)."""
    check_config(cfg)
    device = distributed.init(pick_device(cfg.trainer.device), cfg.trainer.dist_timeout_s)
    rank, world = distributed.rank(), distributed.world_size()
    check_batch_divides(cfg.batch_size, world)
    run_dir = shared_run_dir(run_dir or Path(HydraConfig.get().runtime.output_dir))
    # composed now, so that a typo in eval_after fails before training, not after it
    eval_after = eval_after_configs(cfg, run_dir / "final.pt") if rank == 0 else []
    torch.manual_seed(cfg.seed)

    data: DataSplits = instantiate(cfg.data, num_workers=cfg.trainer.num_workers)
    if cfg.batch_size > len(data.train):
        raise UserError(
            f"batch_size={cfg.batch_size} is larger than the {len(data.train)} training images of "
            f"data={cfg.data.name}; use batch_size<={len(data.train)}"
        )
    model = build_model(cfg, device, world)
    augment = instantiate(cfg.augment).to(device)
    step = build_step(
        cfg, model, augment, len(data.train) // cfg.batch_size, rank, world, probe_classes(cfg, data)
    )
    state = TrainState()
    if cfg.resume:
        resume(cfg, run_dir, step, state)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank == 0:
        write_run_info(run_dir, resolved, resumed=bool(cfg.resume))
    logger = RunLogger(run_dir, cfg.logger, resolved, state.wandb_id, enabled=rank == 0)
    run = Run(
        cfg,
        resolved,
        run_dir,
        device,
        data,
        step,
        state,
        logger,
        checkpoint.Writer(background=device.type == "cuda"),
    )
    with recorded(run_dir, logger, step=lambda: state.step), run.writer:
        if state.fresh:  # the floors training must beat: the network at random init, raw pixels
            state.knn_init, state.knn_pixels = run.monitor(), run.pixel_baseline()
            run.announce_baselines()
        fit(run)
        final = run.monitor()
        run.online_test()
        run.save("final.pt")
        run.writer.wait()  # on disk before anything reads it
        if rank == 0:
            print(f"Run dir: {run_dir}", flush=True)
            run.announce_result(final)
            for eval_cfg in eval_after:
                evaluate(eval_cfg, logger, data=data if eval_cfg.get("data") is None else None)
    return final if data.val is not None else None  # for sweepers: a validation figure, never test


def resume(cfg: DictConfig, run_dir: Path, step, state: TrainState) -> None:
    """Load run_dir/last.pt into the step and the state; metrics logged after it are moved aside."""
    saved = checkpoint.load(resume_checkpoint(run_dir, cfg.resume))
    same_schedule = saved["config"]["epochs"] == cfg.epochs
    try:
        step.load_state_dict(saved, schedule=same_schedule)
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"{run_dir / 'last.pt'} holds a different model or optimizer than this config builds "
            f"({one_line(str(e))[:120]}...); resume with the run's own overrides"
        ) from None
    state.load_state_dict(saved)
    if distributed.is_main():
        if not same_schedule:  # the schedule is a function of (step, total steps): follow the new total
            old = saved["config"]["epochs"]
            print(f"epochs changed from {old} to {cfg.epochs}: the lr schedule follows the new total")
        print(f"Resuming {run_dir} at epoch {state.epoch}, step {state.step}", flush=True)
        drop_metrics_after(run_dir, state.step)


if __name__ == "__main__":  # the program, not a dependency: python -m ssl_lab.train
    from ssl_lab.launch import cli

    cli()
