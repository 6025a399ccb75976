"""Checkpoints: the progress state round-trips, and the background writer writes a snapshot atomically."""

from pathlib import Path

import pytest
import torch

from ssl_lab import checkpoint
from ssl_lab.checkpoint import TrainState, Writer


def test_the_writer_writes_a_snapshot_of_the_state_at_save_time(tmp_path: Path) -> None:
    weights = torch.zeros(1000)
    state = {"model": {"w": weights}, "nested": [torch.ones(3), (torch.ones(2), 5)], "step": 7}
    with Writer() as writer:
        writer.save(state, tmp_path / "last.pt")
        weights.add_(1)  # training goes on changing the weights in place
    saved = checkpoint.load(tmp_path / "last.pt")
    assert torch.equal(saved["model"]["w"], torch.zeros(1000)) and saved["step"] == 7
    assert isinstance(saved["nested"][1], tuple) and saved["nested"][1][1] == 5
    assert not (tmp_path / "last.pt.tmp").exists()


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path: Path) -> None:
    writer = Writer()
    writer.save({"x": torch.ones(1)}, tmp_path / "no" / "such" / "dir" / "last.pt")
    with pytest.raises((FileNotFoundError, RuntimeError), match="does not exist|No such file"):
        writer.wait()
    writer.wait()  # raised once


def test_train_state_round_trips_and_restores_the_rng() -> None:
    state = TrainState(epoch=2, batch_in_epoch=3, step=19, wandb_id="abc", knn_init=30.2)
    saved = state.state_dict()
    expected = torch.rand(3)
    restored = TrainState()
    restored.load_state_dict(saved)
    assert (restored.epoch, restored.batch_in_epoch, restored.step) == (2, 3, 19)
    assert restored.wandb_id == "abc" and restored.knn_init == 30.2 and restored.aug_rng_device == "cpu"
    assert torch.equal(torch.rand(3), expected)  # the torch RNG continues where it was saved


class _RunsCode:
    """What a malicious checkpoint could hold: unpickling it would call `touch`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_checkpoints_load_weights_only(tmp_path: Path) -> None:
    """Everything a run saves (model, optimizer, scheduler, RNG streams incl. the augmentation's
    generator, the run's state and config) loads with weights_only=True; a pickled object does not."""
    generator = torch.Generator().manual_seed(3)
    state = TrainState(step=5, wandb_id="abc", knn_init=30.2)
    state.aug_rng = generator.get_state()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state.state_dict()}
    saved["config"] = {"epochs": 3, "eval_after": ["knn", "linear eval.epochs=5"], "resume": False}
    checkpoint.save(saved, tmp_path / "last.pt")
    loaded = checkpoint.load(tmp_path / "last.pt")
    assert loaded["config"] == saved["config"] and torch.equal(loaded["aug_rng"], state.aug_rng)
    assert torch.equal(
        loaded["optimizer"]["state"][0]["momentum_buffer"], optimizer.state[model.weight]["momentum_buffer"]
    )

    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "config": {}, "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()
