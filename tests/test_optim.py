"""Optimizer parameter groups, LARS exclusions, lr scaling and per-iteration schedules."""

import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ssl_lab.optim import build_optimizer, constant, scaled_lr, schedule_step, warmup_cosine


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def optimizer_cfg(name: str, **overrides):
    cfg = OmegaConf.load(f"conf/optimizer/{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def test_lr_scaling() -> None:
    assert scaled_lr(0.3, 512, "linear") == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, "sqrt") == pytest.approx(0.6)
    assert scaled_lr(0.3, 256, "sqrt") == pytest.approx(0.3)


@pytest.mark.parametrize("name", ["sgd", "adam", "lars"])
def test_bias_and_norm_get_no_weight_decay(name: str) -> None:
    model = small_model()
    opt = build_optimizer(optimizer_cfg(name, weight_decay=0.1), model, batch_size=256)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for pname, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), pname
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "weight_decay,always_adapt", [(0.01, True), (0.0, True), (0.01, False), (0.0, False)]
)
def test_lars_adapts_weights_but_not_bias_or_norm(weight_decay: float, always_adapt: bool) -> None:
    """One LARS step against the update written out by hand (You et al. 2017, as timm implements it).
    The weights are adapted at weight_decay=0 too; `always_adapt=false` gives back timm's default,
    under which a group without weight decay is plain SGD."""
    torch.manual_seed(0)
    model = small_model()
    cfg = optimizer_cfg(
        "lars", base_lr=0.5, weight_decay=weight_decay, momentum=0.0, always_adapt=always_adapt
    )
    opt = build_optimizer(cfg, model, 256)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(16, 8)).pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        w, g = before[n], grads[n]
        if p.ndim > 1 and (weight_decay > 0 or always_adapt):
            # trust ratio eta * |w| / (|g| + wd |w| + eps), weight decay in the gradient
            ratio = 0.001 * w.norm() / (g.norm() + weight_decay * w.norm() + 1e-8)
            expected = w - 0.5 * ratio * (g + weight_decay * w)
        else:  # plain SGD: neither decay nor adaptation
            expected = w - 0.5 * g
        torch.testing.assert_close(p.detach(), expected, msg=n)


def test_only_the_weights_group_is_always_adapted() -> None:
    model = small_model()
    opt = build_optimizer(optimizer_cfg("lars", weight_decay=0.0), model, batch_size=256)
    adapted = {id(p) for g in opt.param_groups if g["always_adapt"] for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in adapted} == {"0.weight", "3.weight"}
    # optimizers without the option get no such key
    sgd = build_optimizer(optimizer_cfg("sgd", weight_decay=0.0), model, batch_size=256)
    assert all("always_adapt" not in g for g in sgd.param_groups) and len(sgd.param_groups) == 2


def test_warmup_cosine_lr_at_warmup_end_and_end() -> None:
    opt = torch.optim.SGD(small_model().parameters(), lr=2.0)
    sched = warmup_cosine(opt, steps_per_epoch=10, epochs=20, warmup_epochs=2, min_lr_ratio=0.01)
    lrs = []
    for step in range(200):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0
    assert lrs[10] == pytest.approx(1.0)  # halfway through warm-up
    assert lrs[20] == pytest.approx(2.0)  # warm-up end: the peak
    assert max(lrs) == pytest.approx(2.0)
    mid = 20 + 90  # halfway through the cosine
    assert lrs[mid] == pytest.approx(0.02 + (2.0 - 0.02) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.02, abs=2e-3)  # the last step ends at the floor
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


def test_constant_schedule_with_warmup() -> None:
    opt = torch.optim.SGD(small_model().parameters(), lr=0.4)
    sched = constant(opt, steps_per_epoch=10, epochs=5, warmup_epochs=1)
    lrs = []
    for step in range(50):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[5] == pytest.approx(0.2)
    assert lrs[10:] == pytest.approx([0.4] * 40)


class Declared(nn.Module):
    """A method's parameter groups with flags (ssl_lab/methods/base.py: param_groups)."""

    def __init__(self, flags: dict) -> None:
        super().__init__()
        self.body, self.predictor = nn.Linear(4, 4), nn.Linear(4, 4)
        self.flags = flags

    def param_groups(self):
        return [
            {"params": list(self.body.named_parameters(prefix="body"))},
            {"params": list(self.predictor.named_parameters(prefix="predictor")), **self.flags},
        ]


def groups_of(model: nn.Module, optimizer: str = "sgd", **overrides) -> tuple[torch.optim.Optimizer, object]:
    cfg = optimizer_cfg(optimizer, **overrides)
    opt = build_optimizer(cfg, model, batch_size=256)
    sched = warmup_cosine(opt, steps_per_epoch=10, epochs=10, warmup_epochs=2)
    return opt, sched


def test_a_fixed_lr_group_is_untouched_by_warmup_and_decay() -> None:
    """SimSiam's predictor (simsiam #11): the base lr throughout, while the rest warms up and decays."""
    opt, sched = groups_of(Declared({"fixed_lr": True}))
    for step in (0, 5, 50, 99):
        schedule_step(sched, step, 100)
        lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        model_lr = cosine_lr(step)
        assert lrs[id(opt.param_groups[0]["params"][0])] == pytest.approx(model_lr, abs=1e-9)
        assert all(g["lr"] == pytest.approx(0.06) for g in opt.param_groups[2:])


def cosine_lr(step: int, peak: float = 0.06, warmup: int = 20, total: int = 100) -> float:
    if step < warmup:
        return peak * step / warmup
    return peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_lr_scale_no_decay_and_a_weight_decay_schedule() -> None:
    opt, sched = groups_of(
        Declared({"lr_scale": 0.1, "no_decay": True}), weight_decay=0.04, weight_decay_end=0.4
    )
    body_bias, body_weight, predictor = opt.param_groups
    assert len(predictor["params"]) == 2 and predictor["weight_decay"] == 0.0  # weight and bias: no decay
    schedule_step(sched, 60, 100)
    assert predictor["lr"] == pytest.approx(0.1 * body_weight["lr"])
    assert body_weight["weight_decay"] == pytest.approx(
        0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * 60 / 99)) / 2
    )
    schedule_step(sched, 0, 100)
    assert body_weight["weight_decay"] == pytest.approx(0.04) and body_bias["weight_decay"] == 0.0
    schedule_step(sched, 99, 100)
    assert body_weight["weight_decay"] == pytest.approx(0.4)


def test_a_vit_gets_no_weight_decay_on_its_position_embedding_and_tokens() -> None:
    """timm's no_weight_decay(): what DINO's and MoCo v3's ViT recipes exclude, besides biases and norms."""
    from ssl_lab.models.backbones import timm_model

    vit = timm_model("vit_tiny_patch16_224", image_size=32, kwargs={"patch_size": 4, "depth": 1})
    opt, _ = groups_of(vit, "adamw")
    excluded = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(vit.pos_embed) in excluded and id(vit.cls_token) in excluded
    assert id(vit.patch_embed.proj.weight) not in excluded and opt.param_groups[1]["weight_decay"] == 0.04


def test_groups_must_hold_each_trainable_parameter_once() -> None:
    class Missing(Declared):
        def param_groups(self):
            return super().param_groups()[:1]

    with pytest.raises(ValueError, match="each trainable parameter once"):
        groups_of(Missing({}))
    with pytest.raises(ValueError, match="unknown flags"):
        groups_of(Declared({"frozen": True}))
