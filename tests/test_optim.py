"""Optimizer parameter groups, LARS exclusions, lr scaling and per-iteration schedules."""

import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ssl_lab.optim import build_optimizer, constant, scaled_lr, warmup_cosine


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
