"""Checkpoints: what a run's progress is (`TrainState`) and writing it atomically, so that a crash or kill
mid-write never leaves a broken last.pt behind.

A checkpoint is one flat dict: the step's parts (model, optimizer, scheduler, scaler: `TrainStep`),
the progress (`TrainState`) and the resolved config. `last.pt` is what resume reads, `final.pt` what
evaluation reads.
"""

from __future__ import annotations

import os
import threading
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
    knn_pixels: float | None = None  # the same kNN on raw pixels

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
            "knn_pixels": self.knn_pixels,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.aug_rng, self.wandb_id, self.knn_init = state["aug_rng"], state["wandb_id"], state["knn_init"]
        self.knn_pixels = state.get("knn_pixels")  # runs saved before the pixel baseline have none
        self.aug_rng_device = state.get("aug_rng_device", "cpu")
        set_rng_state(state["rng"])


class Writer:
    """Writes checkpoints in a background thread, so that training does not wait for the disk: the
    training thread only copies the state off the device (a snapshot: training goes on changing the
    weights in place), the thread writes it atomically (`save`). One write at a time; `wait()` (or
    leaving the `with` block) returns when the last one is on disk and re-raises its error.

    The runner uses it for GPU runs, where torch.save would make that copy anyway; on a CPU the copy
    is a memcpy that costs about what the write does (benchmarks/checkpoint.py), so `background=False`
    writes in the caller's thread."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], path: Path) -> None:
        self.wait()
        if not self.background:
            save(state, path)
            return
        snapshot = to_cpu(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot, path), name="ssl_lab-checkpoint")
        self._thread.start()

    def _write(self, state: dict[str, Any], path: Path) -> None:
        try:
            save(state, path)
        except BaseException as e:  # handed to the training thread at the next wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.wait()
        elif self._thread is not None:  # an error is on its way out: finish the write, keep that error
            self._thread.join()
            self._thread = None


def to_cpu(state: Any) -> Any:
    """A copy of `state` with every tensor copied to the CPU (nested dicts, lists and tuples)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(to_cpu(v) for v in state)
    return state


def save(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:  # on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """Tensors, numbers, strings and containers only (`weights_only`): a checkpoint from elsewhere
    cannot run code when it is read."""
    return torch.load(path, map_location="cpu", weights_only=True)


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
