"""DINO (ssl_lab/methods/dino.py): the loss, its centre and the teacher temperature's warm-up against
lightly's DINOLoss, the head against lightly's DINOProjectionHead, the centre over the global batch,
the frozen last layer, multi-crop (its views, its passes, its errors) and the evaluated teacher."""

import math

import hydra
import pytest
import torch
from conftest import FlatBackbone, compose_cfg
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead

from ssl_lab import distributed
from ssl_lab.errors import UserError
from ssl_lab.methods.dino import DINO, DINOHead, dino_loss, update_center


def small_dino(**kwargs) -> DINO:
    torch.manual_seed(0)
    kwargs = {"proj_hidden_dim": 32, "bottleneck_dim": 8, "num_prototypes": 64, **kwargs}
    return DINO(FlatBackbone(16, scaled=True), **kwargs)


@pytest.mark.parametrize("n_student", [2, 6])
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_the_loss_and_centre_are_lightlys_dino_loss(n_student: int, teacher_temp: float) -> None:
    """Two teacher views against 2 (no multi-crop) or 6 (2 global + 4 local) student views, from a
    non-zero centre: the same loss, gradient, and centre after the update."""
    torch.manual_seed(n_student)
    teacher = [torch.randn(8, 64) for _ in range(2)]
    student = [torch.randn(8, 64, requires_grad=True) for _ in range(n_student)]
    center = torch.randn(1, 64) * 0.3
    lightlys = DINOLoss(output_dim=64, teacher_temp=teacher_temp, student_temp=0.1, center_momentum=0.9)
    lightlys.center.copy_(center.view(1, 1, 64))

    ours, entropy = dino_loss(teacher, student, center, teacher_temp, 0.1)
    reference = lightlys(teacher, student)  # lightly: the teacher's outputs first
    torch.testing.assert_close(ours, reference)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, student), torch.autograd.grad(reference, student)):
        torch.testing.assert_close(g_ours, g_ref)
    update_center(center, torch.cat(teacher), 0.9)
    torch.testing.assert_close(center, lightlys.center.view(1, 64))
    assert 0 < entropy < math.log(64)


def test_the_loss_hand_computed() -> None:
    """A uniform teacher (zero outputs) against a student with zero outputs: each pair's cross entropy
    is log K; the teacher's entropy is log K too."""
    zeros = [torch.zeros(4, 10) for _ in range(2)]
    loss, entropy = dino_loss(zeros, [z.clone() for z in zeros], torch.zeros(1, 10), 0.04, 0.1)
    assert loss.item() == pytest.approx(math.log(10), abs=1e-6)
    assert entropy.item() == pytest.approx(math.log(10), abs=1e-6)
    peaked = [torch.eye(10)[:4] * 10 for _ in range(2)]  # one prototype each at T=0.04: entropy ~0
    assert dino_loss(peaked, peaked, torch.zeros(1, 10), 0.04, 0.1)[1].item() < 1e-6


def test_the_centre_is_the_global_batchs_mean(monkeypatch) -> None:
    """Two processes simulated in one: each sums its half, `distributed.total` adds the halves, and the
    centre moves by the whole batch's mean (a per-process mean would differ on each rank)."""
    torch.manual_seed(0)
    out = torch.randn(12, 5) + torch.arange(12.0)[:, None]  # halves with different means
    whole = torch.zeros(1, 5)
    update_center(whole, out, 0.9)
    torch.testing.assert_close(whole, 0.1 * out.mean(0, keepdim=True))

    halves = out.chunk(2)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(
        distributed, "total", lambda x: halves[0].sum(0, keepdim=True) + halves[1].sum(0, keepdim=True)
    )
    for half in halves:
        center = torch.zeros(1, 5)
        update_center(center, half, 0.9)
        torch.testing.assert_close(center, whole)


@pytest.mark.parametrize("warmup_epochs", [1, 3, 30])
def test_the_teacher_temperature_warms_up_as_lightlys_schedule(warmup_epochs: int) -> None:
    """Read from the progress the runner sets (no Python number in the compiled step): linear from
    0.04 to teacher_temp over the warm-up epochs, reaching it at the last, then constant."""
    model = small_dino(warmup_teacher_temp_epochs=warmup_epochs, teacher_temp=0.07)
    lightlys = DINOLoss(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=warmup_epochs)
    steps_per_epoch = 5
    for epoch in range(warmup_epochs + 3):
        model.set_progress(epoch * steps_per_epoch + 2, steps_per_epoch, 1000)
        expected = lightlys.teacher_temp_schedule[epoch].item() if epoch < warmup_epochs else 0.07
        assert model.teacher_temperature().item() == pytest.approx(expected, abs=1e-7), epoch
    model.set_progress(0, steps_per_epoch, 1000)
    assert model.training_step([torch.randn(4, 16), torch.randn(4, 16)])["teacher_temp"].item() == (
        pytest.approx(0.04)  # lightly's and main_dino.py's linspace of one epoch: [0.04]
    )


def test_the_head_is_lightlys_dino_projection_head() -> None:
    """Layer by layer the same types and shapes; with lightly's weights copied in, the same output and
    gradients (our prototypes: weight_norm with g fixed at 1, written without its hook)."""
    torch.manual_seed(0)
    ours, theirs = DINOHead(16, 32, 8, 64), DINOProjectionHead(16, 32, 8, 64)
    assert [type(m) for m in ours.mlp] == [type(m) for m in theirs.layers]
    assert [tuple(p.shape) for p in ours.mlp.parameters()] == [
        tuple(p.shape) for p in theirs.layers.parameters()
    ]
    with torch.no_grad():
        for a, b in zip(ours.mlp.parameters(), theirs.layers.parameters()):
            a.copy_(b)
        ours.last_layer.weight.copy_(theirs.last_layer.weight_v)
    x = torch.randn(5, 16)
    out, ref = ours(x), theirs(x)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    # weight_norm sums in another order: float noise of ~1e-5 relative, an error would be O(1)
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(ours.last_layer.weight.grad, theirs.last_layer.weight_v.grad, **close)
    torch.testing.assert_close(ours.mlp[0].weight.grad, theirs.layers[0].weight.grad, **close)
    assert [type(m) for m in DINOHead(16, 32, 8, 64, use_bn=True).mlp] == [
        type(m) for m in DINOProjectionHead(16, 32, 8, 64, batch_norm=True).layers
    ]


def test_the_prototypes_are_unit_norm_unless_learnt() -> None:
    head = DINOHead(16, 32, 8, 64)
    assert head.last_layer.scale is None
    w = head.last_layer(torch.eye(8)).T  # row k: prototype k
    torch.testing.assert_close(w.norm(dim=1), torch.ones(64))
    assert DINOHead(16, 32, 8, 64, norm_last_layer=False).last_layer.scale.requires_grad


def test_the_last_layer_is_frozen_for_the_first_epochs_only() -> None:
    """after_backward drops the prototypes' gradients while epoch < freeze_last_layer, so an optimizer
    with weight decay leaves them as initialised; afterwards they train."""
    model = small_dino(freeze_last_layer=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    before = model.head.last_layer.weight.clone()
    for epoch, moves in ((0, False), (1, True)):
        opt.zero_grad()
        model.training_step([torch.randn(8, 16), torch.randn(8, 16)])["loss"].backward()
        model.after_backward(step=epoch, epoch=epoch)
        assert (model.head.last_layer.weight.grad is not None) is moves
        opt.step()
        assert (not torch.equal(model.head.last_layer.weight, before)) is moves
        assert not torch.equal(model.head.mlp[0].weight.grad, torch.zeros_like(model.head.mlp[0].weight))


def test_the_teacher_follows_the_student_and_is_evaluated() -> None:
    model = small_dino(momentum_base=0.9)
    assert model.encoder is model.teacher.backbone  # DINO evaluates the teacher
    assert model.encoder_head is model.teacher.head.mlp
    assert not any(p.requires_grad for p in model.teacher.parameters())
    trained = {id(p) for g in model.param_groups() for _, p in g["params"]}
    assert trained == {id(p) for m in (model.backbone, model.head) for p in m.parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    old = [p.clone() for p in model.teacher.parameters()]
    model.training_step([torch.randn(8, 16), torch.randn(8, 16)])["loss"].backward()
    opt.step()
    model.after_step(0, 10)
    students = [*model.backbone.parameters(), *model.head.parameters()]
    for t, o, s in zip(model.teacher.parameters(), old, students):
        torch.testing.assert_close(t, 0.9 * o + 0.1 * s)


def test_the_teacher_has_no_stochastic_depth() -> None:
    cfg = compose_cfg(
        ["debug=smoke", "method=dino", "backbone=vit_tiny", "backbone.kwargs.drop_path_rate=0.1"]
    )
    model = hydra.utils.instantiate(cfg.method, backbone=hydra.utils.instantiate(cfg.backbone))
    rates = lambda m: {x.drop_prob for x in m.modules() if hasattr(x, "drop_prob")}  # noqa: E731
    assert max(rates(model.backbone)) > 0 and rates(model.teacher) == {0.0}


def test_multi_crop_views_and_one_pass_per_size() -> None:
    """2 global + 4 local views: the student sees every view in 2 passes (one per size), the teacher
    the 2 global ones in 1; the loss is lightly's over the same outputs."""
    model = small_dino(num_local_crops=4, local_crop_size=3, global_crop_scale=[0.4, 1.0])
    asked = []

    def draw(**changes):  # a global view: 16 values a row; a local one: 4 x 4 (flattened alike)
        asked.append(changes)
        return torch.randn(6, 4, 4) if "size" in changes else torch.randn(6, 16)

    views = model.views(draw)
    assert asked == [{"crop_scale": (0.4, 1.0)}] * 2 + [{"size": 3, "crop_scale": (0.05, 0.4)}] * 4
    model.backbone.calls.clear()
    model.teacher.backbone.calls.clear()
    model.training_step(views)
    assert model.backbone.calls == [(12, 16), (24, 4, 4)]
    assert model.teacher.backbone.calls == [(12, 16)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_local_crops": 2}, "needs method.local_crop_size"),
        (
            {
                "num_local_crops": 2,
                "local_crop_size": 16,
                "local_crop_scale": [0.3, 0.9],
                "global_crop_scale": [0.1, 0.5],
            },
            "local crops are the smaller ones",
        ),  # fmt: skip
        ({"local_crop_scale": [0.5, 0.2]}, "must be [min, max]"),
        ({"global_crop_scale": [0.0, 1.0]}, "must be [min, max]"),
    ],
)
def test_impossible_crop_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        small_dino(**kwargs)


def test_multi_crop_with_a_fixed_size_vit_is_refused() -> None:
    cfg = compose_cfg(["debug=smoke", "method=dino", "backbone=vit_tiny", "method.num_local_crops=2",
                       "method.local_crop_size=16"])  # fmt: skip
    backbone = hydra.utils.instantiate(cfg.backbone)
    if getattr(backbone, "dynamic_img_size", None) is not False:
        pytest.skip("this backbone config takes any image size")
    with pytest.raises(hydra.errors.InstantiationException, match="dynamic_img_size=true"):
        hydra.utils.instantiate(cfg.method, backbone=backbone)  # the CLI reports the UserError inside


def test_each_gradient_is_clipped_on_its_own_as_main_dino() -> None:
    """main_dino.py's clip_gradients: per parameter, grad x clip / (norm + 1e-6) where that is below 1."""
    model = small_dino(clip_grad=1.0, freeze_last_layer=0)
    model.training_step([torch.randn(8, 16), torch.randn(8, 16)])["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.after_backward(step=0, epoch=0)
    clipped = 0
    for name, g in grads.items():
        norm = g.norm()
        expected = g * (1.0 / (norm + 1e-6)) if 1.0 / (norm + 1e-6) < 1 else g
        clipped += bool(1.0 / (norm + 1e-6) < 1)
        torch.testing.assert_close(model.get_parameter(name).grad, expected)
    assert 0 < clipped < len(grads)  # some were over the threshold, some under
