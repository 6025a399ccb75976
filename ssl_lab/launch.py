"""The command line of the runner: `python -m ssl_lab.train` is Hydra's app here (`main`), which trains
in this process or, for trainer.nproc_per_node > 1, on new processes it starts itself (`launch`).
Errors end as one line and an exit status (ssl_lab/errors.py); in a sweep, a failing job is marked
failed and the others go on.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from ssl_lab import distributed
from ssl_lab.build import check_batch_divides, pick_device
from ssl_lab.config import CONF_DIR, check_command_line, check_config, register_resolvers
from ssl_lab.errors import (
    REPORTED,
    USER_FACING,
    Interrupted,
    JobFailed,
    UserError,
    exit_status,
    run_reporting_errors,
    user_message,
)
from ssl_lab.rundir import console_log, set_status
from ssl_lab.train import train

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    with console_log(run_dir / "train.log"):
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
            # Raised out of a Hydra job it would be reported again ("Error executing job ..."): exit here.
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


def cli() -> None:
    check_command_line(sys.argv[1:])
    run_reporting_errors(main)


if __name__ == "__main__":
    cli()
