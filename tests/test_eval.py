"""Evaluation protocols: each one on a tiny checkpoint through the real CLI, chained after pretraining,
checked against references (the runner's own kNN monitor, linearly separable features), and their errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_cli, wandb_records

from ssl_lab import UserError, checkpoint
from ssl_lab.eval.common import check_unchanged, frozen_state, percent
from ssl_lab.eval.finetune import balanced_subset
from ssl_lab.eval.linear import train_linear
from ssl_lab.eval.run import compose_eval, evaluate
from ssl_lab.loggers import read_metrics

QUIET = [*FAST, "trainer.progress=false"]


def run_eval(*args: str, cwd: Path):
    return run_cli(*args, "trainer.progress=false", cwd=cwd, module="ssl_lab.eval")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, str]:
    """A smoke-sized SimCLR run with eval_after, logged to W&B offline: (run dir, its stdout)."""
    work = tmp_path_factory.mktemp("pretrained")
    result = run_cli(
        *QUIET,
        "logger=wandb",
        "hydra.run.dir=run",
        'eval_after=["knn eval.k=20","linear eval.epochs=20"]',
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run", result.stdout


@pytest.fixture
def run_copy(pretrained, tmp_path: Path) -> Path:
    """A private copy of the pretrained run dir (protocols write into it)."""
    shutil.copytree(pretrained[0], tmp_path / "run", ignore=shutil.ignore_patterns("wandb"))
    return tmp_path / "run"


@pytest.mark.slow
def test_eval_after_runs_the_protocols_when_pretraining_ends(pretrained) -> None:
    run_dir, stdout = pretrained
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results) == {"knn", "linear"}
    assert results["linear"]["settings"]["epochs"] == 20 and results["knn"]["settings"]["k"] == 20
    metrics = read_metrics(run_dir)
    final_step = checkpoint.load(run_dir / "final.pt")["step"]
    evals = {
        k: v for row in metrics if row["step"] == final_step for k, v in row.items() if k.startswith("eval/")
    }
    assert set(evals) == {"eval/knn_top1", "eval/knn_top5", "eval/linear_top1", "eval/linear_top5"}
    # the kNN protocol with the monitor's k and T is the monitor: the same number, computed twice
    monitor = [row["val/knn_top1"] for row in metrics if "val/knn_top1" in row][-1]
    assert evals["eval/knn_top1"] == pytest.approx(monitor)
    assert "eval/linear_top1" in stdout and "eval.json" in stdout
    for value in evals.values():
        assert 0 <= value <= 100
    # the same W&B run as pretraining: eval/... in its history
    logged = {
        item.key or "/".join(item.nested_key) for h in wandb_records(run_dir, "history") for item in h.item
    }
    assert {"eval/knn_top1", "eval/linear_top1", "train/loss"} <= logged


@pytest.mark.slow
def test_finetune_then_distill_from_the_cli(run_copy: Path) -> None:
    finetune = run_eval(
        f"checkpoint={run_copy}", "eval=finetune", "eval.epochs=2", "logger=none", cwd=run_copy
    )
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    assert (run_copy / "finetune_10pct.pt").exists()
    distill = run_eval(
        f"checkpoint={run_copy / 'final.pt'}", "eval=distill", "eval.epochs=1", "eval.student=resnet_tiny",
        "logger=none", cwd=run_copy,
    )  # fmt: skip
    assert distill.returncode == 0, distill.stderr[-3000:]
    results = json.loads((run_copy / "eval.json").read_text())
    assert {"knn", "linear", "finetune_10pct", "distill_10pct"} <= set(results)
    labels = checkpoint.load(run_copy / "finetune_10pct.pt")["labelled_images"]
    assert results["finetune_10pct"]["metrics"]["eval/finetune_10pct_labels"] == labels
    distilled = results["distill_10pct"]["metrics"]
    teacher = results["finetune_10pct"]["metrics"]["eval/finetune_10pct_top1"]
    assert distilled["eval/distill_10pct_teacher_top1"] == pytest.approx(teacher)  # the same network
    assert "eval/distill_10pct_top1" in distill.stdout


@pytest.fixture(scope="module")
def pretrained_without_wandb(tmp_path_factory) -> Path:
    """The same smoke run trained with logger=none (no W&B run, no W&B keys to resolve)."""
    work = tmp_path_factory.mktemp("pretrained_none")
    result = run_cli(*QUIET, "logger=none", "hydra.run.dir=run", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


# Each protocol at its smallest; distill learns from the finetune before it.
TINY = {
    "knn": ["eval.k=20"],
    "linear": ["eval.epochs=1"],
    "finetune": ["eval.epochs=1"],
    "distill": ["eval.epochs=1", "eval.student=resnet_tiny"],
}
EXPLICIT_DATA = ["data=synthetic", "data.limit_train=256", "data.limit_test=128"]


@pytest.mark.slow
@pytest.mark.parametrize("data", [[], EXPLICIT_DATA], ids=["run-data", "data="])
@pytest.mark.parametrize("trained_with", ["wandb", "none"])
def test_every_protocol_evaluates_a_run_of_either_logger(
    trained_with: str, data: list[str], pretrained, pretrained_without_wandb, tmp_path: Path
) -> None:
    """protocol x the logger the run was trained with x data= given or not: each evaluates, and the
    results go where the run logged (its own W&B run, or metrics.jsonl only)."""
    source = pretrained[0] if trained_with == "wandb" else pretrained_without_wandb
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("wandb"))
    for protocol, settings in TINY.items():
        metrics = evaluate(
            compose_eval(
                [f"checkpoint={run_dir}", f"eval={protocol}", *settings, *data, "trainer.progress=false"]
            )
        )
        top1 = next(v for k, v in metrics.items() if k.endswith("_top1"))
        assert 0 <= top1 <= 100, (protocol, metrics)
    results = json.loads((run_dir / "eval.json").read_text())
    assert {"knn", "linear", "finetune_10pct", "distill_10pct"} <= set(results)
    assert {r["data"] for r in results.values()} == {"synthetic"}
    logged = {k for row in read_metrics(run_dir) for k in row if k.startswith("eval/")}
    assert {
        "eval/knn_top1",
        "eval/linear_top1",
        "eval/finetune_10pct_top1",
        "eval/distill_10pct_top1",
    } <= logged
    if trained_with == "none":
        assert not (run_dir / "wandb").exists()  # trained off W&B: evaluated off W&B
    else:
        run_id = checkpoint.load(run_dir / "final.pt")["wandb_id"]
        assert {r.run_id for r in wandb_records(run_dir, "run")} == {run_id}


@pytest.mark.slow
def test_eval_chooses_the_logger(pretrained, pretrained_without_wandb, tmp_path: Path) -> None:
    """logger=wandb on a run trained without W&B starts a W&B run named after the pretraining run
    (its method, name); logger=none on a W&B run logs to metrics.jsonl only."""
    run_dir = tmp_path / "none-run"
    shutil.copytree(pretrained_without_wandb, run_dir)
    result = run_eval(f"checkpoint={run_dir}", "logger=wandb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = wandb_records(run_dir, "run")
    assert record.job_type == "simclr" and record.display_name.startswith("simclr-synthetic")
    assert "eval/knn_top1" in (run_dir / "eval.log").read_text()

    wandb_run = tmp_path / "wandb-run"
    shutil.copytree(pretrained[0], wandb_run, ignore=shutil.ignore_patterns("wandb"))
    result = run_eval(f"checkpoint={wandb_run}", "logger=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (wandb_run / "wandb").exists()


def test_augmented_linear_probe_and_the_frozen_check(run_copy: Path, monkeypatch) -> None:
    cfg = compose_eval(
        [f"checkpoint={run_copy}", "eval=linear", "eval.epochs=1", "eval.augment=true", "logger=none"]
    )
    result = evaluate(cfg)
    assert 0 <= result["eval/linear_top1"] <= 100

    # a probe that lets batch norm update its statistics (a backbone in train mode) is caught
    import ssl_lab.eval.linear as linear

    real = linear.context_features

    def leaky(ctx, images, batch_size):
        ctx.backbone.train()
        with torch.no_grad():
            ctx.backbone(ctx.normalize(images.images[:8]))
        return real(ctx, images, batch_size)

    monkeypatch.setattr(linear, "context_features", leaky)
    with pytest.raises(RuntimeError, match="not frozen"):
        evaluate(compose_eval([f"checkpoint={run_copy}", "eval=linear", "eval.epochs=1", "logger=none"]))


def test_check_unchanged_sees_any_parameter_or_buffer() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    before = frozen_state(net)
    check_unchanged(net, before, "net")
    net[1].running_mean += 1e-6
    with pytest.raises(RuntimeError, match=r"1\.running_mean"):
        check_unchanged(net, before, "net")


def test_linear_probe_separates_linearly_separable_features() -> None:
    """Ten well-separated Gaussian clusters in 64 dimensions (a margin of several standard deviations):
    any correct linear probe gets every test point right."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=g) * 4
    y_train, y_test = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    x_train = centres[y_train] + torch.randn(2000, 64, generator=g)
    x_test = centres[y_test] + torch.randn(1000, 64, generator=g)
    classifier = train_linear(x_train * 100 + 7, y_train, 10, epochs=10)  # scale and shift: standardised
    accuracy = (classifier(x_test * 100 + 7).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.999
    # and a probe on features that carry no label information stays at chance
    noise = train_linear(torch.randn(2000, 64, generator=g), y_train, 10, epochs=10)
    assert (noise(torch.randn(1000, 64, generator=g)).argmax(1) == y_test).float().mean().item() < 0.15


def test_balanced_subset_is_balanced_and_fixed_by_seed() -> None:
    labels = torch.arange(10).repeat_interleave(500)[torch.randperm(5000)]  # CIFAR-10-like, shuffled
    for fraction, per_class in ((0.01, 5), (0.1, 50), (1.0, 500)):
        idx = balanced_subset(labels, fraction, seed=0)
        assert torch.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10
    assert torch.equal(balanced_subset(labels, 0.1, 0), balanced_subset(labels, 0.1, 0))
    assert not torch.equal(balanced_subset(labels, 0.1, 0), balanced_subset(labels, 0.1, 1))
    # imbalanced classes keep their proportions, and every class keeps at least one image
    skewed = torch.cat([torch.zeros(900), torch.ones(90), torch.full((10,), 2)]).long()
    assert torch.bincount(skewed[balanced_subset(skewed, 0.01, 0)]).tolist() == [9, 1, 1]
    with pytest.raises(UserError, match="label_fraction"):
        balanced_subset(labels, 0.0, 0)
    assert [percent(f) for f in (0.01, 0.1, 1.0, 0.005)] == ["1pct", "10pct", "100pct", "0.5pct"]


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(run_copy: Path, tmp_path: Path) -> None:
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    unlabelled = tmp_path / "pictures"
    unlabelled.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(unlabelled / f"{i}.png")
    cases = [
        ([], "checkpoint is missing"),
        (["checkpoint=/nowhere/run"], "does not exist"),
        ([f"checkpoint={not_a_checkpoint}"], "cannot read checkpoint"),
        ([f"checkpoint={run_copy}", "eval=knnn"], "unknown eval 'knnn'"),
        ([f"checkpoint={run_copy}", "eval=distill"], "needs a fine-tuned teacher"),
        ([f"checkpoint={run_copy}", "eval=linear", "eval.epochs=0"], "eval.epochs=0 must be at least 1"),
        ([f"checkpoint={run_copy}", "logger.mode=disabled"], "add logger=wandb"),
        ([f"checkpoint={run_copy}", "data=imagefolder", f"data.root={unlabelled}"], "needs labelled"),
    ]
    for args, message in cases:
        logger = [] if any(a.startswith("logger.") for a in args) else ["logger=none"]
        result = run_eval(*args, *logger, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            args,
            result.stderr,
        )
    # nothing but the log of those attempts (eval.log) is added
    assert sorted(p.name for p in run_copy.iterdir()) == sorted(
        [
            "config.yaml",
            "eval.json",
            "eval.log",
            "final.pt",
            "last.pt",
            "metrics.jsonl",
            "run_info.json",
            ".hydra",
            "train.log",
        ]
    )


def test_eval_after_typo_fails_before_training(workdir: Path) -> None:
    result = run_cli(*QUIET, "eval_after=[knn,linaer]", cwd=workdir)
    assert result.returncode == 2
    assert "unknown protocol 'linaer'" in result.stderr and "linear" in result.stderr
    assert not list(workdir.rglob("*.pt"))
