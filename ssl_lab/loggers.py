"""Metrics to `metrics.jsonl` in the run dir (always) and to Weights & Biases (optional)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf


@dataclass
class LoggerSettings:
    """conf/logger/*.yaml: `none` (metrics.jsonl only) or `wandb` (also Weights & Biases)."""

    name: str  # wandb | none
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


class RunLogger:
    """The same metric names everywhere: train/loss, train/lr, train/img_per_s, val/knn_top1."""

    def __init__(
        self, run_dir: Path, cfg: DictConfig, config: dict, run_id: str | None, enabled: bool
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.run_id = run_id
        cfg = LoggerSettings(**OmegaConf.to_container(cfg, resolve=True))
        if enabled and cfg.name == "wandb" and cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                job_type=cfg.job_type,
                tags=list(cfg.tags),
                name=cfg.run_name,
                config=config,
                dir=str(run_dir),
                mode=cfg.mode,
                id=run_id,
                resume="allow",
            )
            self.run_id = self.wandb_run.id
            # Our step is the x-axis: a resumed run re-logs steps after its checkpoint, which W&B's
            # own monotonic step would drop.
            self.wandb_run.define_metric("*", step_metric="trainer/step")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({**metrics, "trainer/step": step})

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
