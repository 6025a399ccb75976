"""Does your config train the same on N processes as on one? A few steps of each, from the same seed.

    python -m ssl_lab.check_ddp method=nnclr optimizer=lars batch_size=64      # any train overrides
    python -m ssl_lab.check_ddp --nproc 4 --steps 6 experiment=cifar10_simclr

The global batch, the data order and the augmentation parameters are the same whatever the number of
processes, so the losses step by step and the weights at the end must agree to float precision. A
loss that is averaged where it should be gathered, negatives taken only from the own process, a
support set fed only locally, batch norm over the local batch: each shows here as a difference far
above float level. Runs on CPU processes (gloo) unless trainer.device says cuda and GPUs are present.
Prints the largest differences and one PASS or FAIL line; exit status 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from ssl_lab import checkpoint
from ssl_lab.config import check_command_line, check_config, compose
from ssl_lab.errors import UserError, run_reporting_errors
from ssl_lab.launch import launch
from ssl_lab.loggers import read_metrics
from ssl_lab.train import train

# Float-level differences between 1 and N processes stay far below these over a few steps (measured
# ~1e-6 to 1e-4: convolutions sum in a batch-size-dependent order); the bugs above give 1e-2 and more.
LOSS_TOLERANCE = 1e-3
WEIGHT_TOLERANCE = 1e-3


def check_config_for(overrides: list[str], nproc: int, steps: int) -> DictConfig:
    """The user's train config, cut to `steps` steps of one epoch, with no logger and no kNN monitor."""
    check_command_line(overrides)
    cfg = compose("train", [*overrides, "logger=none"])
    check_config(cfg)
    if cfg.batch_size % nproc:
        raise UserError(f"batch_size={cfg.batch_size} does not divide over --nproc {nproc}; use a multiple")
    with open_dict(cfg):
        cfg.epochs, cfg.resume, cfg.eval_after = 1, False, []
        cfg.data.limit_train, cfg.data.limit_test = steps * cfg.batch_size, cfg.batch_size
        cfg.monitor.every = 0
        cfg.trainer.log_every, cfg.trainer.progress, cfg.trainer.checkpoint_every = 1, False, 1
    return cfg


def compare(one: Path, many: Path) -> tuple[float, float, str]:
    """The largest relative loss difference over the steps, and the largest weight difference (with
    the parameter where it is)."""
    losses = [[r["train/loss"] for r in read_metrics(d) if "train/loss" in r] for d in (one, many)]
    if len(losses[0]) != len(losses[1]) or not losses[0]:
        raise RuntimeError(f"the runs logged {len(losses[0])} and {len(losses[1])} steps")
    loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(*losses))
    weights = [checkpoint.load(d / "final.pt")["model"] for d in (one, many)]
    diffs = {
        k: (weights[0][k].float() - weights[1][k].float()).abs().max().item()
        for k in weights[0]
        if weights[0][k].is_floating_point() and weights[0][k].numel()
    }
    where = max(diffs, key=diffs.get)
    return loss_diff, diffs[where], where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_lab.check_ddp",
        description=__doc__.split("\n")[0],
        usage="%(prog)s [options] [overrides]",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config, e.g. method=nnclr")
    gpus = torch.cuda.device_count()
    parser.add_argument(
        "--nproc", type=int, default=gpus if gpus > 1 else 2, help="processes to compare with 1"
    )
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of each run")
    args = parser.parse_intermixed_args(argv)
    if args.nproc < 2 or args.steps < 1:
        raise UserError("--nproc must be at least 2 and --steps at least 1, e.g. --nproc 2 --steps 4")
    cfg = check_config_for(args.overrides, args.nproc, args.steps)
    with tempfile.TemporaryDirectory(prefix="ssl_lab-check_ddp-") as tmp:
        one, many = Path(tmp) / "1", Path(tmp) / str(args.nproc)
        print(f"{cfg.method.name} + {cfg.backbone.name}, batch {cfg.batch_size}, {args.steps} steps: 1 process ...",
              flush=True)  # fmt: skip
        train(cfg, run_dir=one)
        print(f"... and {args.nproc} processes", flush=True)
        with open_dict(cfg):
            cfg.trainer.nproc_per_node = args.nproc
        launch(cfg, many)
        loss_diff, weight_diff, where = compare(one, many)
    ok = loss_diff <= LOSS_TOLERANCE and weight_diff <= WEIGHT_TOLERANCE
    print(f"  largest loss difference   {loss_diff:.2e} (relative; tolerance {LOSS_TOLERANCE:g})")
    print(f"  largest weight difference {weight_diff:.2e} in {where} (tolerance {WEIGHT_TOLERANCE:g})")
    print(f"{'PASS' if ok else 'FAIL'}: {args.nproc} processes train {'like' if ok else 'unlike'} 1 "
          f"for this config", flush=True)  # fmt: skip
    return 0 if ok else 1


def cli() -> None:
    run_reporting_errors(lambda: sys.exit(main()))


if __name__ == "__main__":
    cli()
