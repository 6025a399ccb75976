"""The recipes in experiments/: each names its one reference, and the two that reproduce lightly's
examples compose to lightly's own settings (read off lightly's objects, not retyped)."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import compose_cfg
from hydra.utils import instantiate

from ssl_lab.build import build_model, build_step

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
RECIPES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_names_its_reference_what_it_should_give_and_where_it_differs(name: str) -> None:
    comment = " ".join(
        line.lstrip("# ")
        for line in (EXPERIMENTS / f"{name}.yaml").read_text().splitlines()
        if line.startswith("#")
    )
    assert "follow" in comment or "setting for setting" in comment, name  # the one reference
    assert "differ" in comment, name  # where and why it differs
    assert f"experiment={name}" in comment, name  # the command that runs it
    if not name.startswith("lightly_"):
        assert "Expected" in comment and "%" in comment, name  # the published figure


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_with_a_published_figure_records_it_for_the_report(name: str) -> None:
    """The `published` key (python -m ssl_lab.report shows it) says the figure its comment expects,
    with protocol, source and the recipe's own budget."""
    cfg = compose_cfg([f"experiment={name}"])
    comment = (EXPERIMENTS / f"{name}.yaml").read_text()
    if cfg.published is None:
        assert "no published CIFAR figure" in comment or name.startswith("lightly_"), name
        return
    assert {"top1", "protocol", "source", "budget"} <= set(cfg.published) <= {
        "top1", "protocol", "source", "budget", "wall_minutes",
    }, name  # fmt: skip
    assert f"{cfg.published.top1:g} %" in comment or f"{cfg.published.top1:.2f} %" in comment, name
    assert cfg.published.budget.startswith(f"{cfg.epochs} epochs, batch {cfg.batch_size}"), name


def compared() -> list[str]:
    """The recipes `-m compare=cifar10` sweeps (conf/compare/cifar10.yaml)."""
    import yaml

    sweep = yaml.safe_load((EXPERIMENTS.parent / "conf" / "compare" / "cifar10.yaml").read_text())
    return sweep["hydra"]["sweeper"]["params"]["experiment"].split(",")


def test_the_comparison_sweeps_a_recipe_of_every_method_over_seeds() -> None:
    from conftest import METHODS

    methods = {compose_cfg([f"experiment={name}"]).method.name: name for name in compared()}
    assert sorted(methods) == METHODS  # a new method joins the comparison with its CIFAR recipe


@pytest.mark.parametrize("name", compared())
def test_the_short_comparison_gives_every_recipe_one_budget(name: str) -> None:
    """compare=cifar10_short after the recipe: its settings, the shared budget over them."""
    cfg = compose_cfg([f"experiment={name}", "compare=cifar10_short"])
    assert (cfg.epochs, cfg.batch_size, cfg.data.limit_train, cfg.scheduler.warmup_epochs) == (
        5,
        64,
        5000,
        1,
    )
    assert list(cfg.eval_after) == ["linear_fast"]
    comment = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert cfg.published is not None or "no published CIFAR figure" in comment, name
    assert cfg.backbone.get("cifar_stem") in (None, False)  # ResNets with the ImageNet stem
    recipe = compose_cfg([f"experiment={name}"])
    assert cfg.method == recipe.method and cfg.optimizer == recipe.optimizer  # the recipe's own


def lightly_view_transform(**kwargs):
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(**kwargs).transforms[0].transform.transforms


def settings_of(transforms) -> dict:
    """The settings of lightly's SimCLR view transform, by the transform that holds them."""
    from lightly.transforms.gaussian_blur import GaussianBlur

    out = {}
    for t in transforms:
        kind = type(t).__name__
        if kind == "RandomResizedCrop":
            out["size"], out["crop_scale"], out["crop_ratio"] = list(t.size), tuple(t.scale), tuple(t.ratio)
        elif kind == "RandomHorizontalFlip":
            out["flip_p"] = t.p
        elif kind == "RandomApply":
            (jitter,) = t.transforms
            out["jitter_p"] = t.p
            out["jitter"] = tuple(
                float(getattr(jitter, k)[1] - (1 if k != "hue" else 0))
                for k in ("brightness", "contrast", "saturation", "hue")
            )
        elif kind == "RandomGrayscale":
            out["gray_p"] = t.p
        elif isinstance(t, GaussianBlur):
            out["blur_p"], out["blur_sigma"] = t.prob, tuple(t.sigmas)
        elif kind == "Normalize":
            out["mean"], out["std"] = tuple(t.mean), tuple(t.std)
    return out


def ours(augment) -> dict:
    return {
        "size": [augment.size, augment.size], "crop_scale": augment.crop_scale, "crop_ratio": augment.crop_ratio,
        "flip_p": augment.flip_p, "jitter_p": augment.jitter_p, "jitter": augment.jitter,
        "gray_p": augment.gray_p, "blur_p": augment.blur_p, "blur_sigma": augment.blur_sigma,
        "mean": augment.mean, "std": augment.std,
    }  # fmt: skip


def layers(module: nn.Module) -> list[tuple]:
    """What a head is made of: each layer's type and parameter shapes (bias or not included)."""
    return [
        (type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
        for m in module.modules()
        if not list(m.children())
    ]


def assert_settings_match(mine: dict, theirs: dict) -> None:
    assert mine.keys() >= theirs.keys()
    for key, value in theirs.items():
        assert mine[key] == pytest.approx(value, abs=1e-6), key


def composed(name: str):
    cfg = compose_cfg([f"experiment={name}", "data=synthetic", "data.mean=[0.485,0.456,0.406]",
                       "data.std=[0.229,0.224,0.225]"])  # fmt: skip
    return cfg, build_model(cfg, torch.device("cpu")), instantiate(cfg.augment)


def test_lightly_simclr_is_lightlys_simclr_example() -> None:
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    cfg, model, augment = composed("lightly_simclr")
    # examples/pytorch/simclr.py: SimCLRTransform(input_size=32, gaussian_blur=0.0)
    theirs = settings_of(lightly_view_transform(input_size=32, gaussian_blur=0.0))
    assert_settings_match(ours(augment), {**theirs, "blur_p": 0.0})
    assert augment.views == nn.ModuleList() or len(augment.views) == 0  # both views alike
    resnet = torchvision.models.resnet18()
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    assert [p.shape for p in model.backbone.parameters()] == [p.shape for p in backbone.parameters()]
    assert layers(model.projector) == layers(SimCLRProjectionHead(512, 512, 128))
    assert model.temperature == NTXentLoss().temperature and not model.concat_views  # one pass per view
    step = build_step(cfg, model, augment, steps_per_epoch=10)
    group_settings = {(g["lr"], g["momentum"], g["weight_decay"]) for g in step.optimizer.param_groups}
    default_sgd = torch.optim.SGD(backbone.parameters(), lr=0.06).param_groups[0]
    assert group_settings == {(0.06, default_sgd["momentum"], default_sgd["weight_decay"])}
    assert cfg.batch_size == 256 and cfg.epochs == 10 and cfg.data.name == "synthetic"
    step.scheduler.step_update(99)  # no schedule: the rate is 0.06 to the end
    assert step.lr == pytest.approx(0.06)


def test_lightly_nnclr_is_lightlys_nnclr_example() -> None:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import NNCLRPredictionHead, NNCLRProjectionHead, NNMemoryBankModule

    cfg, model, augment = composed("lightly_nnclr")
    # examples/pytorch/nnclr.py: SimCLRTransform(input_size=32), blur included
    assert_settings_match(ours(augment), settings_of(lightly_view_transform(input_size=32)))
    assert augment.blur_kernel >= 6 * 2.0  # +-3 sigma at the largest sigma: PIL's blur is not truncated
    assert layers(model.projector) == layers(NNCLRProjectionHead(512, 512, 128))
    assert layers(model.predictor) == layers(NNCLRPredictionHead(128, 512, 128))
    bank = NNMemoryBankModule(size=(4096, 128))
    assert tuple(model.support.queue.shape) == bank.size  # (entries, dim)
    assert model.temperature == NTXentLoss().temperature and not model.concat_views
    assert cfg.method.loss == "lightly"  # NTXentLoss on (neighbour, prediction): the 2N-way variant
    step = build_step(cfg, model, augment, steps_per_epoch=10)
    assert {(g["lr"], g["momentum"], g["weight_decay"]) for g in step.optimizer.param_groups} == {
        (0.06, 0, 0)
    }


def example_views(transform) -> list[dict]:
    """Each of a lightly transform's two views' settings (settings_of) and solarization probability."""
    from lightly.transforms.solarize import RandomSolarization

    def flat(t) -> list:  # a view's transforms out of its Compose and view wrappers (not RandomApply's)
        inner = t.transforms if type(t).__name__ == "Compose" else None
        inner = inner or getattr(getattr(t, "transform", None), "transforms", None)
        return [op for child in inner for op in flat(child)] if isinstance(inner, list) else [t]

    views = []
    for view in transform.transforms[:2]:
        ops = flat(view)
        solarize = [t.prob for t in ops if isinstance(t, RandomSolarization)]
        views.append({**settings_of(ops), "solarize_p": solarize[0] if solarize else 0.0})
    return views


def assert_example_views(augment, transform) -> None:
    for i, theirs in enumerate(example_views(transform)):
        mine = augment.for_view(i)
        assert_settings_match({**ours(mine), "solarize_p": mine.solarize_p}, theirs)
        if theirs["blur_p"]:
            assert mine.blur_kernel >= 6 * max(theirs["blur_sigma"])  # PIL's blur is not truncated


def byol_views():
    """BYOL's two views without blur, as lightly's BYOL and Barlow Twins examples build them."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    return BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=32, gaussian_blur=0.0),
        view_2_transform=BYOLView2Transform(input_size=32, gaussian_blur=0.0),
    )


def assert_example_optimizer(cfg, model, augment) -> None:
    """The examples' torch.optim.SGD(model.parameters(), lr=0.06): no momentum, no decay, no schedule."""
    step = build_step(cfg, model, augment, steps_per_epoch=10)
    assert {(g["lr"], g["momentum"], g["weight_decay"]) for g in step.optimizer.param_groups} == {
        (0.06, 0, 0)
    }
    step.scheduler.step_update(99)
    assert step.lr == pytest.approx(0.06) and not model.concat_views
    assert (cfg.batch_size, cfg.epochs, cfg.backbone.cifar_stem) == (256, 10, False)


def test_lightly_mocov2_is_lightlys_moco_example() -> None:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.transforms import MoCoV2Transform

    cfg, model, augment = composed("lightly_mocov2")
    assert layers(model.projector) == layers(MoCoProjectionHead(512, 512, 128))
    loss = NTXentLoss(memory_bank_size=(4096, 128))
    assert model.temperature == loss.temperature and tuple(model.queues[0].queue.shape) == (4096, 128)
    assert not model.symmetric and len(model.queues) == 1
    assert (cfg.method.momentum_base, cfg.method.momentum_end) == (
        0.996,
        1.0,
    )  # cosine_schedule(.., 0.996, 1)
    assert_example_views(augment, MoCoV2Transform(input_size=32))
    assert_example_optimizer(cfg, model, augment)


def test_lightly_byol_is_lightlys_byol_example() -> None:
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

    cfg, model, augment = composed("lightly_byol")
    assert layers(model.projector) == layers(BYOLProjectionHead(512, 1024, 256))
    assert layers(model.predictor) == layers(BYOLPredictionHead(256, 1024, 256))
    assert model.loss_scale == 0.25  # 0.5 (NegativeCosineSimilarity + ...): tests/test_lightly_cifar10.py
    assert (cfg.method.momentum_base, cfg.method.momentum_end) == (0.996, 1.0)
    assert_example_views(augment, byol_views())
    assert_example_optimizer(cfg, model, augment)


def test_lightly_simsiam_is_lightlys_simsiam_example() -> None:
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    from lightly.transforms import SimSiamTransform

    cfg, model, augment = composed("lightly_simsiam")
    assert layers(model.projector) == layers(SimSiamProjectionHead(512, 512, 128))
    assert layers(model.predictor) == layers(SimSiamPredictionHead(128, 64, 128))
    assert_example_views(augment, SimSiamTransform(input_size=32))
    assert_example_optimizer(cfg, model, augment)


def test_lightly_barlowtwins_is_lightlys_barlowtwins_example() -> None:
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead

    cfg, model, augment = composed("lightly_barlowtwins")
    assert layers(model.projector) == layers(BarlowTwinsProjectionHead(512, 2048, 2048))
    assert model.lambda_param == BarlowTwinsLoss().lambda_param and model.scale_loss == 1.0
    assert_example_views(augment, byol_views())
    assert_example_optimizer(cfg, model, augment)


def test_lightly_vicreg_is_lightlys_vicreg_example() -> None:
    from lightly.loss import VICRegLoss
    from lightly.models.modules.heads import VICRegProjectionHead
    from lightly.transforms import VICRegTransform

    cfg, model, augment = composed("lightly_vicreg")
    assert layers(model.projector) == layers(VICRegProjectionHead(512, 2048, 2048, num_layers=2))
    loss = VICRegLoss()
    assert model.weights == (loss.lambda_param, loss.mu_param, loss.nu_param) and model.eps == loss.eps
    assert_example_views(augment, VICRegTransform(input_size=32))
    assert_example_optimizer(cfg, model, augment)
