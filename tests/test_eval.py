"""Evaluation protocols: each one on a tiny checkpoint through the real CLI, chained after pretraining,
checked against what their references prescribe (a frozen backbone under augmentation, every labelled
image each epoch, the head's first layer, linearly separable features), and their errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_cli, wandb_records

import ssl_lab.eval.common as common
import ssl_lab.eval.distill as distill
import ssl_lab.eval.finetune as finetune
import ssl_lab.eval.linear as linear
import ssl_lab.eval.linear_fast as linear_fast
from ssl_lab import UserError, checkpoint
from ssl_lab.data.augment import Augment
from ssl_lab.eval.common import check_unchanged, even_batch_size, frozen_state, percent
from ssl_lab.eval.finetune import balanced_subset, finetune_network, head_layers, paper_epochs
from ssl_lab.eval.linear_fast import train_linear
from ssl_lab.eval.run import compose_eval, evaluate, load_checkpoint, load_context
from ssl_lab.loggers import read_metrics
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import mlp
from ssl_lab.rundir import find_checkpoint

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
        'eval_after=["knn eval.k=20","linear eval.epochs=2"]',
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
    assert results["linear"]["settings"]["epochs"] == 2 and results["knn"]["settings"]["k"] == 20
    metrics = read_metrics(run_dir)
    final_step = checkpoint.load(run_dir / "final.pt")["step"]
    evals = {
        k: v for row in metrics if row["step"] == final_step for k, v in row.items() if k.startswith("eval/")
    }
    assert set(evals) == {"eval/knn_top1", "eval/knn_top5", "eval/linear_top1", "eval/linear_top5"}
    # the monitor selects on the validation split; the final protocols train on every labelled
    # training image (data.limit_train=256) and report on the test split
    assert any("val/knn_top1" in row for row in metrics)
    assert "256 labelled train / 128 test images" in stdout
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
    "linear_fast": ["eval.epochs=1"],
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
    assert {"knn", "linear", "linear_fast", "finetune_10pct", "distill_10pct"} <= set(results)
    assert {r["data"] for r in results.values()} == {"synthetic"}
    logged = {k for row in read_metrics(run_dir) for k in row if k.startswith("eval/")}
    assert {
        "eval/knn_top1",
        "eval/linear_top1",
        "eval/linear_fast_top1",
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


def context(run_dir: Path, *overrides: str):
    """The EvalContext `evaluate` builds for this run (its model, data, device), to call a protocol with."""
    cfg = compose_eval([f"checkpoint={run_dir}", *overrides, "logger=none", "trainer.progress=false"])
    path = find_checkpoint(cfg.checkpoint)
    return load_context(cfg, path, load_checkpoint(path), None)


def test_linear_probe_keeps_the_backbone_frozen_while_augmenting(run_copy: Path, monkeypatch) -> None:
    """eval=linear: every step a fresh random crop + flip goes through the backbone, in eval mode:
    its parameters and batch-norm statistics are exactly as loaded afterwards."""
    ctx = context(run_copy)
    before = frozen_state(ctx.backbone)
    seen = []  # (uint8 batch, augmented batch) of every step
    real_augment = linear.train_augment

    def recording_augment(ctx, crop_scale):
        augment = real_augment(ctx, crop_scale)

        def call(uint8, generator):
            out = augment(uint8, generator)
            seen.append((uint8.clone(), out.clone()))
            return out

        return call

    monkeypatch.setattr(linear, "train_augment", recording_augment)
    result = linear.evaluate(ctx, epochs=2, batch_size=1024)  # one batch of all 256 images per epoch
    assert 0 <= result["eval/linear_top1"] <= 100
    after = ctx.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert any("running_mean" in k for k in before)  # batch norm statistics were among them

    assert len(seen) == 2
    (images0, views0), (images1, views1) = seen
    assert not torch.equal(views0, ctx.normalize(images0))  # augmented, not the plain images
    # the same images in both epochs (in another order), augmented differently
    row = {images1[i].numpy().tobytes(): i for i in range(len(images1))}
    pairs = [(i, row[images0[i].numpy().tobytes()]) for i in range(len(images0))]
    assert len(pairs) == 256
    assert not any(torch.equal(views0[i], views1[j]) for i, j in pairs[:32])


def test_a_probe_that_lets_batch_norm_learn_is_caught(run_copy: Path, monkeypatch) -> None:
    """A backbone in train mode during the probe updates its batch-norm statistics: the frozen check
    fails the run, for the standard probe and for the fast one."""
    real_fit = linear.fit

    def leaky_fit(ctx, *args, **kwargs):
        ctx.backbone.train()
        return real_fit(ctx, *args, **kwargs)

    monkeypatch.setattr(linear, "fit", leaky_fit)
    with pytest.raises(RuntimeError, match="not frozen"):
        evaluate(compose_eval([f"checkpoint={run_copy}", "eval=linear", "eval.epochs=1", "logger=none"]))

    real = linear_fast.context_features

    def leaky(ctx, images, batch_size):
        ctx.backbone.train()
        with torch.no_grad():
            ctx.backbone(ctx.normalize(images.images[:8]))
        return real(ctx, images, batch_size)

    monkeypatch.setattr(linear_fast, "context_features", leaky)
    with pytest.raises(RuntimeError, match="not frozen"):
        evaluate(compose_eval([f"checkpoint={run_copy}", "eval=linear_fast", "eval.epochs=1", "logger=none"]))


def test_finetune_sees_every_labelled_image_each_epoch(run_copy: Path, monkeypatch) -> None:
    """1 % of the labels: 10 images (one per class), batches of at most 4: three batches per epoch,
    none dropped (drop_last would have trained on 8)."""
    ctx = context(run_copy, "eval=finetune")
    epochs = []
    real = common.epoch_batches

    def counting(ctx, images, epoch, batch_size):
        epochs.append([])
        for uint8, labels in real(ctx, images, epoch, batch_size):
            epochs[-1].append(labels.clone())
            yield uint8, labels

    monkeypatch.setattr(common, "epoch_batches", counting)
    metrics = finetune.evaluate(ctx, label_fraction=0.01, epochs=2, batch_size=4, save=False)
    labelled = metrics["eval/finetune_1pct_labels"]
    assert labelled == 10 and labelled % 4 != 0
    memory = ctx.data.memory
    expected = memory.labels[balanced_subset(memory.labels, 0.01, 0)].sort().values
    assert len(epochs) == 2
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2]
        assert torch.equal(torch.cat(batches).sort().values, expected)


def test_even_batches_keep_every_image_and_no_lonely_one() -> None:
    assert even_batch_size(500, 256) == 250  # 1 % of CIFAR-10: two batches of 250
    assert even_batch_size(1000, 256) == 250
    assert even_batch_size(50_000, 256) == 256
    assert even_batch_size(10, 1024) == 10
    for n in range(2, 600):
        size = even_batch_size(n, 64)
        assert size <= 64 and n % size != 1 and -(-n // size) <= -(-n // 64) + 1


def test_the_supervised_augmentation_is_augments_crop_and_flip() -> None:
    """common.CropFlip skips the colour operations that are off: the same views as Augment, bit for bit."""
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    settings = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    full = Augment(32, **settings)(images, torch.Generator().manual_seed(0))
    assert torch.equal(common.CropFlip(32, **settings)(images, torch.Generator().manual_seed(0)), full)


def test_finetuning_starts_from_the_heads_first_layer_and_a_zero_classifier() -> None:
    class Pretrained(Method):  # a method with a projector, evaluated as its backbone
        def __init__(self, projector):
            backbone = torch.nn.Linear(3, 8)
            backbone.num_features = 8
            super().__init__(backbone)
            self.projector = projector

    simclr_like = Pretrained(mlp([8, 16, 4]))  # Linear-BN-ReLU, Linear
    net = finetune_network(simclr_like, 1, num_classes=5)
    assert [type(m) for m in net.head] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU]
    assert torch.equal(net.head[0].weight, simclr_like.projector[0].weight)
    assert net.head[0].weight is not simclr_like.projector[0].weight  # a copy: the run stays as loaded
    assert net.classifier.in_features == 16 and net.classifier.out_features == 5
    assert not net.classifier.weight.any() and not net.classifier.bias.any()
    assert net(torch.randn(6, 3)).abs().max() == 0  # zero logits until trained

    from_backbone = finetune_network(simclr_like, 0, num_classes=5)
    assert len(from_backbone.head) == 0 and from_backbone.classifier.in_features == 8

    nnclr_like = Pretrained(mlp([8, 16, 16, 4], last_bn=True))  # two hidden layers
    head, width = head_layers(nnclr_like, 2)
    assert len(head) == 6 and width == 16
    with pytest.raises(UserError, match="from_head_layer=2.*1 hidden layer"):
        head_layers(simclr_like, 2)
    assert [paper_epochs(f) for f in (0.01, 0.1, 1.0)] == [60, 30, 30]


def test_distillation_with_labels_runs(run_copy: Path, monkeypatch) -> None:
    """alpha > 0 adds a cross entropy on the teacher's labelled subset, drawn batch after batch."""
    ctx = context(run_copy, "eval=finetune")
    finetune.evaluate(ctx, label_fraction=0.1, epochs=1)
    saved = checkpoint.load(run_copy / "finetune_10pct.pt")  # SimCLR's head: its first layer is in
    assert saved["from_head_layer"] == 1 and saved["subset_seed"] == 0
    assert saved["model"]["head.0.weight"].shape == ctx.model.projector[0].weight.shape
    drawn = []
    real = distill.labelled_batches

    def counting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            drawn.append(len(batch[1]))
            yield batch

    monkeypatch.setattr(distill, "labelled_batches", counting)
    ctx = context(run_copy, "eval=distill")
    metrics = distill.evaluate(ctx, alpha=0.5, epochs=1, student="resnet_tiny", batch_size=128)
    assert 0 <= metrics["eval/distill_10pct_top1"] <= 100
    assert len(drawn) == 2  # one labelled batch per step: 256 unlabelled images in batches of 128


def test_check_unchanged_sees_any_parameter_or_buffer() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    before = frozen_state(net)
    check_unchanged(net, before, "net")
    net[1].running_mean += 1e-6
    with pytest.raises(RuntimeError, match=r"1\.running_mean"):
        check_unchanged(net, before, "net")


def test_fast_linear_probe_separates_linearly_separable_features() -> None:
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


def test_protocols_scale_fp16_gradients() -> None:
    """trainer.precision=16: the linear, fine-tune and distill protocols train under fp16 autocast,
    where a gradient below fp16's smallest subnormal (6e-8) flushes to zero without a GradScaler."""
    from ssl_lab.data.datasets import DataSplits, ImageSet

    torch.manual_seed(0)
    images = ImageSet(
        images=torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), labels=torch.arange(64) % 4
    )
    data = DataSplits(
        train=images, memory=images, test=images, num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    init = torch.nn.Linear(3 * 8 * 8, 4).state_dict()

    def update(dtype: torch.dtype | None) -> torch.Tensor:
        ctx = common.EvalContext(model=torch.nn.Identity(), pretrain_config={}, data=data,
                                 device=torch.device("cpu"), autocast_dtype=dtype)  # fmt: skip
        head = torch.nn.Linear(3 * 8 * 8, 4)
        head.load_state_dict(init)

        def tiny_loss(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(head(x.flatten(1)), labels) * 1e-6

        common.fit(ctx, list(head.parameters()), images, tiny_loss, epochs=1, batch_size=32, base_lr=1e3)
        return head.weight.detach() - init["weight"]

    fp32 = update(None)
    for dtype in (torch.float16, torch.bfloat16):  # unscaled fp16: the whole update is lost
        assert (update(dtype) - fp32).norm() < 0.05 * fp32.norm(), dtype
