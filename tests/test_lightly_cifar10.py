"""lightly's CIFAR-10 benchmark as configs (experiments/lightly_cifar10_<method>.yaml, swept by
compare=lightly_cifar10): each row's settings read off lightly's own objects, built as its
cifar10_benchmark.py builds them, not retyped."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from conftest import compose_cfg
from hydra.utils import instantiate
from test_experiments import assert_settings_match, example_views, layers, ours

from ssl_lab.build import build_model, build_step
from ssl_lab.models.backbones import SplitBatchNorm2d

ROOT = Path(__file__).resolve().parents[1]
SWEEP = yaml.safe_load((ROOT / "conf" / "compare" / "lightly_cifar10.yaml").read_text())
ROWS = SWEEP["hydra"]["sweeper"]["params"]["experiment"].split(",")
LIGHTLY_ROWS = [f"lightly_cifar10_{m}" for m in
                ("simclr", "mocov2", "byol", "nnclr", "simsiam", "swav", "dino", "barlowtwins")]  # fmt: skip
STEPS_PER_EPOCH = 97  # 50,000 // 512


def composed(name: str, *extra: str):
    cfg = compose_cfg([f"experiment={name}", "data=synthetic", "data.mean=[0.485,0.456,0.406]",
                       "data.std=[0.229,0.224,0.225]", *extra])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    return (
        cfg,
        model,
        instantiate(cfg.augment),
        build_step(cfg, model, instantiate(cfg.augment), STEPS_PER_EPOCH),
    )


def lightly_backbone(num_splits: int = 0) -> nn.Module:
    from lightly.models import ResNetGenerator

    resnet = ResNetGenerator("resnet-18", num_splits=num_splits)
    return nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1))


def test_the_table_sweeps_every_method_once() -> None:
    from conftest import METHODS

    methods = [compose_cfg([f"experiment={row}"]).method.name for row in ROWS]
    assert sorted(methods) == METHODS and set(LIGHTLY_ROWS) <= set(ROWS)


@pytest.mark.parametrize("name", ROWS)
def test_every_row_runs_lightlys_protocol(name: str) -> None:
    """Batch 512, 200 epochs, the test split's kNN (k 200, T 0.1) after every epoch, ImageNet
    normalisation, each view through the network on its own, the rows' lr on lightly's epoch cosine."""
    cfg = compose_cfg([f"experiment={name}"])
    assert (cfg.batch_size, cfg.epochs, cfg.data.name) == (512, 200, "cifar10")
    assert (cfg.monitor.k, cfg.monitor.temperature, cfg.monitor.test_every) == (200, 0.1, 1)
    assert list(cfg.data.mean) == [0.485, 0.456, 0.406] and list(cfg.data.std) == [0.229, 0.224, 0.225]
    assert cfg.method.get("concat_views", False) is False  # MAE has one view
    assert cfg.augment.get("blur_p", 0.0) == 0.0  # "no blur" in every row
    if name in LIGHTLY_ROWS:
        assert cfg.published.top1 > 75 and cfg.published.wall_minutes > 80
        assert cfg.published.budget == "200 epochs, batch 512"


@pytest.mark.parametrize(
    "name",
    [r for r in ROWS if not r.endswith(("_mae", "_simmim", "_ibot", "_dinov2", "_lejepa", "_msn", "_ijepa"))],
)
def test_every_resnet_row_has_lightlys_backbone_function(name: str) -> None:
    """The same weights give the same features as lightly's Sequential(ResNetGenerator children), which
    has no ReLU after the stem."""
    cfg, model, _, _ = composed(name)
    theirs = lightly_backbone(8 if name.endswith("mocov2") else 0)
    ours_state = model.backbone.state_dict()
    theirs_state = theirs.state_dict()
    assert [v.shape for k, v in ours_state.items() if "running" not in k] == [
        v.shape for k, v in theirs_state.items() if "running" not in k
    ]
    mine = [v for k, v in ours_state.items() if "running" not in k and "num_batches" not in k]
    theirs_params = [v for k, v in theirs_state.items() if "running" not in k and "num_batches" not in k]
    with torch.no_grad():
        for a, b in zip(mine, theirs_params):
            b.copy_(a)
    model.backbone.eval(), theirs.eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model.backbone(x), theirs(x).flatten(1), atol=1e-4)
    splits = {m.num_splits for m in model.backbone.modules() if isinstance(m, SplitBatchNorm2d)}
    assert splits == ({8} if name.endswith("mocov2") else set())


@pytest.mark.parametrize("name", [r for r in LIGHTLY_ROWS if not r.endswith("_swav")])
def test_every_sgd_row_has_lightlys_optimizer_and_schedule(name: str) -> None:
    """SGD lr 0.06 x 512/128 (SimSiam: 0.06), momentum 0.9, weight decay 5e-4 on every parameter, and
    CosineAnnealingLR(T_max=200) stepped once an epoch."""
    cfg, model, _, step = composed(name)
    lr = 0.06 if name.endswith("simsiam") else 0.06 * 512 / 128
    assert isinstance(step.optimizer, torch.optim.SGD)
    for group in step.optimizer.param_groups:
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (pytest.approx(lr), 0.9, 5e-4)
    trained = {id(p) for g in step.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, 200)
    for epoch in (0, 1, 57, 199):
        while cosine.last_epoch < epoch:
            reference.step(), cosine.step()
        for i in (0, STEPS_PER_EPOCH - 1):
            step.scheduler.step_update(epoch * STEPS_PER_EPOCH + i)
            assert step.lr == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9)


def assert_views(augment, transform) -> None:
    """Each view's settings (crop, flip, jitter, grey, solarization, normalisation) as lightly's; the
    blur is off on both sides in every row."""
    for i, theirs in enumerate(example_views(transform)):
        mine = augment.for_view(i)
        assert {"size", "crop_scale", "flip_p", "jitter", "jitter_p", "gray_p", "mean"} <= set(theirs)
        assert theirs["blur_p"] == 0 and mine.blur_p == 0
        mine_settings = {**ours(mine), "solarize_p": mine.solarize_p}
        assert_settings_match(mine_settings, {k: v for k, v in theirs.items() if k != "blur_sigma"})


def simclr_views():
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)


def test_simclr_row_is_lightlys() -> None:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import heads

    _, model, augment, _ = composed("lightly_cifar10_simclr")
    assert layers(model.projector) == layers(heads.SimCLRProjectionHead(512, 512, 128))
    assert model.temperature == NTXentLoss().temperature
    assert_views(augment, simclr_views())


def test_moco_row_is_lightlys() -> None:
    """MoCoProjectionHead(512, 512, 128), NTXentLoss(T 0.1, bank 8192), EMA 0.99 fixed, symmetric with
    one bank, the teacher's batch shuffled (what makes split BN a stand-in for shuffle BN)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import heads

    cfg, model, augment, _ = composed("lightly_cifar10_mocov2")
    assert layers(model.projector) == layers(heads.MoCoProjectionHead(512, 512, 128))
    loss = NTXentLoss(temperature=0.1, memory_bank_size=(8192, 128))
    assert model.temperature == loss.temperature and tuple(model.queues[0].queue.shape) == (8192, 128)
    assert len(model.queues) == 1 and model.shared_queue and model.symmetric and model.shuffle_keys
    assert (cfg.method.momentum_base, cfg.method.momentum_end) == (0.99, 0.99)
    assert_views(augment, simclr_views())


def test_byol_row_is_lightlys() -> None:
    """BYOL heads 512-1024-256 / 256-1024-256, EMA 0.99 fixed, and a gradient equal to lightly's
    0.5 (NegativeCosineSimilarity(p0, z1) + NegativeCosineSimilarity(p1, z0)) (loss_scale 0.25)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import heads

    cfg, model, augment, _ = composed("lightly_cifar10_byol")
    assert layers(model.projector) == layers(heads.BYOLProjectionHead(512, 1024, 256))
    assert layers(model.predictor) == layers(heads.BYOLPredictionHead(256, 1024, 256))
    assert (cfg.method.momentum_base, cfg.method.momentum_end) == (0.99, 0.99)
    assert_views(augment, simclr_views())
    from ssl_lab.methods.byol import byol_loss

    p0, p1 = torch.randn(8, 256, requires_grad=True), torch.randn(8, 256, requires_grad=True)
    z0, z1 = torch.randn(8, 256), torch.randn(8, 256)
    criterion = NegativeCosineSimilarity()
    theirs = torch.autograd.grad(0.5 * (criterion(p0, z1) + criterion(p1, z0)), [p0, p1])
    mine = torch.autograd.grad(model.loss_scale * (byol_loss(p0, z1) + byol_loss(p1, z0)), [p0, p1])
    for a, b in zip(mine, theirs):
        assert torch.allclose(a, b, atol=1e-7)


def test_nnclr_row_is_lightlys() -> None:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import NNMemoryBankModule, heads

    cfg, model, augment, _ = composed("lightly_cifar10_nnclr")
    projector = heads.ProjectionHead([(512, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
                                      (2048, 256, nn.BatchNorm1d(256), None)])  # fmt: skip
    assert layers(model.projector) == layers(projector)
    assert layers(model.predictor) == layers(heads.NNCLRPredictionHead(256, 4096, 256))
    assert tuple(model.support.queue.shape) == NNMemoryBankModule(size=(8192, 256)).size
    assert model.temperature == NTXentLoss().temperature and cfg.method.loss == "lightly"
    assert_views(augment, simclr_views())


def test_simsiam_row_is_lightlys() -> None:
    from lightly.models.modules import heads
    from lightly.transforms import SimSiamTransform

    _, model, augment, step = composed("lightly_cifar10_simsiam")
    projector = heads.ProjectionHead([(512, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
                                      (2048, 2048, nn.BatchNorm1d(2048), None)])  # fmt: skip
    assert layers(model.projector) == layers(projector)
    assert layers(model.predictor) == layers(heads.SimSiamPredictionHead(2048, 512, 2048))
    assert not any(g.get("fixed_lr") for g in step.optimizer.param_groups)  # all on the schedule
    assert_views(augment, SimSiamTransform(input_size=32, gaussian_blur=0.0))


def test_swav_row_is_lightlys() -> None:
    """SwaVProjectionHead(512, 512, 128), 512 prototypes, SwaVLoss's defaults, no queue, Adam 1e-3 x
    512/128 with L2 decay 1e-6 on every parameter, 2 crops of 32 px at scale >= 0.14."""
    from lightly.loss import SwaVLoss
    from lightly.models.modules import heads
    from lightly.transforms import SwaVTransform

    _, model, augment, step = composed("lightly_cifar10_swav")
    assert layers(model.projector) == layers(heads.SwaVProjectionHead(512, 512, 128))
    assert layers(model.prototypes) == layers(heads.SwaVPrototypes(128, 512).heads)  # a bias too
    loss = SwaVLoss()
    assert (model.temperature, model.epsilon, model.iterations) == (
        loss.temperature, loss.sinkhorn_epsilon, loss.sinkhorn_iterations,
    )  # fmt: skip
    assert model.queue_size == 0 and model.freeze_prototypes_epochs == 0
    assert type(step.optimizer) is torch.optim.Adam
    for group in step.optimizer.param_groups:
        assert (group["lr"], group["weight_decay"]) == (pytest.approx(1e-3 * 512 / 128), 1e-6)
    # lightly 1.6 needs crop_max_scales beside crop_min_scales (the script predates it)
    transform = SwaVTransform(crop_sizes=[32], crop_counts=[2], crop_min_scales=[0.14], crop_max_scales=[1.0],
                              cj_strength=0.5, gaussian_blur=0)  # fmt: skip
    assert_views(augment, transform)


def test_dino_row_is_lightlys() -> None:
    """The benchmark's 2-layer DINO head (weights alike; lightly has no bias before its BN), 2048 weight-
    normed prototypes, DINOLoss(output_dim=2048)'s temperatures and centre, EMA 0.99 fixed, the student
    evaluated, DINOTransform's two global views."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import heads
    from lightly.transforms import DINOTransform

    cfg, model, augment, _ = composed("lightly_cifar10_dino")
    head = heads.DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True)
    head.layers = heads.ProjectionHead(
        [(512, 2048, nn.BatchNorm1d(2048), nn.GELU()), (2048, 256, None, None)]
    ).layers
    weights = lambda m: [tuple(p.shape) for n, p in m.named_parameters() if "bias" not in n]  # noqa: E731
    assert weights(model.head.mlp) == weights(head.layers)
    assert model.head.last_layer.weight.shape == head.last_layer.weight_v.shape
    assert model.head.last_layer.scale is None  # norm_last_layer: g fixed at 1
    loss = DINOLoss(output_dim=2048)
    assert (model.student_temp, model.teacher_temp, model.center_momentum) == (
        loss.student_temp, loss.teacher_temp, loss.center_momentum,
    )  # fmt: skip
    # lightly's teacher temperature over its warm-up: a constant 0.04 here, as ssl_lab's ramp from 0.04
    assert torch.allclose(loss.teacher_temp_schedule, torch.tensor(model.warmup_teacher_temp))
    assert model.warmup_teacher_temp_epochs == 30 and tuple(model.center.shape) == (1, 2048)
    assert (cfg.method.momentum_base, cfg.method.momentum_end) == (0.99, 0.99)
    assert model.freeze_last_layer == 0 and model.clip_grad == 0 and model.evaluated == "backbone"
    assert model.crops.num_local == 0
    assert_views(augment, DINOTransform(global_crop_size=32, n_local_views=0, cj_strength=0.5,
                                        gaussian_blur=(0, 0, 0)))  # fmt: skip


def test_barlowtwins_row_is_lightlys() -> None:
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import heads

    _, model, augment, _ = composed("lightly_cifar10_barlowtwins")
    projector = heads.ProjectionHead([(512, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
                                      (2048, 2048, None, None)])  # fmt: skip
    assert layers(model.projector) == layers(projector)
    assert model.lambda_param == BarlowTwinsLoss().lambda_param and model.scale_loss == 1.0
    assert_views(augment, simclr_views())


def test_a_fixed_momentum_is_exactly_fixed() -> None:
    from ssl_lab.methods.parts import cosine_momentum

    assert {cosine_momentum(s, 19400, 0.99, 0.99) for s in range(0, 19400, 7)} == {0.99}


@pytest.mark.slow
def test_the_table_runs_as_one_multirun_and_reports_lightlys_figure(tmp_path: Path) -> None:
    """-m compare=lightly_cifar10, every row, tiny (16 px synthetic images: SimMIM needs 2 x 2 mask patches of
    8 px; 1 epoch): each job finishes,
    and python -m ssl_lab.report sets the best test kNN (lightly's figure) beside the published one."""
    from conftest import run_cli

    tiny = ["data=synthetic", "data.num_train=64", "data.num_test=32", "data.image_size=16", "batch_size=16",
            "epochs=1", "trainer.num_workers=0", "logger=none"]  # fmt: skip
    result = run_cli("-m", "compare=lightly_cifar10", *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    report = run_cli(str(sweep), cwd=tmp_path, module="ssl_lab.report")
    assert report.returncode == 0, report.stderr[-2000:]
    rows = [
        line for line in report.stdout.splitlines() if line.startswith("| ") and "lightly_cifar10_" in line
    ]
    assert len(rows) == len(ROWS) and all("| finished |" in row for row in rows)
    assert (
        "test/knn_top1 best (lightly's figure)" in report.stdout and "84.80 (kNN k=200 T=0.1" in report.stdout
    )
