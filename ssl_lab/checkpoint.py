"""Checkpoints: what a run's progress is (`TrainState`) and writing it atomically, so that a crash or kill
mid-write never leaves a broken last.pt behind.

A checkpoint is one flat dict: the step's parts (model, optimizer, scheduler, scaler: `TrainStep`),
the progress (`TrainState`) and the resolved config. `last.pt` is what resume reads, `final.pt` what
evaluation reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainState:
    """Where a run stands, beyond the weights: enough to continue it exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained on (a mid-epoch stop)
    step: int = 0
    aug_rng: torch.Tensor | None = None  # the augmentation stream's state at a mid-epoch stop
    aug_rng_device: str = "cpu"  # the device type of that stream's generator
    wandb_id: str | None = None
    knn_init: float | None = None  # the kNN monitor at random init

    @property
    def fresh(self) -> bool:
        return self.epoch == 0 and self.batch_in_epoch == 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "rng": rng_state(),
            "aug_rng": self.aug_rng,
            "aug_rng_device": self.aug_rng_device,
            "wandb_id": self.wandb_id,
            "knn_init": self.knn_init,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.aug_rng, self.wandb_id, self.knn_init = state["aug_rng"], state["wandb_id"], state["knn_init"]
        self.aug_rng_device = state.get("aug_rng_device", "cpu")
        set_rng_state(state["rng"])


def save(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:  # on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Also on another machine: GPU streams go to the GPUs present (a CPU-only machine, or one with
    fewer GPUs, keeps those it has)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
