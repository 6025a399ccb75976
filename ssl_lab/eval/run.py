"""The evaluation runner: checkpoint -> backbone -> protocol -> console, eval.json, metrics.jsonl, W&B.

    python -m ssl_lab.eval checkpoint=outputs/simclr-synthetic/2026-11-25_10-00-00 eval=linear

`evaluate(cfg)` does the work and is what tests call; the pretraining runner composes
`eval_after=[...]` with `eval_after_configs` and calls `evaluate` on each. Results of every protocol land in the pretraining run's own directory.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ssl_lab import checkpoint
from ssl_lab.build import build_model, pick_device, precision_dtype
from ssl_lab.config import CONF_DIR, check_command_line, check_config, compose, register_resolvers
from ssl_lab.data.datasets import DataSplits
from ssl_lab.errors import (
    USER_FACING,
    UserError,
    exit_status,
    fail,
    one_line,
    run_reporting_errors,
    user_message,
)
from ssl_lab.eval.common import EvalContext
from ssl_lab.loggers import RunLogger
from ssl_lab.rundir import console_log, find_checkpoint, write_json


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = checkpoint.load(path)
    except Exception as e:  # not a torch file, truncated, ...
        raise UserError(
            f"cannot read checkpoint {path} ({type(e).__name__}); pass an ssl_lab final.pt or last.pt"
        ) from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise UserError(
            f"{path} is not an ssl_lab pretraining checkpoint (no model/config); pass final.pt or last.pt"
        )
    return state


def data_name(cfg: DictConfig, state: dict[str, Any]) -> str:
    """The data set evaluated on: data=... of this command, else the pretraining run's."""
    return cfg.data.name if cfg.get("data") is not None else state["config"]["data"]["name"]


def load_context(cfg: DictConfig, path: Path, state: dict[str, Any], data: DataSplits | None) -> EvalContext:
    pretrain = state["config"]
    device = pick_device(cfg.trainer.device)
    torch.manual_seed(cfg.seed)
    if data is None:
        data_cfg = cfg.data if cfg.get("data") is not None else pretrain["data"]
        # no validation split: the final evaluation trains on every labelled training image
        data = instantiate(data_cfg, num_workers=cfg.trainer.num_workers, val_size=0)
    if data.memory is None or data.test is None:
        raise UserError(
            f"eval={cfg.eval.name} needs labelled train and test images, and data={data_name(cfg, state)} "
            "has none; choose a labelled data set, e.g. data=cifar10"
        )
    parts = {"method": pretrain["method"], "backbone": pretrain["backbone"], "trainer": cfg.trainer}
    model = build_model(OmegaConf.create(parts), device)
    model.load_state_dict(state["model"])
    return EvalContext(
        model=model, pretrain_config=pretrain, data=data, device=device,
        autocast_dtype=precision_dtype(cfg.trainer.precision, device), channels_last=cfg.trainer.channels_last,
        num_workers=cfg.trainer.num_workers, seed=cfg.seed, run_dir=path.parent, progress=cfg.trainer.progress,
    )  # fmt: skip


def evaluate(
    cfg: DictConfig, logger: RunLogger | None = None, data: DataSplits | None = None
) -> dict[str, float]:
    """Run the protocol `cfg.eval` on `cfg.checkpoint`; returns its metrics (eval/<protocol>_top1, ...)."""
    check_config(cfg)
    path = find_checkpoint(cfg.checkpoint)
    state = load_checkpoint(path)
    ctx = load_context(cfg, path, state, data)
    print(
        f"eval={cfg.eval.name} on {path} (epoch {state.get('epoch')}, step {state.get('step')}), "
        f"data={data_name(cfg, state)}: "
        f"{len(ctx.data.memory)} labelled train / {len(ctx.data.test)} test images",
        flush=True,
    )
    settings = OmegaConf.to_container(cfg.eval, resolve=True)
    protocol = hydra.utils.get_method(settings["_target_"])
    start = time.perf_counter()
    metrics = protocol(ctx, **{k: v for k, v in settings.items() if k not in ("_target_", "name")})
    seconds = time.perf_counter() - start

    key = next(iter(metrics)).removeprefix("eval/").rsplit("_", 1)[0]  # knn, linear, finetune_10pct, ...
    record = {
        "metrics": metrics, "settings": settings, "checkpoint": str(path), "epoch": state.get("epoch"),
        "step": state.get("step"), "data": data_name(cfg, state), "seconds": round(seconds, 1),
        "time": datetime.now().isoformat(timespec="seconds"),
    }  # fmt: skip
    results_path = path.parent / "eval.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    write_json(results_path, {**results, key: record})

    own_logger = logger is None
    if own_logger:
        run_id = state.get("wandb_id")
        logger = RunLogger(path.parent, logger_config(cfg, state), {"eval": {key: settings}}, run_id, True)
    try:
        logger.log(metrics, step=state.get("step") or 0)
    finally:
        if own_logger:
            logger.finish()
    for name, value in metrics.items():
        print(f"  {name:34s} {value:8.2f}" if isinstance(value, float) else f"  {name:34s} {value:8d}")
    print(f"  {seconds:.1f} s; saved in {results_path}", flush=True)
    return metrics


def logger_config(cfg: DictConfig, state: dict[str, Any]) -> DictConfig:
    """Where the results are logged besides eval.json and metrics.jsonl: by default (logger=null) as the
    pretraining run logged, so a run trained with logger=none stays off W&B and a W&B run gets its
    eval/... metrics in its own charts (project, name and group from the checkpoint, which also holds
    its id). logger=wandb|none chooses; its interpolations (${method.name}, ...) name the pretraining
    run, and for a W&B run it joins, only its mode (offline/online/disabled) is this command's."""
    pretrain = state["config"]
    trained_with = pretrain.get("logger") or {"name": "none"}  # runs older than the logger group: none
    if cfg.get("logger") is None:
        return OmegaConf.create(trained_with)
    chosen = OmegaConf.merge(pretrain, {"logger": cfg.logger}).logger  # resolved among the run's keys
    if chosen.name == "wandb" and trained_with.get("name") == "wandb":
        chosen = OmegaConf.merge(chosen, {k: v for k, v in trained_with.items() if k != "mode"})
    return chosen


def compose_eval(overrides: list[str]) -> DictConfig:
    """conf/eval.yaml with these overrides (inside a running Hydra app too)."""
    return compose("eval", overrides)


def eval_after_configs(cfg: DictConfig, checkpoint_path: Path) -> list[DictConfig]:
    """The configs of `eval_after=[knn, "linear eval.epochs=50", ...]` (each entry: a protocol and its
    overrides), composed before pretraining starts so that a typo fails at once, not after hours."""
    configs = []
    for entry in cfg.eval_after or []:
        name, *overrides = str(entry).split()  # the name itself is checked by check_config
        try:
            ecfg = compose_eval([f"eval={name}", f"checkpoint={checkpoint_path}", *overrides])
        except Exception as e:
            raise UserError(f"eval_after entry {str(entry)!r}: {one_line(str(e))}") from None
        with open_dict(ecfg):  # the pretraining run's device, precision and seed
            ecfg.trainer, ecfg.seed = cfg.trainer, cfg.seed
        check_config(ecfg)
        configs.append(ecfg)
    return configs


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    with console_log(Path(HydraConfig.get().runtime.output_dir) / "eval.log"):
        try:
            metrics = evaluate(cfg)
        except USER_FACING as e:
            print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
            sys.exit(exit_status(e))
    return next(iter(metrics.values()))  # top-1, for sweepers


def cli() -> None:
    args = sys.argv[1:]
    check_command_line(args)
    keys = [a.split("=")[0].lstrip("+~") for a in args if a.lstrip("+~").startswith("logger.")]
    if keys and not any(a.startswith("logger=") for a in args):  # the default logger is the run's: null
        fail(
            f"{keys[0]} needs the logger chosen first: add logger=wandb (or logger=none) to the command line"
        )
    run_reporting_errors(main)
