"""The parts methods share (ssl_lab/methods/parts.py) against lightly's and hand-computed values."""

import copy

import pytest
import torch
import torch.nn as nn
from lightly.loss import NegativeCosineSimilarity
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule

from ssl_lab.methods.parts import MomentumTeacher, cosine_momentum, mlp, negative_cosine


@pytest.mark.parametrize("total", [1, 2, 10, 1000])
def test_cosine_momentum_is_lightlys_cosine_schedule(total: int) -> None:
    for step in sorted({0, 1, total // 3, total // 2, total - 2, total - 1} - {-1}):
        assert cosine_momentum(step, total, 0.99, 1.0) == pytest.approx(
            cosine_schedule(step, total, 0.99, 1.0)
        )
    assert cosine_momentum(0, total, 0.99) == (0.99 if total > 1 else 1.0)
    assert cosine_momentum(total - 1, total, 0.99) == pytest.approx(1.0)


def test_the_momentum_rises_over_the_whole_run_not_within_its_first_epochs() -> None:
    """solo-learn #248: with a wrong step count tau reached 1 early. Halfway it is halfway."""
    assert cosine_momentum(500, 1001, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 1001, 0.99) < 0.9903


def test_the_teacher_update_is_lightlys_update_momentum() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    teacher = MomentumTeacher({"net": student}, base=0.9)
    reference = copy.deepcopy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():  # the student moves (an optimizer step)
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update({"net": student}, step=3, total_steps=10)
    tau = cosine_momentum(3, 10, 0.9)
    update_momentum(student, reference, tau)
    for ours, theirs in zip(teacher.net.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)
    assert teacher.momentum.item() == pytest.approx(tau)
    assert "momentum" in teacher.state_dict() and "net.0.weight" in teacher.state_dict()  # resume


def test_negative_cosine_is_lightlys_with_the_stop_gradient() -> None:
    torch.manual_seed(0)
    p, z = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    ours = negative_cosine(p, z)
    torch.testing.assert_close(ours, NegativeCosineSimilarity()(p, z.detach()))
    ours.backward()
    assert p.grad is not None and z.grad is None
    same = torch.randn(3, 5)
    assert negative_cosine(same, 2 * same).item() == pytest.approx(-1.0)


def test_mlp_layers_and_its_last_batch_norm() -> None:
    head = mlp([8, 16, 4], last_bn=True, last_affine=False)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[1].affine and not head[4].affine and head[0].bias is None and head[3].bias is None
    plain = mlp([8, 16, 4])
    assert [type(m).__name__ for m in plain] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert plain[3].bias is not None
