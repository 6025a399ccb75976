"""Every config composes, and every option of every group instantiates and runs a step."""

import itertools
from pathlib import Path

import hydra
import pytest
import torch
from conftest import BACKBONES, CONF, compose_cfg

from ssl_lab.config import check_config
from ssl_lab.methods.base import Draw
from ssl_lab.optim import build_optimizer

GROUPS = ("method", "backbone", "augment", "optimizer", "scheduler", "data", "trainer", "logger")
OPTIONS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in GROUPS}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_groups_are_populated() -> None:
    assert {"simclr", "nnclr"} <= set(OPTIONS["method"])
    assert {"resnet18", "resnet50", "timm"} <= set(OPTIONS["backbone"])
    assert {"simclr_cifar", "simclr_imagenet", "light"} <= set(OPTIONS["augment"])
    assert {"sgd", "adam", "lars"} <= set(OPTIONS["optimizer"])
    assert {"warmup_cosine", "constant"} <= set(OPTIONS["scheduler"])
    assert {"synthetic", "cifar10", "cifar100", "stl10", "imagefolder"} <= set(OPTIONS["data"])
    assert {"cifar10_simclr", "cifar10_nnclr"} <= set(EXPERIMENTS)


def all_pairs(groups: list[str]) -> list[dict[str, str]]:
    """A small set of combinations in which every pair of options of two groups occurs together
    (greedy covering): interactions between groups are pairwise interpolations, so this catches
    what the full product (hundreds of compositions at 0.2 s each) would."""
    uncovered = {
        ((g1, o1), (g2, o2))
        for g1, g2 in itertools.combinations(groups, 2)
        for o1 in OPTIONS[g1]
        for o2 in OPTIONS[g2]
    }
    combos = []
    while uncovered:
        (g1, o1), (g2, o2) = min(uncovered)
        combo = {g1: o1, g2: o2}
        for g in groups:
            if g not in combo:  # the option that covers the most remaining pairs
                combo[g] = max(
                    OPTIONS[g],
                    key=lambda o: sum(
                        ((h, combo[h]), (g, o)) in uncovered or ((g, o), (h, combo[h])) in uncovered
                        for h in combo
                    ),
                )
        uncovered -= {((a, combo[a]), (b, combo[b])) for a, b in itertools.combinations(groups, 2)}
        combos.append(combo)
    return combos


def test_every_pair_of_options_composes() -> None:
    groups = ["method", "backbone", "augment", "optimizer", "scheduler", "data", "logger"]
    combos = all_pairs(groups)
    for combo in combos:
        overrides = [f"{g}={o}" for g, o in combo.items()] + ["data.root=/data"] * (
            combo["data"] == "imagefolder"
        )
        cfg = compose_cfg(overrides)
        check_config(cfg)
        assert cfg.method.name == combo["method"] and cfg.data.name == combo["data"]
    pairs = {(a, combo[a], b, combo[b]) for combo in combos for a, b in itertools.combinations(groups, 2)}
    assert len(pairs) == sum(len(OPTIONS[a]) * len(OPTIONS[b]) for a, b in itertools.combinations(groups, 2))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("debug", [None, "smoke"])
def test_experiments_compose(experiment: str, debug: str | None) -> None:
    cfg = compose_cfg([f"experiment={experiment}"] + ([f"debug={debug}"] if debug else []))
    check_config(cfg)
    assert cfg.name == experiment  # run dirs and W&B runs say which recipe ran
    if debug:  # debug=smoke, after the recipe, makes any of them a quick check
        assert cfg.batch_size == 32 and cfg.epochs == 2


@pytest.mark.parametrize("method", OPTIONS["method"])
@pytest.mark.parametrize("backbone", OPTIONS["backbone"])
def test_method_and_backbone_instantiate_and_step(method: str, backbone: str) -> None:
    small_queue = ["method.queue_size=256"] if method == "nnclr" else []
    cfg = compose_cfg([f"method={method}", f"backbone={backbone}", *small_queue])
    if method in BACKBONES and not backbone.startswith("vit"):  # they work on patch tokens
        with pytest.raises(
            hydra.errors.InstantiationException, match=f"method={method} needs a ViT backbone"
        ):
            hydra.utils.instantiate(cfg.method, backbone=hydra.utils.instantiate(cfg.backbone))
        return
    model = hydra.utils.instantiate(cfg.method, backbone=hydra.utils.instantiate(cfg.backbone))
    size = cfg.data.image_size
    x = torch.randn(4, 3, size, size)
    assert model(x).shape == (4, model.num_features)
    draw = Draw(
        lambda size=size, **changes: torch.randn(4, 3, size, size),
        lambda *shape: torch.rand(4, *shape),
        lambda *shape: torch.rand(*shape),
    )
    views = model.views(draw)  # the method's own
    loss = model.training_step(views)["loss"]
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("optimizer", OPTIONS["optimizer"])
@pytest.mark.parametrize("scheduler", OPTIONS["scheduler"])
def test_optimizer_and_scheduler_instantiate(optimizer: str, scheduler: str) -> None:
    cfg = compose_cfg([f"optimizer={optimizer}", f"scheduler={scheduler}"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = build_optimizer(cfg.optimizer, model, cfg.batch_size)
    sched = hydra.utils.instantiate(cfg.scheduler, optimizer=opt, steps_per_epoch=10, epochs=cfg.epochs)
    sched.step_update(5)


@pytest.mark.parametrize("augment", OPTIONS["augment"])
def test_augment_instantiates(augment: str) -> None:
    cfg = compose_cfg([f"augment={augment}"])
    aug = hydra.utils.instantiate(cfg.augment)
    out = aug(
        torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32


def test_timm_vit_gets_the_image_size() -> None:
    cfg = compose_cfg(["backbone=timm", "backbone.name=vit_tiny_patch16_224"])
    vit = hydra.utils.instantiate(cfg.backbone)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, vit.num_features)


def test_cifar_stem_follows_image_size() -> None:
    small = hydra.utils.instantiate(compose_cfg(["backbone=resnet18"]).backbone)
    large = hydra.utils.instantiate(compose_cfg(["backbone=resnet18", "data=stl10"]).backbone)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7)


def test_conf_mirrors_code() -> None:
    """conf/<group>/<option>.yaml builds something from ssl_lab/<group>... (or a library)."""
    for group in ("method", "backbone", "optimizer", "scheduler", "augment", "data"):
        for path in (CONF / group).glob("*.yaml"):
            extra = ["data.root=/d"] if path.stem == "imagefolder" else []
            target = compose_cfg([f"{group}={path.stem}", *extra])[group]["_target_"]
            assert callable(hydra.utils.get_object(target)), target
            assert target.split(".")[0] in ("ssl_lab", "torch", "timm"), (path, target)
    assert Path(CONF / "experiment").resolve() == (CONF.parent / "experiments").resolve()


def test_precision_auto_is_bf16_on_gpus_and_32_bit_on_cpus(monkeypatch) -> None:
    from ssl_lab.build import precision_dtype

    assert precision_dtype("auto", torch.device("cpu")) is None
    assert precision_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision_dtype("auto", torch.device("cuda")) is None
    assert precision_dtype(32, torch.device("cuda")) is None


def test_the_runner_keys_are_structured_configs() -> None:
    """conf/train.yaml's own keys are typed by ssl_lab.config's dataclasses (Hydra's ConfigStore)."""
    from omegaconf import OmegaConf

    from ssl_lab.config import MonitorConfig, TrainConfig, TrainerConfig

    cfg = compose_cfg([])
    assert OmegaConf.get_type(cfg) is TrainConfig
    assert (
        OmegaConf.get_type(cfg.trainer) is TrainerConfig and OmegaConf.get_type(cfg.monitor) is MonitorConfig
    )
    with pytest.raises(Exception) as error:
        compose_cfg(["trainer.num_workers=two"])
    assert "could not be converted to Integer" in str(error.value.__cause__)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["epochs=-1"], "epochs=-1 must not be negative"),
        (["batch_size=0"], "batch_size=0 must be at least 1"),
        (["monitor.temperature=0"], "monitor.temperature=0.0 must be positive"),
        (["trainer.num_workers=-1"], "trainer.num_workers=-1 must not be negative"),
        (["optimizer.base_lr=-1"], "optimizer.base_lr=-1 must be positive"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 must not be negative"),
        (["optimizer.lr_scaling=cube"], "optimizer.lr_scaling=cube is not one of linear, sqrt"),
        (["method.temperature=0"], "method.temperature=0 must be positive"),
        (["method=nnclr", "method.queue_size=0"], "method.queue_size=0 must be at least 1"),
        (["augment.flip_p=1.5"], "augment.flip_p=1.5 must be at most 1"),
        (["scheduler.warmup_epochs=-1"], "scheduler.warmup_epochs=-1 must not be negative"),
        (["data.image_size=0"], "data.image_size=0 must be at least 1"),
        (["data.image_size=big"], "data.image_size='big' should be int (got str); e.g. data.image_size=32"),
        (["data.limit_train=0"], "data.limit_train=0 must be at least 1"),
        (["logger=wandb", "logger.mode=onlin"], "logger.mode=onlin is not one of offline, online, disabled"),
        (
            ["+method.pred_hidden_dim=512"],
            "method.pred_hidden_dim is not a setting of method=simclr; its settings are: temperature, "
            "proj_hidden_dim, proj_output_dim, proj_layers, proj_last_bn, gather_distributed, concat_views",
        ),
    ],
)
def test_types_and_ranges_are_checked_where_the_values_are_defined(
    overrides: list[str], message: str
) -> None:
    from ssl_lab.errors import UserError

    with pytest.raises(UserError) as error:
        check_config(compose_cfg(overrides))
    assert str(error.value) == message


def test_eval_protocol_settings_are_checked_against_the_protocol() -> None:
    from ssl_lab.errors import UserError
    from ssl_lab.eval.run import compose_eval

    ok = compose_eval(["checkpoint=x", "eval=finetune", "eval.label_fraction=1.0"])
    check_config(ok)
    for overrides, message in (
        (["eval=finetune", "eval.label_fraction=1.5"], "eval.label_fraction=1.5 must be at most 1"),
        (["eval=knn", "eval.k=0"], "eval.k=0 must be at least 1"),
        (
            ["eval=linear", "eval.base_lr=fast"],
            "eval.base_lr='fast' should be int or float (got str); e.g. eval.base_lr=0.1",
        ),
    ):
        with pytest.raises(UserError) as error:
            check_config(compose_eval(["checkpoint=x", *overrides]))
        assert str(error.value) == message


def test_valid_values_pass_and_null_where_allowed() -> None:
    for overrides in (
        ["trainer.grad_clip=null"],
        ["trainer.grad_clip=0"],
        ["data.limit_train=null"],
        ["method.proj_hidden_dim=null"],
    ):
        check_config(compose_cfg(overrides))


def test_a_config_dir_of_ones_own_adds_options(tmp_path: Path) -> None:
    """hydra.searchpath adds a user's own options: the command line is composed once, by Hydra, so
    no check of ours knows only conf/ (and an unknown option is still one line, with the new one listed)."""
    from conftest import run_cli

    (tmp_path / "mine" / "method").mkdir(parents=True)
    (tmp_path / "mine" / "method" / "simclr_cold.yaml").write_text(
        "defaults:\n  - simclr\n  - _self_\ntemperature: 0.07\n"
    )
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'mine'}]"
    shown = run_cli(searchpath, "method=simclr_cold", "--cfg", "job", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "temperature: 0.07" in shown.stdout
    typo = run_cli(searchpath, "method=simclr_cld", "epochs=0", cwd=tmp_path)
    assert typo.returncode == 2 and typo.stderr.startswith("error: unknown method 'simclr_cld'")
    assert "simclr_cold" in typo.stderr and len(typo.stderr.splitlines()) == 1
