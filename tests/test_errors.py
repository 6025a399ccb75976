"""Every bad input: one line on stderr naming the problem and the fix, exit status 2, nothing lost."""

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, METHODS, compose_cfg, run_cli


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["method=byol2"], ["unknown method 'byol2'", ", ".join(METHODS)]),
        (["batch_size=abc"], ["batch_size='abc'", "should be int", "batch_size=256"]),
        (["trainer.devise=cpu"], ["trainer.devise"]),
        (["resume=true"], ["nothing to resume", "last.pt"]),
        (["resume=no/such/run"], ["nothing to resume", "no/such/run"]),
        (
            ["data=cifar10", "data.root=/nonexistent/data"],
            ["no cifar10 found", "/nonexistent/data", "data.download=true"],
        ),
        (["data=imagefolder"], ["data.root is missing", "data.root=<value>"]),
    ],
)
def test_bad_input_on_the_command_line(args: list[str], fragments: list[str], workdir: Path) -> None:
    assert_one_line_error(run_cli(*args, *FAST, cwd=workdir), *fragments)


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["optimizer=lamb"], "unknown optimizer 'lamb'; choose one of: adam, adamw, lars, sgd"),
        (["epochs=1.5"], r"epochs=1.5 should be int \(got float\)"),
        (["optimizer.base_lr=fast"], "optimizer.base_lr='fast' should be int or float"),
        (["trainer.precision=fp8"], "trainer.precision=fp8 is not one of auto, 32, bf16, 16"),
        (["epochs=-1"], "^error: epochs=-1 must not be negative$"),
        (["optimizer.base_lr=-1"], "^error: optimizer.base_lr=-1 must be positive$"),
        (["trainer.devise=cpu"], "trainer.devise is not a key of this config"),
        (
            ["backbone=timm", "backbone.name=resnet_does_not_exist"],
            "timm has no model named 'resnet_does_not_exist'",
        ),
        (["batch_size=100000"], "batch_size=100000 is larger than the 256 training images of data=synthetic"),
        (["method=nnclr", "method.queue_size=16"], "method.queue_size=16 is smaller than batch_size=32"),
        (
            ["method=dino", "method.num_local_crops=2"],
            "method.num_local_crops=2 needs method.local_crop_size",
        ),
        (
            [
                "method=dino",
                "method.num_local_crops=2",
                "method.local_crop_size=16",
                "method.local_crop_scale=[0.5,1]",
                "method.global_crop_scale=[0.4,1]",
            ],
            r"method.local_crop_scale=\[0.5, 1.0\] lies above method.global_crop_scale=\[0.4, 1.0\]",
        ),
        (
            ["method=simclr", "+method.pred_hidden_dim=64"],
            "method.pred_hidden_dim is not a setting of method=simclr",
        ),
        (["trainer.device=cuda:0"], "CUDA is not available" if not torch.cuda.is_available() else "^$"),
    ],
)
def test_bad_input_in_process(args: list[str], pattern: str, tmp_path: Path, capsys) -> None:
    """The same checks, without a process start each: the exit path is covered above."""
    from ssl_lab.config import check_command_line
    from ssl_lab.errors import user_message
    from ssl_lab.train import train

    if pattern == "^$":
        pytest.skip("CUDA present")
    with pytest.raises(SystemExit) as exit_info:
        check_command_line([*FAST, *args])
        try:
            train(compose_cfg([*FAST, *args]), run_dir=tmp_path)
        except Exception as e:
            print(f"error: {user_message(e)}", file=sys.stderr)
            sys.exit(2)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(pattern, err), err
    assert not any(tmp_path.iterdir())  # nothing written


def test_empty_data_dir(workdir: Path) -> None:
    (workdir / "empty" / "train").mkdir(parents=True)
    (workdir / "empty" / "test").mkdir()
    result = run_cli("data=imagefolder", f"data.root={workdir / 'empty'}", *FAST, cwd=workdir)
    assert_one_line_error(result, "no images", str(workdir / "empty"))


def test_unreadable_image(workdir: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = workdir / "imgs" / split / cls
            folder.mkdir(parents=True)
            for i in range(40):
                Image.new("RGB", (40, 30), (i * 5, 0, 0)).save(folder / f"{i}.png")
    (workdir / "imgs" / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_cli(
        "data=imagefolder", f"data.root={workdir / 'imgs'}", "data.image_size=32", *FAST, cwd=workdir
    )
    assert_one_line_error(result, "cannot read image", "broken.jpg")


def test_bad_input_keeps_existing_run(workdir: Path) -> None:
    """A failing resume must not touch the run it points at."""
    first = run_cli(*FAST, "epochs=1", "hydra.run.dir=run", cwd=workdir)
    assert first.returncode == 0, first.stderr
    before = snapshot(workdir / "run")
    result = run_cli(*FAST, "epochs=1", "resume=run", "batch_size=100000", cwd=workdir)
    assert_one_line_error(result, "batch_size=100000")
    after = snapshot(workdir / "run")
    log_before, log_after = before.pop("train.log"), after.pop("train.log")
    assert after == before
    assert log_after.startswith(log_before) and b"error: batch_size=100000" in log_after  # appended


def test_resume_with_another_model_is_refused(tmp_path: Path, capsys) -> None:
    from ssl_lab import UserError
    from ssl_lab.train import train

    train(compose_cfg([*FAST, "epochs=1"]), run_dir=tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="holds a different model"):
        train(compose_cfg([*FAST, "epochs=1", "method=nnclr", "resume=true"]), run_dir=tmp_path)
    assert snapshot(tmp_path) == before


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run, except the .hydra/resume-* record each resume attempt adds."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and "resume-" not in str(p.relative_to(run_dir))
    }


@pytest.mark.parametrize(
    ("arg", "extra"), [("hydra/launcher=slurm", "slurm"), ("hparams_search=lr_temperature", "search")]
)
def test_option_whose_plugin_is_missing_says_which_extra(arg: str, extra: str, monkeypatch, capsys) -> None:
    import importlib.util

    from ssl_lab.config import check_command_line

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_:
        check_command_line(["-m", arg])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err
        == f"error: {arg} needs the {'hydra_submitit_launcher' if extra == 'slurm' else 'hydra_optuna_sweeper'} plugin: pip install -e '.[{extra}]'\n"
    )
