"""Does your config train the same on N processes as on one? A few steps of each, from the same seed.

    python -m ssl_lab.check_ddp method=nnclr optimizer=lars batch_size=64      # any train overrides
    python -m ssl_lab.check_ddp --nproc 4 --steps 6 experiment=cifar10_simclr

The global batch, the data order and the augmentation parameters are the same whatever the number of
processes, so the losses step by step and the state at the end (weights and buffers) must agree to
float precision. A loss that is averaged where it should be gathered, negatives taken only from the
own process, a support set fed only locally, batch norm over the local batch: each shows here as a
difference far above float level. Runs on CPU processes (gloo) unless trainer.device says cuda and GPUs
are present. Both runs are in fp32 with TF32 off and deterministic cuDNN (trainer.precision=32
trainer.deterministic=true), whatever the config says: bf16 autocast and per-batch-size cuDNN
algorithms differ by more than float noise between 1 and N processes without any bug.

Some configs amplify float noise step by step (small batches under SGD, a nearest-neighbour argmax), so a
fixed tolerance would cry wolf on them. A second 1-process run with the other memory layout
(trainer.channels_last flipped: the same maths, kernels that sum in another order) measures this config's
own noise; a difference passes when it is within the tolerance or within NOISE_FACTOR times that noise.
Prints the differences beside the noise and one PASS or FAIL line; exit status 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ssl_lab import checkpoint
from ssl_lab.build import build_model
from ssl_lab.config import check_command_line, check_config, compose
from ssl_lab.errors import UserError, run_reporting_errors
from ssl_lab.launch import launch
from ssl_lab.loggers import read_metrics
from ssl_lab.train import train

# Each kind of number on its own scale. Losses: relative to the loss. Weights: the two runs' distance
# over all parameters relative to how far training moved them in the 1-process run (one norm over the
# whole network: a parameter the loss does not depend on, e.g. a bias that the next batch norm removes,
# gets only float noise as gradient, which Adam turns into full-size random steps, so compared alone it
# would differ by its whole update without any bug). Buffers (BN statistics, a support queue of
# un-normalised embeddings), each relative to its own size, and a BN running mean in units of its
# running standard deviation (a mean near 0, e.g. behind such a bias, has no size of its own): no
# absolute tolerance made for small values is applied to large ones. Float noise (kernels that sum in a
# batch-size-dependent order, on any processor) stays far below; the bugs above move a loss by 1e-2 and
# the state by a fraction of its change of order 1 (measured: benchmarks/README.md, "check_ddp's
# tolerances").
LOSS_TOLERANCE = 1e-3
WEIGHTS_TOLERANCE = 1e-1  # Adam's first steps are sign-like: near-zero gradients' noise becomes full steps
BUFFERS_TOLERANCE = 2e-2
NOISE_FACTOR = 3  # 1 vs N processes against two 1-process runs that differ only in summation order
# The online linear probe (monitor.online_linear) on its own, relative to its own change in training:
# plain SGD, so no allowance for Adam's sign-like steps. Measured (debug=smoke, 3 steps): 2.5e-7 apart;
# 6.4e-2 with its batch norm per process, 9.1e-1 with its gradients not summed over processes.
PROBE_TOLERANCE = 1e-2
TOLERANCES = {
    "loss": LOSS_TOLERANCE, "weights": WEIGHTS_TOLERANCE, "buffers": BUFFERS_TOLERANCE, "probe": PROBE_TOLERANCE,
}  # fmt: skip


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
        cfg.trainer.precision, cfg.trainer.deterministic = "32", True  # comparable: see the docstring
    return cfg


@dataclass
class Differences:
    loss: float  # largest over the steps, relative to the loss
    weights: float  # over all parameters, relative to their change in training
    weights_where: str  # the parameter with the largest share of it
    buffers: float  # largest over the buffers, each relative to its size (`buffer_scale`)
    buffers_where: str
    probe: float = 0.0  # the online linear probe's weights, relative to their change (0: no probe)

    @property
    def ok(self) -> bool:
        """Within the fixed tolerances (no allowance for a config's own noise)."""
        return all(getattr(self, k) <= t for k, t in TOLERANCES.items())

    def within(self, noise: Differences) -> dict[str, bool]:
        """Per kind, whether the difference is within its tolerance or NOISE_FACTOR x this config's noise."""
        return {
            k: getattr(self, k) <= max(t, NOISE_FACTOR * getattr(noise, k)) for k, t in TOLERANCES.items()
        }


def compare(init: Path, one: Path, many: Path, parameters: set[str]) -> Differences:
    """The two runs' losses step by step, and their final state against the initial one (`init`)."""
    losses = [[r["train/loss"] for r in read_metrics(d) if "train/loss" in r] for d in (one, many)]
    if len(losses[0]) != len(losses[1]) or not losses[0]:
        raise RuntimeError(f"the runs logged {len(losses[0])} and {len(losses[1])} steps")
    loss = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(*losses))
    saved = [checkpoint.load(d / "final.pt") for d in (init, one, many)]
    start, end_one, end_many = (state["model"] for state in saved)
    floats = [k for k in end_one if end_one[k].is_floating_point() and end_one[k].numel()]
    apart = {k: (end_one[k].double() - end_many[k].double()).norm().item() for k in floats}
    moved = {k: (end_one[k].double() - start[k].double()).norm().item() for k in floats}
    weights = [k for k in floats if k in parameters]
    total_moved = max(sum(moved[k] ** 2 for k in weights) ** 0.5, 1e-12)
    buffers = {k: apart[k] / buffer_scale(k, end_one) for k in floats if k not in parameters}
    worst_buffer = max(buffers, key=buffers.get, default="-")
    return Differences(
        loss=loss,
        weights=sum(apart[k] ** 2 for k in weights) ** 0.5 / total_moved,
        weights_where=max(weights, key=apart.get, default="-"),
        buffers=buffers.get(worst_buffer, 0.0),
        buffers_where=worst_buffer,
        probe=probe_difference(*(state.get("online_linear") for state in saved)),
    )


def probe_difference(start: dict | None, one: dict | None, many: dict | None) -> float:
    """The two runs' online linear probes apart, relative to how far the 1-process run moved it."""
    if start is None or one is None or many is None:
        return 0.0
    start, one, many = (probe["linear"] for probe in (start, one, many))
    apart = sum((one[k].double() - many[k].double()).norm() ** 2 for k in one) ** 0.5
    moved = sum((one[k].double() - start[k].double()).norm() ** 2 for k in one) ** 0.5
    return float(apart / max(moved, 1e-12))


def buffer_scale(key: str, state: dict[str, torch.Tensor]) -> float:
    """The size a buffer's difference is measured against: its norm; for a BN running mean, the norm
    of the running standard deviation beside it."""
    var = key.removesuffix("running_mean") + "running_var"
    reference = (
        state[var].clamp(min=0).sqrt() if key.endswith("running_mean") and var in state else state[key]
    )
    return max(reference.double().norm().item(), 1e-12)


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
        init, one, other, many = (
            Path(tmp) / name for name in ("init", "1", "1-other-layout", str(args.nproc))
        )
        print(f"{cfg.method.name} + {cfg.backbone.name}, batch {cfg.batch_size}, {args.steps} steps, in fp32 "
              "with TF32 off and deterministic cuDNN: 1 process ...", flush=True)  # fmt: skip
        train(OmegaConf.merge(cfg, {"epochs": 0}), run_dir=init)  # the initial state, which all share
        train(cfg, run_dir=one)
        print("... 1 process with the other memory layout (this config's float noise) ...", flush=True)
        train(
            OmegaConf.merge(cfg, {"trainer": {"channels_last": not cfg.trainer.channels_last}}), run_dir=other
        )
        print(f"... and {args.nproc} processes", flush=True)
        with open_dict(cfg):
            cfg.trainer.nproc_per_node = args.nproc
        launch(cfg, many)
        parameters = {name for name, _ in build_model(cfg, torch.device("cpu")).named_parameters()}
        d, noise = compare(init, one, many, parameters), compare(init, one, other, parameters)
    within = d.within(noise)
    ok = all(within.values())
    what = {
        "loss": "largest over the steps, relative to the loss",
        "weights": f"over all parameters, relative to their change in training (most in {d.weights_where})",
        "buffers": f"largest, relative to its size ({d.buffers_where})",
        "probe": "the online linear probe's weights, relative to their change (0: none)",
    }
    print(f"  {'':8} {'1 vs ' + str(args.nproc):>9} {'noise':>9}  (tolerance: the larger of the fixed one and "
          f"{NOISE_FACTOR}x noise)")  # fmt: skip
    for k in TOLERANCES:
        print(f"  {k:8} {getattr(d, k):9.2e} {getattr(noise, k):9.2e}  {'ok ' if within[k] else 'BAD'} "
              f"{what[k]}; fixed tolerance {TOLERANCES[k]:g}")  # fmt: skip
    if not noise.ok:
        print("  this config amplifies float noise (two 1-process runs differ beyond a fixed tolerance): "
              "the check is less sensitive here; fewer --steps sharpen it")  # fmt: skip
    print(f"{'PASS' if ok else 'FAIL'}: {args.nproc} processes train {'like' if ok else 'unlike'} 1 "
          f"for this config", flush=True)  # fmt: skip
    return 0 if ok else 1


def cli() -> None:
    run_reporting_errors(lambda: sys.exit(main()))


if __name__ == "__main__":
    cli()
