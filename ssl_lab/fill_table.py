"""Fill lightly's CIFAR-10 benchmark table a few rows at a time, in whatever GPU time there is.

    python -m ssl_lab.fill_table --budget 540 --out $OUT        # on a GPU machine, from the checkout
    python -m ssl_lab.report benchmarks/results/lightly_cifar10.jsonl

The rows are compare=lightly_cifar10's (conf/compare/lightly_cifar10.yaml: experiment=lightly_cifar10_<m>).
The script skips the rows the results file (and --out's own file) already holds for the same extra
overrides, measures each remaining row's step and kNN pass on this machine, and starts a row only if its
predicted wall time fits in what is left of --budget seconds: a row is never cut in the middle (one
that overruns its prediction so far that the budget would end first is stopped and writes nothing).
Each finished row is one JSON line in --out/lightly_cifar10.jsonl: lightly's figure (the best test kNN
over epochs), ssl_lab's (the final validation kNN, the online linear probe), img/s, wall time, the GPU,
torch, the commit and the exact command. A developer appends those lines to the results file.

Extra arguments are Hydra overrides applied to every row (the suite rehearses the whole script on a
CPU with tiny ones); they are recorded with the row and make it a different row of the file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig

from ssl_lab.config import CONF_DIR, check_config, compose
from ssl_lab.errors import UserError, run_reporting_errors
from ssl_lab.loggers import read_metrics
from ssl_lab.report import read_results

RESULTS = Path("benchmarks/results/lightly_cifar10.jsonl")
OUT_NAME = "lightly_cifar10.jsonl"
MARGIN = 1.15  # predicted time x this, plus STARTUP_S, must fit: the prediction is from ~20 steps
STARTUP_S = 20.0  # interpreter, imports and Hydra before the data loads (measured apart: data, kNN)


def table_rows() -> list[str]:
    """The experiments compare=lightly_cifar10 sweeps, in its order."""
    sweep = yaml.safe_load((CONF_DIR / "compare" / "lightly_cifar10.yaml").read_text())
    return sweep["hydra"]["sweeper"]["params"]["experiment"].split(",")


def pick_rows(wanted: str | None) -> list[str]:
    rows = table_rows()
    if not wanted:
        return rows
    names = [w if w.startswith("lightly_cifar10_") else f"lightly_cifar10_{w}" for w in wanted.split(",")]
    unknown = [n for n in names if n not in rows]
    if unknown:
        short = ", ".join(r.removeprefix("lightly_cifar10_") for r in rows)
        raise UserError(f"--rows: no row {', '.join(unknown)}; the table's rows are {short}")
    return names


def done(lines: list[dict[str, Any]], overrides: list[str]) -> set[str]:
    """The rows these lines hold for these extra overrides."""
    return {line["row"] for line in lines if line.get("overrides", []) == overrides}


# ---------------------------------------------------------------------------- measuring a row


def row_config(row: str, overrides: list[str]) -> DictConfig:
    """The row's config as its run composes it (not the bench's defaults, which would swap in their
    backbone, batch and data)."""
    cfg = compose("train", [f"experiment={row}", *overrides])
    check_config(cfg)
    return cfg


def measure(row: str, overrides: list[str], steps: int = 20, warmup: int = 5) -> dict[str, float]:
    """What one row costs here, from the runner's own builder: seconds per training step (the full step as
    the runner's loop runs it, batches and augmentation included; the first step, which compiles when trainer.compile, apart), per
    kNN pass of monitor.test_every (every training image and the test split), and to load the data."""
    from ssl_lab import bench
    from ssl_lab.build import Prefetch, pick_device
    from ssl_lab.eval.knn import knn_accuracy

    cfg = row_config(row, overrides)
    device = pick_device(cfg.trainer.device)
    start = time.perf_counter()
    data = bench.load_data(cfg)
    load_s = time.perf_counter() - start
    _, step, rng, loader = bench.training_inputs(cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # the runner's loop (ssl_lab/loop.py): each batch's views made while the step before runs, one
    # synchronisation per block; a sync after every step would put the augmentation in series with it
    prefetched = iter(Prefetch(step, loader, rng, device, cfg.trainer.overlap))

    def block(first: int, n: int) -> float:
        sync()
        begin = time.perf_counter()
        for i in range(first, first + n):
            views, labels = next(prefetched)
            step.train_on(views, i, labels)
        sync()
        return time.perf_counter() - begin

    first_s = block(0, 1)
    block(1, warmup - 1)
    step_s = block(warmup, steps) / steps
    begin = time.perf_counter()
    knn_accuracy(step.model, data, cfg.monitor.k, cfg.monitor.temperature, device=device,
                 batch_size=cfg.monitor.batch_size, autocast_dtype=step.autocast_dtype,
                 channels_last=cfg.trainer.channels_last, num_workers=cfg.trainer.num_workers)  # fmt: skip
    knn_s = time.perf_counter() - begin
    steps_per_epoch = len(data.train) // cfg.batch_size
    return {
        "step_s": step_s, "first_step_s": first_s, "knn_s": knn_s, "load_s": load_s,
        "steps_per_epoch": steps_per_epoch, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "test_every": cfg.monitor.test_every, "monitor_every": cfg.monitor.every,
    }  # fmt: skip


def predict(cost: dict[str, float]) -> float:
    """Seconds the row's run will take: start-up and data, the kNN passes at init (validation and
    pixels: about one), after epochs (test_every, monitor.every) and at the end, and the epochs."""
    epochs = cost["epochs"]
    passes = 3 + (epochs // cost["test_every"] if cost["test_every"] else 0)
    passes += epochs // cost["monitor_every"] if cost["monitor_every"] else 0
    train = epochs * cost["steps_per_epoch"] * cost["step_s"] + cost["first_step_s"]
    return STARTUP_S + cost["load_s"] + train + passes * cost["knn_s"]


# ---------------------------------------------------------------------------- running a row


def run_row(row: str, overrides: list[str], run_dir: Path, deadline: float) -> tuple[int | None, float]:
    """The row's real training command, in a process of its own; stopped (None) at `deadline`."""
    command = command_of(row, overrides, run_dir)
    start = time.monotonic()
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        code = process.wait(timeout=max(1.0, deadline - start))
    except subprocess.TimeoutExpired:
        process.terminate()  # the runner saves last.pt on SIGTERM; the row is not finished
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        return None, time.monotonic() - start
    return code, time.monotonic() - start


def command_of(row: str, overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ssl_lab.train", f"experiment={row}", *overrides, "logger=none",
            "trainer.progress=false", f"hydra.run.dir={run_dir}"]  # fmt: skip


def result_line(
    row: str, overrides: list[str], run_dir: Path, wall_s: float, cost: dict[str, float], predicted_s: float
) -> dict[str, Any]:
    """The row's figures, read from the run's metrics.jsonl and config, with what made them."""
    from ssl_lab.rundir import git_state

    metrics = read_metrics(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())

    def values(key: str) -> list[tuple[int, float]]:
        return [(m.get("epoch", 0), m[key]) for m in metrics if m.get(key) is not None]

    test_knn = values("test/knn_top1")
    best_epoch, best = max(test_knn, key=lambda v: v[1]) if test_knn else (None, None)
    last = lambda key: values(key)[-1][1] if values(key) else None  # noqa: E731
    rates = [v for _, v in values("train/img_per_s")]
    published = config.get("published") or {}
    shown = [a for a in command_of(row, overrides, Path("<run dir>"))[1:] if not a.startswith("hydra.")]
    return {
        "row": row,
        "method": config["method"]["name"],
        "overrides": overrides,
        "knn_test_best": best,
        "knn_test_best_epoch": best_epoch,
        "knn_test_last": last("test/knn_top1"),
        "val_knn": last("val/knn_top1"),
        "val_online": last("val/online_top1"),
        "test_online": last("test/online_top1"),
        "img_per_s": statistics.median(rates) if rates else None,
        "wall_s": round(wall_s, 1),
        "predicted_s": round(predicted_s, 1),
        "s_per_epoch": round(cost["steps_per_epoch"] * cost["step_s"], 3),
        "epochs": config["epochs"],
        "batch_size": config["batch_size"],
        "lightly_knn": published.get("top1"),
        "lightly_wall_minutes": published.get("wall_minutes"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "commit": git_state().get("commit"),
        "command": "python " + " ".join(shown),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_lab.fill_table", description=__doc__.split("\n")[0],
        usage="%(prog)s --budget SECONDS [--out DIR] [--rows a,b] [overrides]",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every row (recorded with it)")
    parser.add_argument("--budget", type=float, required=True, help="seconds this window may use, all in")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/fill_table")))
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=f"rows already done (default {RESULTS})"
    )
    parser.add_argument("--rows", help="only these rows, e.g. simclr,byol (default: every row, in order)")
    parser.add_argument(
        "--margin", type=float, default=MARGIN, help=f"start a row if its prediction x this fits ({MARGIN})"
    )
    args = parser.parse_intermixed_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    rows = pick_rows(args.rows)
    out_file = args.out / OUT_NAME
    have = done(read_results(args.results) + read_results(out_file), args.overrides)
    todo = [r for r in rows if r not in have]
    print(f"fill_table: {len(rows) - len(todo)} of {len(rows)} rows done ({args.results}, {out_file}); "
          f"budget {args.budget:.0f} s; torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}", flush=True)  # fmt: skip
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot write to --out {args.out} ({e.strerror}); pass a writable directory"
        ) from None
    filled, skipped = [], []
    for row in todo:
        cost = measure(row, args.overrides)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the measured model is gone: its memory goes to the row's run
        predicted = predict(cost)
        left = deadline - time.monotonic()
        summary = (f"{row}: {cost['steps_per_epoch'] * cost['step_s']:.2f} s/epoch + kNN {cost['knn_s']:.2f} s, "
                   f"first step {cost['first_step_s']:.1f} s, predicted {predicted:.0f} s")  # fmt: skip
        if predicted * args.margin > left:
            print(f"{summary}: does not fit in the {left:.0f} s left, not started", flush=True)
            skipped.append(row)
            continue
        print(f"{summary}: starting ({left:.0f} s left)", flush=True)
        run_dir = args.out / "runs" / row
        code, wall = run_row(row, args.overrides, run_dir, deadline)
        if code != 0:
            why = "stopped at the end of the budget" if code is None else f"failed (exit {code})"
            print(f"{row}: {why} after {wall:.0f} s; no line written (run dir {run_dir})", flush=True)
            skipped.append(row)
            continue
        line = result_line(row, args.overrides, run_dir, wall, cost, predicted)
        with out_file.open("a") as f:
            f.write(json.dumps(line) + "\n")
        filled.append(row)
        print(f"{row}: done in {wall:.0f} s (predicted {predicted:.0f}): test kNN best {line['knn_test_best']}"
              f" (lightly {line['lightly_knn']}), val kNN {line['val_knn']}", flush=True)  # fmt: skip
    print(f"fill_table: filled {len(filled)} row(s) into {out_file}"
          + (f"; not done: {', '.join(skipped)}" if skipped else ""), flush=True)  # fmt: skip
    return 0


def cli() -> None:
    run_reporting_errors(main)


if __name__ == "__main__":
    cli()
