"""The runner end to end: training, run-dir contents, resume after SIGTERM and kill -9, NaN, W&B."""

import importlib.metadata
import itertools
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, METHODS, compose_cfg, method_args, run_cli, start_cli

from ssl_lab import checkpoint
from ssl_lab.errors import TrainingDiverged
from ssl_lab.loggers import read_metrics
from ssl_lab.train import train


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.mark.parametrize("method", METHODS)
def test_train_in_process(method: str, tmp_path: Path) -> None:
    cfg = compose_cfg([*FAST, *method_args(method)])
    top1 = train(cfg, run_dir=tmp_path)
    assert top1 is not None and 0 <= top1 <= 100
    rows = read_metrics(tmp_path)
    assert rows[0]["step"] == 0 and "val/knn_top1" in rows[0]  # the random-init monitor
    assert "val/knn_top1_pixels" in rows[1]
    # the test split only once, at the end: the online linear probe's figure beside eval_after's
    tested = [(r["step"], k) for r in rows for k in r if k.startswith("test/")]
    assert tested == [(rows[-1]["step"], "test/online_top1")], tested
    assert "val/online_top1" in rows[-2] and "train/online_top1" in set().union(*rows)
    assert top1 == [r["val/knn_top1"] for r in rows if "val/knn_top1" in r][-1]  # what sweepers get
    names = set().union(*rows)
    assert {"train/loss", "train/lr", "train/img_per_s", "val/knn_top1"} <= names
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    # training health (ssl_lab.health) at every log step, for every method
    trained = [r for r in rows if "train/loss" in r]
    for name in ("train/feature_std", "train/feature_rank", "train/grad_norm"):
        assert all(math.isfinite(r[name]) for r in trained), name
    assert all(0 <= r["train/feature_std"] <= 1 and 1 <= r["train/feature_rank"] <= 32 for r in trained)
    for name in ("last.pt", "final.pt", "config.yaml", "run_info.json"):
        assert (tmp_path / name).exists(), name
    state = checkpoint.load(tmp_path / "final.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "config", "wandb_id"} <= set(
        state
    )
    assert state["epoch"] == cfg.epochs and state["config"]["method"]["name"] == method
    info = json.loads((tmp_path / "run_info.json").read_text())["starts"][0]
    assert info["versions"]["torch"] == importlib.metadata.version("torch")
    assert "ssl_lab.train" in info["command"] and "commit" in info["git"]


def test_without_a_validation_split_the_monitor_says_test_and_returns_nothing(tmp_path: Path, capsys) -> None:
    top1 = train(compose_cfg([*FAST, "epochs=1", "data.val_size=0"]), run_dir=tmp_path)
    assert top1 is None  # a sweeper never optimises a test figure
    rows = read_metrics(tmp_path)
    assert "test/knn_top1" in rows[0] and not any("val/knn_top1" in r for r in rows)
    assert "no validation split (data.val_size=0)" in capsys.readouterr().out


def test_unlabelled_data_trains_without_a_monitor_and_says_so(tmp_path: Path, capsys) -> None:
    from PIL import Image

    for i in range(64):
        Image.new("RGB", (36, 36), (i * 4, 255 - i * 4, 90)).save(tmp_path / f"{i}.png")
    cfg = compose_cfg([*FAST, "epochs=1", "data=imagefolder", f"data.root={tmp_path}", "data.image_size=32"])
    assert train(cfg, run_dir=tmp_path / "run") is None
    assert "has no labels: no validation split and no kNN monitor" in capsys.readouterr().out
    assert not any("knn" in k for r in read_metrics(tmp_path / "run") for k in r)


@pytest.mark.parametrize(
    "switches",
    [
        ["trainer.precision=bf16", "trainer.channels_last=true"],
        ["trainer.precision=16", "trainer.grad_clip=1.0", "trainer.channels_last=false"],
        ["method=nnclr", "optimizer=lars", "scheduler=constant", "augment=simclr_imagenet"],
        pytest.param(["trainer.compile=true"], marks=pytest.mark.slow),
    ],
)
def test_trainer_switches_train(switches: list[str], tmp_path: Path) -> None:
    top1 = train(compose_cfg([*FAST, "epochs=1", *switches]), run_dir=tmp_path)
    assert top1 is not None
    assert all(math.isfinite(loss) for _, loss in losses(tmp_path))


def test_same_seed_same_losses_different_seed_differs(tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(
            compose_cfg([*FAST, "epochs=1", f"seed={seed}", "trainer.log_every=1"]), run_dir=tmp_path / name
        )
        runs[name] = losses(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_loss_nan_stops_and_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssl_lab.methods.simclr import SimCLR

    real_step = SimCLR.training_step
    calls = {"n": 0}

    def poisoned(self, views):
        calls["n"] += 1
        out = real_step(self, views)
        if calls["n"] > 10:  # epoch 2 of 8 steps each
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SimCLR, "training_step", poisoned)
    with pytest.raises(TrainingDiverged, match="NaN/inf.*last good checkpoint"):
        train(compose_cfg([*FAST, "epochs=3"]), run_dir=tmp_path)
    state = checkpoint.load(tmp_path / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "final.pt").exists()


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_gradients_with_a_finite_loss_stop_the_run(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradients poisoned after the 10th backward (epoch 2; its loss finite, and step 10 a log step):
    the run stops there with the last good checkpoint, which resumes, and no NaN in any file written."""
    from ssl_lab import build

    real_norm, calls = build.grad_norm, {"n": 0}

    def poisoned(optimizer):
        calls["n"] += 1
        if calls["n"] == 10:
            next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None).grad.fill_(
                math.nan
            )
        return real_norm(optimizer)

    monkeypatch.setattr(build, "grad_norm", poisoned)
    cfg = compose_cfg([*FAST, *method_args(method), "epochs=3"])
    with pytest.raises(
        TrainingDiverged, match=r"gradients became NaN/inf \(the loss was finite\) in epoch 1 "
    ):
        train(cfg, run_dir=tmp_path)
    monkeypatch.undo()
    state = checkpoint.load(tmp_path / "last.pt")
    assert state["epoch"] == 1 and not (tmp_path / "final.pt").exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert (
        train(compose_cfg([*FAST, *method_args(method), "epochs=3", "resume=true"]), run_dir=tmp_path)
        is not None
    )


def test_the_health_signals_do_not_change_the_training(tmp_path: Path) -> None:
    """monitor.health's pass (eval mode, no gradients) leaves the run as it was: the same losses and
    weights with it on and off."""
    runs = {}
    for health in (True, False):
        run_dir = tmp_path / str(health)
        train(compose_cfg([*FAST, "epochs=1", "++backbone.kwargs.drop_path_rate=0.1", f"monitor.health={health}"]),
              run_dir=run_dir)  # fmt: skip
        runs[health] = (losses(run_dir), checkpoint.load(run_dir / "final.pt")["model"])
        logged = set().union(*read_metrics(run_dir))
        assert ("train/feature_rank" in logged) == health and "train/grad_norm" in logged
    assert runs[True][0] == runs[False][0]
    for name, value in runs[True][1].items():
        torch.testing.assert_close(value, runs[False][1][name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_cli_run_dir_and_cfg_job(workdir: Path) -> None:
    result = run_cli(*FAST, "epochs=1", cwd=workdir)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (workdir / "outputs").glob("simclr-synthetic/*")
    assert {"config.yaml", "run_info.json", "metrics.jsonl", "last.pt", "final.pt", ".hydra"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert "kNN top-1:" in result.stdout and "at random init" in result.stdout
    log = (run_dir / "train.log").read_text().splitlines()  # the console, also in the run dir
    assert [line for line in result.stdout.splitlines() if line.strip()] == log[1:], log
    shown = run_cli("method=nnclr", "optimizer=lars", "--cfg", "job", cwd=workdir)
    assert shown.returncode == 0 and "nnclr" in shown.stdout and "timm.optim.Lars" in shown.stdout
    helped = run_cli("--help", cwd=workdir)
    assert helped.returncode == 0 and f"method: {', '.join(METHODS)}" in helped.stdout


def steps_logged(n: int):
    return lambda p: any(f'"step": {n},' in line for line in p.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_interrupt_and_resume_equals_uninterrupted(how: str, workdir: Path) -> None:
    args = [*FAST, "epochs=3", "trainer.log_every=1", "trainer.progress=false"]
    reference = run_cli(*args, "hydra.run.dir=reference", cwd=workdir)
    assert reference.returncode == 0, reference.stderr

    proc = start_cli(*args, cwd=workdir)
    try:
        if how == "sigterm":  # mid-epoch: the handler saves at the next step boundary
            wait_for_glob(workdir, "outputs/*/*/metrics.jsonl", steps_logged(11))
            os.kill(proc.pid, signal.SIGTERM)
        else:  # after the epoch-1 checkpoint, in the middle of epoch 2
            wait_for_glob(workdir, "outputs/*/*/last.pt", lambda p: True)
            wait_for_glob(workdir, "outputs/*/*/metrics.jsonl", steps_logged(12))
            os.kill(proc.pid, signal.SIGKILL)
        done = proc.finish(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    if how == "sigterm":
        assert done.returncode == 128 + signal.SIGTERM and "resume=true" in done.stderr, done.stderr
    else:
        assert done.returncode == -signal.SIGKILL
    (interrupted,) = (workdir / "outputs").glob("*/*/last.pt")
    assert checkpoint.load(interrupted)["epoch"] < 3

    resumed = run_cli(*args, "resume=true", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {interrupted.parent.resolve()} at epoch" in resumed.stdout
    log = (interrupted.parent / "train.log").read_text()  # one log: the first start, then the resume
    assert log.count("\n--- ") == 1 and "Resuming" in log.split("\n--- ")[1]
    assert losses(interrupted.parent) == losses(workdir / "reference")
    ours, ref = (
        checkpoint.load(d / "final.pt")["model"] for d in (interrupted.parent, workdir / "reference")
    )
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_a_stopped_run_resumes_exactly(method: str, tmp_path: Path, monkeypatch) -> None:
    """Every method: stopped mid-epoch (as on a signal) and resumed, it ends where an unstopped run
    ends, bit for bit: its teacher, queue, centre and any other state travel in last.pt, and so does
    the online linear probe (its weights, momentum and schedule)."""
    from ssl_lab import loop
    from ssl_lab.errors import Interrupted

    cfg = compose_cfg([*FAST, *method_args(method), "trainer.log_every=3", "monitor.every=0"])
    train(cfg, run_dir=tmp_path / "reference")
    asked = itertools.count(1)  # asked at log steps (3, 6, 8) and after the epoch; the 5th: step 9
    monkeypatch.setattr(loop.Stop, "requested", lambda self: next(asked) >= 5)
    with pytest.raises(Interrupted):
        train(cfg, run_dir=tmp_path / "stopped")
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "stopped" / "last.pt")["step"] == 9  # mid-epoch 2 of 8 steps
    cfg.resume = str(tmp_path / "stopped")
    train(cfg, run_dir=tmp_path / "stopped")
    ours, ref = (checkpoint.load(tmp_path / d / "final.pt") for d in ("stopped", "reference"))
    ours, ref = ({**s["model"], **s["online_linear"]["linear"]} for s in (ours, ref))  # and the probe's
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=key)


def wait_for_glob(root: Path, pattern: str, predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in root.glob(pattern):
            if "reference" not in str(path) and predicate(path):
                return
        time.sleep(0.1)
    raise TimeoutError(pattern)


@pytest.mark.slow
def test_wandb_offline_run_is_continued_on_resume(workdir: Path) -> None:
    args = [*FAST, "logger=wandb", "epochs=1", "hydra.run.dir=run"]
    first = run_cli(*args, cwd=workdir)
    assert first.returncode == 0, first.stderr
    run_id = checkpoint.load(workdir / "run" / "final.pt")["wandb_id"]
    offline = list((workdir / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline, list((workdir / "run").rglob("*"))
    second = run_cli(*[a for a in args if a != "epochs=1"], "epochs=2", "resume=run", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert checkpoint.load(workdir / "run" / "final.pt")["wandb_id"] == run_id


def test_a_run_stopped_on_another_kind_of_device_resumes_here(tmp_path: Path, capsys) -> None:
    """A mid-epoch checkpoint whose augmentation stream came from a GPU generator (16 bytes of state,
    which a CPU generator cannot take) resumes on a CPU with a new stream for the rest of the epoch."""
    cfg = compose_cfg([*FAST, "epochs=1"])
    train(cfg, run_dir=tmp_path)
    state = checkpoint.load(tmp_path / "last.pt")
    state.update(epoch=0, batch_in_epoch=4, step=4, aug_rng=torch.zeros(16, dtype=torch.uint8))
    state["aug_rng_device"] = "cuda"
    checkpoint.save(state, tmp_path / "last.pt")
    assert train(compose_cfg([*FAST, "epochs=1", "resume=true"]), run_dir=tmp_path) is not None
    assert "resumed on cpu from a cuda run" in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "final.pt")["step"] == 8


def test_large_labelled_images_train_with_crops_from_the_decoding_workers(tmp_path: Path) -> None:
    """A folder of images larger than data.image_size: the workers crop each view from the full image
    (persistent workers), the asymmetric recipe draws each view's own settings, the monitor evaluates
    on the 0.875 centre crops."""
    from PIL import Image

    for split, n in (("train", 40), ("test", 10)):
        for c in range(2):
            (tmp_path / "data" / split / str(c)).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (56, 44), (200 * c, 5 * i, 90)).save(
                    tmp_path / "data" / split / str(c) / f"{i}.png"
                )
    overrides = [
        *FAST, "epochs=2", "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=32",
        "batch_size=16", "method=nnclr", "method.queue_size=64", "augment=nnclr_cifar",
        "trainer.num_workers=2", "trainer.log_every=1",
    ]  # fmt: skip
    top1 = train(compose_cfg(overrides), run_dir=tmp_path / "run")
    assert top1 is not None and 0 <= top1 <= 100
    full = losses(tmp_path / "run")
    assert len(full) == 2 * (80 // 16) and all(math.isfinite(v) for _, v in full)
