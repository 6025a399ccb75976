"""MoCo v2 / v2+ (ssl_lab/methods/mocov2.py): the loss against lightly's NTXentLoss with a memory bank
and a hand-computed case, the queues (filled after the loss, with every process's keys), the teacher
and the symmetric variant."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FlatBackbone
from lightly.loss import NTXentLoss

from ssl_lab import distributed
from ssl_lab.errors import UserError
from ssl_lab.methods.mocov2 import MoCoV2, moco_queue_xent


def small_mocov2(**kwargs) -> MoCoV2:
    torch.manual_seed(0)
    kwargs = {"proj_hidden_dim": 32, "proj_output_dim": 8, "queue_size": 64, **kwargs}
    return MoCoV2(FlatBackbone(16, scaled=True), **kwargs)


@pytest.mark.parametrize("batch,dim,size,temperature", [(4, 8, 16, 0.2), (16, 32, 128, 0.07), (3, 2, 5, 1.0)])
def test_the_loss_is_lightlys_moco_loss(batch: int, dim: int, size: int, temperature: float) -> None:
    """lightly's NTXentLoss with a memory bank is MoCo's loss: [q.k+, q.bank] / T, the positive first."""
    torch.manual_seed(batch)
    q, k = torch.randn(batch, dim, requires_grad=True), torch.randn(batch, dim)
    queue = F.normalize(torch.randn(size, dim), dim=1)
    ours = moco_queue_xent(q, k, queue, temperature)
    criterion = NTXentLoss(temperature=temperature, memory_bank_size=(size, dim))
    criterion.memory_bank.bank = queue.clone()
    reference = criterion(q, k)
    torch.testing.assert_close(ours, reference)
    (g_ours,) = torch.autograd.grad(ours, q)
    (g_ref,) = torch.autograd.grad(reference, q)
    torch.testing.assert_close(g_ours, g_ref)


def test_the_loss_hand_computed() -> None:
    """A query equal to its key, orthogonal to both queued keys, T=1: -log(e / (e + 2))."""
    q = torch.tensor([[1.0, 0.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert moco_queue_xent(q, q.clone(), queue, 1.0).item() == pytest.approx(
        math.log(math.e + 2) - 1, abs=1e-6
    )


def test_the_queue_takes_the_keys_after_the_loss_read_it() -> None:
    model = small_mocov2()
    before = model.queues[0].queue.clone()
    views = [torch.randn(6, 16), torch.randn(6, 16)]
    k1 = model.teacher.projector(model.teacher.backbone(views[1]))
    loss = model.training_step(views)["loss"]
    q0 = model.projector(model.backbone(views[0]))
    torch.testing.assert_close(loss, moco_queue_xent(q0, k1, before, 0.2))  # the queue as it was
    torch.testing.assert_close(model.queues[0].queue[:6], F.normalize(k1, dim=1))  # then view 1's keys
    torch.testing.assert_close(model.queues[0].queue[6:], before[6:])
    assert model.queues[0].ptr.item() == 6 and len(model.queues) == 1


def test_every_process_pushes_every_processs_keys(monkeypatch) -> None:
    """The queue is the same on every process whatever their number: the pushed keys are gathered."""
    model = small_mocov2()
    other = torch.randn(6, 8)
    monkeypatch.setattr(distributed, "gather", lambda x: torch.cat([x, other]))
    model.training_step([torch.randn(6, 16), torch.randn(6, 16)])
    torch.testing.assert_close(model.queues[0].queue[6:12], other)
    assert model.queues[0].ptr.item() == 12


def test_symmetric_is_the_mean_of_both_directions_each_with_its_own_queue() -> None:
    model = small_mocov2(symmetric=True)
    queues = [q.queue.clone() for q in model.queues]
    views = [torch.randn(6, 16), torch.randn(6, 16)]
    k0, k1 = (model.teacher.projector(model.teacher.backbone(v)) for v in views)
    q0, q1 = (model.projector(model.backbone(v)) for v in views)
    expected = (moco_queue_xent(q0, k1, queues[0], 0.2) + moco_queue_xent(q1, k0, queues[1], 0.2)) / 2
    torch.testing.assert_close(model.training_step(views)["loss"], expected)
    torch.testing.assert_close(model.queues[0].queue[:6], F.normalize(k1, dim=1))
    torch.testing.assert_close(model.queues[1].queue[:6], F.normalize(k0, dim=1))


def test_the_teacher_follows_with_the_cosine_schedule_and_gets_no_gradient() -> None:
    model = small_mocov2(momentum_base=0.99, momentum_end=0.999)
    model.training_step([torch.randn(6, 16), torch.randn(6, 16)])["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    model.after_step(0, 10)
    assert model.teacher.momentum.item() == pytest.approx(0.99)
    model.after_step(9, 10)
    assert model.teacher.momentum.item() == pytest.approx(0.999)


def test_a_queue_smaller_than_the_batch_is_refused() -> None:
    with pytest.raises(UserError, match="method.queue_size=64 is smaller than batch_size=128"):
        small_mocov2().check_batch(128)


def test_a_shared_queue_is_lightlys_benchmark_loss_both_directions_reading_one_bank_in_turn() -> None:
    """lightly's benchmark MoCo: 0.5 (NTXentLoss(q0, k1) + NTXentLoss(q1, k0)) with ONE memory bank,
    which the second call reads with the first call's keys in it; the bank then holds both views' keys."""
    model = small_mocov2(symmetric=True, shared_queue=True, temperature=0.1)
    assert len(model.queues) == 1
    criterion = NTXentLoss(temperature=0.1, memory_bank_size=(64, 8))
    criterion.memory_bank.bank = model.queues[0].queue.clone()
    views = [torch.randn(6, 16), torch.randn(6, 16)]
    k0, k1 = (model.teacher.projector(model.teacher.backbone(v)).detach() for v in views)
    q0, q1 = (model.projector(model.backbone(v)) for v in views)
    expected = 0.5 * (criterion(q0, k1) + criterion(q1, k0))
    torch.testing.assert_close(model.training_step(views)["loss"], expected)
    torch.testing.assert_close(
        model.queues[0].queue[:12], torch.cat([F.normalize(k1, dim=1), F.normalize(k0, dim=1)])
    )


def test_shuffled_keys_are_the_teachers_keys_of_a_shuffled_batch_put_back() -> None:
    """method.shuffle_keys: the teacher sees its view in the order of the drawn noise (lightly's
    batch_shuffle), and each key comes back to its own query. With batch norm in the teacher, the
    keys are those of the shuffled batch split as the order says; without, they equal the plain keys."""
    model = small_mocov2(shuffle_keys=True)
    views = [torch.randn(6, 16), torch.randn(6, 16)]
    noise = torch.rand(6, 2)
    plain = model.key(views[1], None)
    torch.testing.assert_close(model.key(views[1], noise[:, 0]), plain)  # per-sample network: same keys
    order = noise[:, 0].argsort()

    class SplitNorm(nn.Module):  # batch norm over 2 consecutive splits, as backbone.bn_splits does
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([F.batch_norm(c, None, None, training=True) for c in x.chunk(2)])

    head = model.teacher.projector
    model.teacher.projector = nn.Sequential(head, SplitNorm())
    mine = model.key(views[1], noise[:, 0])
    theirs = model.teacher.projector(views[1][order])[order.argsort()]
    torch.testing.assert_close(mine, theirs)
    assert not torch.allclose(mine, model.teacher.projector(views[1]))  # the shuffle matters


def test_a_shared_queue_without_the_symmetric_loss_is_a_one_line_error() -> None:
    with pytest.raises(UserError, match="method.shared_queue=true .* set method.symmetric=true"):
        small_mocov2(shared_queue=True)


@pytest.mark.slow
def test_shuffled_keys_and_a_shared_queue_compile_in_one_graph() -> None:
    """lightly's benchmark MoCo (shuffle_keys, shared_queue): no graph break, so no host sync in it."""
    model = small_mocov2(symmetric=True, shared_queue=True, shuffle_keys=True)
    views = [torch.randn(6, 16), torch.randn(6, 16), torch.rand(6, 2)]
    loss = torch.compile(model.training_step, fullgraph=True)(views)["loss"]
    assert torch.isfinite(loss) and loss.requires_grad
