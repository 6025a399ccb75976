"""BYOL (ssl_lab/methods/byol.py): its loss against lightly's and a hand-computed case, its heads
against lightly's, the momentum teacher's update and schedule, the stop-gradient, and the step
compiled in one graph."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FAST, FlatBackbone, compose_cfg
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule

from ssl_lab.methods.byol import BYOL, byol_loss
from ssl_lab.methods.parts import cosine_momentum


def small_byol(**kwargs) -> BYOL:
    return BYOL(
        FlatBackbone(16, scaled=True), proj_hidden_dim=32, proj_output_dim=8, pred_hidden_dim=24, **kwargs
    )


def layers(module: nn.Module) -> list[tuple]:
    """Each leaf layer's type, parameter shapes (bias or not included) and, for BN, its affine flag."""
    return [
        (type(m).__name__, [tuple(p.shape) for p in m.parameters(recurse=False)], getattr(m, "affine", None))
        for m in module.modules()
        if not list(m.children())
    ]


@pytest.mark.parametrize("batch,dim", [(2, 3), (16, 256), (7, 32)])
def test_the_loss_is_two_plus_two_lightlys_negative_cosine(batch: int, dim: int) -> None:
    torch.manual_seed(batch)
    p = torch.randn(batch, dim, requires_grad=True)
    target = torch.randn(batch, dim, requires_grad=True)
    ours = byol_loss(p, target)
    (g_ours,) = torch.autograd.grad(ours, p)
    ref = 2 + 2 * NegativeCosineSimilarity()(p, target.detach())
    (g_ref,) = torch.autograd.grad(ref, p)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_the_training_step_is_the_papers_symmetrised_loss_with_lightlys_parts() -> None:
    """The step's loss, written with lightly's criterion on the same heads and teacher: the sum of the
    two views' terms (the paper's L + L~, solo-learn's), each 2 + 2 x NegativeCosineSimilarity."""
    torch.manual_seed(0)
    model = small_byol()
    with torch.no_grad():  # a teacher apart from the student, so that mixing them up would show
        for p in model.teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x0, x1 = torch.randn(12, 16), torch.randn(12, 16)
    out = model.training_step([x0, x1])

    ref_model = small_byol()
    ref_model.load_state_dict(model.state_dict())
    z0, z1 = ref_model.projector(ref_model.backbone(torch.cat([x0, x1]))).chunk(2)
    p0, p1 = ref_model.predictor(torch.cat([z0, z1])).chunk(2)
    teacher = ref_model.teacher
    t0, t1 = teacher.projector(teacher.backbone(torch.cat([x0, x1]))).chunk(2)
    criterion = NegativeCosineSimilarity()
    ref = (2 + 2 * criterion(p0, t1.detach())) + (2 + 2 * criterion(p1, t0.detach()))
    torch.testing.assert_close(out["loss"], ref)
    assert out["momentum"].item() == pytest.approx(0.996)  # logged: train/momentum
    assert set(out) == {"loss", "momentum", "z_std"}


def test_the_loss_hand_computed() -> None:
    # cos 1 -> 0, cos 0 -> 2, cos -1 -> 4 (scale does not matter); a batch mean.
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert byol_loss(e0, 3 * e0).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(e0, e1).item() == pytest.approx(2.0)
    assert byol_loss(e0, -e0).item() == pytest.approx(4.0)
    at_60 = torch.tensor([[0.5, math.sqrt(3) / 2]])
    assert byol_loss(torch.cat([e0, e0]), torch.cat([e0, at_60])).item() == pytest.approx((0 + 1) / 2)


def test_the_heads_are_lightlys_byol_heads() -> None:
    model = BYOL(FlatBackbone(512, scaled=True))  # the paper's defaults: 4096 -> 256, predictor 4096
    assert layers(model.projector) == layers(BYOLProjectionHead(512, 4096, 256).layers)
    assert layers(model.predictor) == layers(BYOLPredictionHead(256, 4096, 256).layers)
    kinds = [type(m) for m in model.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_the_teacher_is_a_frozen_copy_of_backbone_and_projector() -> None:
    model = small_byol()
    assert [n for n, _ in model.teacher.named_children()] == ["backbone", "projector"]
    for (name, t), s in zip(
        model.teacher.named_parameters(), [*model.backbone.parameters(), *model.projector.parameters()]
    ):
        assert not t.requires_grad and torch.equal(t, s) and t is not s, name
    trained = {id(p) for g in model.param_groups() for _, p in g["params"]}
    online = nn.ModuleList([model.backbone, model.projector, model.predictor])
    assert trained == {id(p) for p in online.parameters()}
    # the evaluated network is the student's backbone (lightly #1471: BYOL evaluates the online one)
    assert model.encoder is model.backbone


def test_a_batch_norm_conversion_keeps_the_teacher_frozen() -> None:
    """ssl_lab.distributed.SyncBatchNorm.convert builds new layers (several processes on the CPU); a
    teacher whose parameters then required gradients would be trained by the optimizer and DDP."""
    from ssl_lab.distributed import SyncBatchNorm

    model = small_byol()
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    model = SyncBatchNorm.convert(model)
    assert any(isinstance(m, SyncBatchNorm) for m in model.teacher.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == frozen
    trained = {id(p) for g in model.param_groups() for _, p in g["params"]}
    assert not trained & {id(p) for p in model.teacher.parameters()}


def test_after_a_step_the_teacher_is_tau_old_plus_one_minus_tau_student() -> None:
    torch.manual_seed(0)
    model = small_byol(momentum_base=0.9)
    old = [t.clone() for t in model.teacher.parameters()]
    lightlys = copy.deepcopy(nn.ModuleList([model.teacher.backbone, model.teacher.projector]))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.training_step([torch.randn(8, 16), torch.randn(8, 16)])["loss"].backward()
    opt.step()
    model.after_step(step=3, total_steps=10)  # what the runner calls after each optimizer step

    tau = cosine_momentum(3, 10, 0.9)
    students = [*model.backbone.parameters(), *model.projector.parameters()]
    for t, o, s in zip(model.teacher.parameters(), old, students):
        torch.testing.assert_close(t, tau * o + (1 - tau) * s)
        assert not torch.equal(t, o)  # it moved
    assert model.teacher.momentum.item() == pytest.approx(tau)
    # lightly's update_momentum on the same modules gives the same teacher
    update_momentum(model.backbone, lightlys[0], tau)
    update_momentum(model.projector, lightlys[1], tau)
    for ours, theirs in zip(model.teacher.parameters(), lightlys.parameters()):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("total", [2, 10, 391])
def test_the_momentum_schedule_is_lightlys_cosine_schedule_from_base_to_one(total: int) -> None:
    for step in {0, 1, total // 2, total - 1}:
        assert cosine_momentum(step, total, 0.99, 1.0) == pytest.approx(
            cosine_schedule(step, total, 0.99, 1.0)
        )
    model = small_byol(momentum_base=0.99)
    model.after_step(0, total)
    assert model.teacher.momentum.item() == pytest.approx(0.99)
    model.after_step(total - 1, total)
    assert model.teacher.momentum.item() == pytest.approx(1.0)


def test_no_gradient_reaches_the_teacher_even_if_its_parameters_asked_for_one() -> None:
    """The teacher runs under torch.no_grad: its outputs carry no graph, so even a teacher whose
    parameters required gradients would get none (the stop-gradient of the paper's fig. 2)."""
    torch.manual_seed(0)
    model = small_byol()
    model.teacher.requires_grad_(True)
    loss = model.training_step([torch.randn(6, 16), torch.randn(6, 16)])["loss"]
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    for module in (model.backbone, model.projector, model.predictor):
        assert all(p.grad is not None for p in module.parameters())


def test_the_loss_falls_and_the_teacher_lags_the_student() -> None:
    torch.manual_seed(0)
    model = small_byol(momentum_base=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    x = torch.randn(32, 16)
    losses = []
    for step in range(40):
        loss = model.training_step([x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(step, 40)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    apart = (model.teacher.projector[0].weight - model.projector[0].weight).norm()
    assert 0 < apart < model.projector[0].weight.norm()


def test_the_training_step_compiles_without_a_graph_break() -> None:
    """fullgraph=True fails on any graph break (a .item(), a branch on a tensor's value). aot_eager:
    Dynamo's graph capture and AOTAutograd's tracing without Inductor's code generation (seconds, not
    tens of seconds, on a 2-core CPU); graph breaks are Dynamo's, whatever the backend."""
    import hydra

    cfg = compose_cfg([*FAST, "method=byol", "method.proj_hidden_dim=64", "method.pred_hidden_dim=64"])
    model = hydra.utils.instantiate(cfg.method, backbone=hydra.utils.instantiate(cfg.backbone))
    x = torch.randn(8, 3, 32, 32)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")([x, x.flip(-1)])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["momentum"].item() == pytest.approx(0.996)
    assert all(p.grad is None for p in model.teacher.parameters())


def test_one_pass_per_view_normalises_each_view_on_its_own() -> None:
    torch.manual_seed(0)
    together, apart = small_byol(), small_byol(concat_views=False)
    apart.load_state_dict(together.state_dict())
    views = [torch.randn(8, 16), 3 + torch.randn(8, 16)]
    a, b = together.training_step(views)["loss"], apart.training_step(views)["loss"]
    z = [apart.projector(apart.backbone(v)) for v in views]
    t = [apart.teacher.projector(apart.teacher.backbone(v)) for v in views]
    p = [apart.predictor(zi) for zi in z]
    ref = sum(2 - 2 * F.cosine_similarity(p[i], t[1 - i].detach()).mean() for i in (0, 1))
    torch.testing.assert_close(b, ref)
    assert not torch.allclose(a, b)
