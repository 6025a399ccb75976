"""SimSiam (ssl_lab/methods/simsiam.py): its loss against lightly's and a hand-computed case, its
heads against lightly's, the stop-gradient, the predictor's fixed lr through the runner's optimizer and
schedule, and the step compiled in one graph."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import FAST, FlatBackbone, compose_cfg
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

from ssl_lab.build import build_model, build_step
from ssl_lab.methods.simsiam import SimSiam
from ssl_lab.optim import schedule_step


def small_simsiam(**kwargs) -> SimSiam:
    return SimSiam(FlatBackbone(16), proj_hidden_dim=32, proj_output_dim=8, pred_hidden_dim=4, **kwargs)


def layers(module: nn.Module) -> list[tuple]:
    """Each leaf layer's type, parameter shapes (bias or not included) and, for BN, its affine flag."""
    return [
        (type(m).__name__, [tuple(p.shape) for p in m.parameters(recurse=False)], getattr(m, "affine", None))
        for m in module.modules()
        if not list(m.children())
    ]


def test_the_loss_is_lightlys_symmetrised_negative_cosine_values_and_gradients() -> None:
    """lightly's SimSiam example: 0.5 (criterion(z0, p1) + criterion(z1, p0)) with z detached: the
    paper's stop-gradient. Same heads, same inputs, same loss and same gradients."""
    torch.manual_seed(0)
    model = small_simsiam()
    x0, x1 = torch.randn(12, 16), torch.randn(12, 16)
    out = model.training_step([x0, x1])
    ours = torch.autograd.grad(out["loss"], list(model.parameters()))

    z0, z1 = model.projector(torch.cat([x0, x1])).chunk(2)
    p0, p1 = model.predictor(torch.cat([z0, z1])).chunk(2)
    criterion = NegativeCosineSimilarity()
    ref = 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))
    theirs = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(out["loss"], ref)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert set(out) == {"loss", "z_std"}  # z_std: the paper's fig. 2 collapse check, train/z_std


def test_without_the_stop_gradient_the_gradients_would_differ() -> None:
    """The z side gets no gradient through the loss: detaching z is what the step does."""
    torch.manual_seed(0)
    model = small_simsiam()
    x0, x1 = torch.randn(12, 16), torch.randn(12, 16)
    (ours,) = torch.autograd.grad(model.training_step([x0, x1])["loss"], [model.projector[0].weight])
    z0, z1 = model.projector(torch.cat([x0, x1])).chunk(2)
    p0, p1 = model.predictor(torch.cat([z0, z1])).chunk(2)
    criterion = NegativeCosineSimilarity()
    no_stop = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
    (through_z,) = torch.autograd.grad(no_stop, [model.projector[0].weight])
    assert not torch.allclose(ours, through_z)


def test_no_gradient_flows_into_the_z_side() -> None:
    """The inputs' gradient is the one computed with both z held constant: only the p side carries
    gradient back to the network."""
    torch.manual_seed(0)
    model = small_simsiam()
    x = [torch.randn(6, 16, requires_grad=True), torch.randn(6, 16, requires_grad=True)]
    loss = model.training_step(x)["loss"]
    grads = torch.autograd.grad(loss, x)
    z = model.projector(torch.cat(x)).chunk(2)
    const = [zi.detach() for zi in z]
    p = model.predictor(torch.cat(z)).chunk(2)
    criterion = NegativeCosineSimilarity()
    held = 0.5 * (criterion(p[0], const[1]) + criterion(p[1], const[0]))
    for a, b in zip(grads, torch.autograd.grad(held, x)):
        torch.testing.assert_close(a, b)


def test_the_loss_hand_computed() -> None:
    """Orthogonal rows: the projector's BN and predictor are replaced by identities, so p = z = x;
    view 0 = (e0, e1), view 1 = (e0, -e1): cosines 1 and -1 on each side, so the loss is 0. With
    view 1 = (e0, e0 at 60 degrees to e1): -(1 + 0.5) / 2 on each side."""
    model = small_simsiam()
    model.projector, model.predictor = nn.Identity(), nn.Identity()
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    v0 = torch.stack([e0, e1])
    assert model.training_step([v0, torch.stack([e0, -e1])])["loss"].item() == pytest.approx(0.0, abs=1e-6)
    at_60 = torch.tensor([math.sqrt(3) / 2, 0.5])
    loss = model.training_step([v0, torch.stack([2 * e0, at_60])])["loss"]
    assert loss.item() == pytest.approx(-0.75)


def test_the_heads_are_lightlys_simsiam_heads() -> None:
    model = SimSiam(FlatBackbone(512))  # defaults: projector 2048 x 3, predictor 2048 -> 512 -> 2048
    assert layers(model.projector) == layers(SimSiamProjectionHead(512, 2048, 2048).layers)
    assert layers(model.predictor) == layers(SimSiamPredictionHead(2048, 512, 2048).layers)
    last_bn = model.projector[-1]
    assert isinstance(last_bn, nn.BatchNorm1d) and not last_bn.affine  # the official code's last BN


def test_the_predictor_is_a_group_of_its_own_with_a_fixed_lr() -> None:
    model = small_simsiam()
    encoder, predictor = model.param_groups()
    assert {id(p) for _, p in predictor["params"]} == {id(p) for p in model.predictor.parameters()}
    assert predictor["fixed_lr"] and "fixed_lr" not in encoder
    assert len(encoder["params"]) + len(predictor["params"]) == len(list(model.parameters()))
    assert not small_simsiam(fixed_predictor_lr=False).param_groups()[1]["fixed_lr"]


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_the_predictor_lr_stays_fixed_while_the_rest_warms_up_and_decays(optimizer: str) -> None:
    """Through the runner's builders: build_optimizer splits each declared group (weights / biases
    and norms), schedule_step puts the predictor's back at the peak lr at every step."""
    small = ["method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.pred_hidden_dim=8"]
    schedule = ["scheduler=warmup_cosine", "scheduler.warmup_epochs=1", "batch_size=256", "epochs=4"]
    cfg = compose_cfg(
        [*FAST, "method=simsiam", f"optimizer={optimizer}", "optimizer.base_lr=0.5", *schedule, *small]
    )
    model = build_model(cfg, torch.device("cpu"))
    step = build_step(cfg, model, nn.Identity(), steps_per_epoch=10)
    predictor = {id(p) for p in model.predictor.parameters()}
    groups = step.optimizer.param_groups
    fixed = [g for g in groups if g.get("fixed_lr")]
    assert {id(p) for g in fixed for p in g["params"]} == predictor
    assert all(not any(id(p) in predictor for p in g["params"]) for g in groups if not g.get("fixed_lr"))
    peak = 0.5 * 256 / 256
    seen = []
    for i in range(step.total_steps):
        schedule_step(step.scheduler, i, step.total_steps)
        seen.append(([g["lr"] for g in fixed], [g["lr"] for g in groups if not g.get("fixed_lr")]))
    for fixed_lrs, scheduled in seen:
        assert fixed_lrs == pytest.approx([peak] * len(fixed))
        assert len(set(scheduled)) == 1  # every other group on the one schedule
    scheduled = [s[0] for _, s in seen]
    assert scheduled[0] == pytest.approx(0.0)  # warm-up from 0
    assert max(scheduled) == pytest.approx(peak, rel=0.05)
    assert scheduled[-1] < 0.01 * peak  # cosine to ~0


def test_the_loss_falls_without_collapse() -> None:
    torch.manual_seed(0)
    model = SimSiam(FlatBackbone(16), proj_hidden_dim=64, proj_output_dim=32, pred_hidden_dim=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 16)
    losses, stds = [], []
    for _ in range(30):
        out = model.training_step([x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        stds.append(out["z_std"].item())
    assert losses[-1] < losses[0] - 0.3
    assert stds[-1] > 0.5 / math.sqrt(32)  # not collapsed: a collapsed z has std 0


def test_the_training_step_compiles_without_a_graph_break() -> None:
    """fullgraph=True fails on any graph break (a .item(), a branch on a tensor's value). aot_eager:
    Dynamo's graph capture and AOTAutograd's tracing without Inductor's code generation (seconds, not
    tens of seconds, on a 2-core CPU); graph breaks are Dynamo's, whatever the backend."""
    import hydra

    small = ["method.proj_hidden_dim=64", "method.proj_output_dim=64", "method.pred_hidden_dim=16"]
    cfg = compose_cfg([*FAST, "method=simsiam", *small])
    model = hydra.utils.instantiate(cfg.method, backbone=hydra.utils.instantiate(cfg.backbone))
    x = torch.randn(8, 3, 32, 32)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")([x, x.flip(-1)])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["z_std"])
