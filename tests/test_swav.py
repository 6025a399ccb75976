"""SwAV (ssl_lab/methods/swav.py): the loss against lightly's SwaVLoss (with and without a queue, with
multi-crop), the head and prototypes against lightly's, Sinkhorn over two simulated processes against
one, the queue's start and fill, the frozen and unit-norm prototypes, multi-crop views and the errors."""

import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import FlatBackbone
from lightly.loss import SwaVLoss
from lightly.models.modules.heads import SwaVProjectionHead, SwaVPrototypes

from ssl_lab import distributed
from ssl_lab.errors import UserError
from ssl_lab.methods.swav import SwAV, sinkhorn, swav_loss

# Summation order differs from lightly's (an einsum over all pairs, the official /K in Sinkhorn): a few
# 1e-7 relative; a wrong pair, target or normalisation moves the loss by 1e-2 or more.
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


def cosines(n: int, prototypes: torch.Tensor, seed: int, grad: bool = True) -> torch.Tensor:
    """Scores as SwAV makes them: unit embeddings against unit prototypes."""
    torch.manual_seed(seed)
    z = F.normalize(torch.randn(n, prototypes.shape[1]), dim=1)
    return (z @ prototypes.T).requires_grad_(grad)


def small_swav(**kwargs) -> SwAV:
    torch.manual_seed(0)
    kwargs = {"proj_hidden_dim": 32, "proj_output_dim": 8, "num_prototypes": 40, "queue_size": 24, **kwargs}
    return SwAV(FlatBackbone(16, scaled=True), **kwargs)


@pytest.mark.parametrize("n_local", [0, 4])
@pytest.mark.parametrize("queue", [False, True])
def test_the_loss_is_lightlys_swav_loss(n_local: int, queue: bool) -> None:
    """2 global views and 0 or 4 low-resolution ones, with or without queue scores (30 past rows per
    global view): the same loss and gradients as lightly's SwaVLoss(0.1, 3, 0.05)."""
    prototypes = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    views = [cosines(12, prototypes, seed) for seed in range(2 + n_local)]
    queued = [cosines(30, prototypes, 100 + i, grad=False) for i in range(2)] if queue else None
    reference = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(
        views[:2], views[2:], queued
    )
    ours = swav_loss(views, 0.1, 0.05, 3, queue_scores=torch.stack(queued) if queue else None)
    torch.testing.assert_close(ours, reference.reshape(()), **CLOSE)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, views), torch.autograd.grad(reference, views)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-8)  # gradients ~1e-3
    if queue:  # and the queue matters: a bug that dropped it would pass the comparison above otherwise
        assert abs(ours.item() - swav_loss(views).item()) > 1e-3


def test_a_queue_of_weight_0_is_no_queue_and_makes_no_nan() -> None:
    """Before the queue is full its rows are in the problem with weight 0: the assignments of the batch
    are exactly those without them, even for rows that are all zeros (the empty queue) or extreme."""
    prototypes = F.normalize(torch.randn(20, 8), dim=1)
    views = [cosines(6, prototypes, seed) for seed in range(3)]
    zeros = torch.zeros(2, 10, 20)
    extreme = torch.cat([torch.full((2, 5, 20), -1.0), torch.full((2, 5, 20), 1.0)], dim=1)
    for queued in (zeros, extreme):
        off = swav_loss(views, queue_scores=queued, queue_weight=torch.tensor(False))
        torch.testing.assert_close(off, swav_loss(views), rtol=1e-6, atol=0)
        assert torch.isfinite(off)
        problem = torch.cat([torch.stack(views[:2]).detach(), queued], dim=1)
        weight = torch.cat([torch.ones(6), torch.zeros(10)])
        q = sinkhorn(problem, weight=weight)
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q[:, :6], sinkhorn(problem[:, :6]), rtol=1e-5, atol=1e-7)


def test_sinkhorn_rows_are_assignments_and_prototypes_equally_used() -> None:
    """Each row of the result sums to 1; with many iterations each prototype gets N / K of the rows."""
    scores = cosines(30, F.normalize(torch.randn(6, 4), dim=1), 0, grad=False)
    q = sinkhorn(scores, iterations=3)
    torch.testing.assert_close(q.sum(1), torch.ones(30))
    converged = sinkhorn(scores, iterations=200)
    torch.testing.assert_close(converged.sum(0), torch.full((6,), 5.0), rtol=1e-3, atol=1e-3)


class FakeGroup:
    """`world` processes simulated by threads: `total` is an all-reduce (every rank's tensor summed in
    rank order, the same on each), `rank` the calling thread's."""

    def __init__(self, world: int) -> None:
        self.world, self.local = world, threading.local()
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)

    def rank(self) -> int:
        return self.local.rank

    def total(self, x: torch.Tensor) -> torch.Tensor:
        self.slots[self.rank()] = x.detach().clone()
        self.barrier.wait()
        out = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        self.slots[self.rank()] = x.detach().clone()
        self.barrier.wait()
        out = torch.cat(self.slots)
        self.barrier.wait()
        return out

    def run(self, fn) -> list:
        results: list = [None] * self.world

        def target(rank: int) -> None:
            self.local.rank = rank
            results[rank] = fn(rank)

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


@pytest.mark.parametrize("queue_rows", [0, 7, 16])
def test_sinkhorn_over_two_processes_equals_one(queue_rows: int, monkeypatch) -> None:
    """Each process holds half the batch and its share of the shared queue (`distributed.shard`: 4 and 3
    of 7 rows); with the sums all-reduced, each gets the assignments, the loss and the gradients of
    one process on the whole batch and the whole queue (lightly #1006). Without the all-reduce they
    differ."""
    prototypes = F.normalize(torch.randn(30, 8), dim=1)
    views = [cosines(8, prototypes, seed) for seed in range(3)]  # 2 global, 1 local
    queue = torch.stack([cosines(queue_rows, prototypes, 50 + i, grad=False) for i in range(2)])
    queued = queue if queue_rows else None
    single = swav_loss(views, queue_scores=queued)
    (single_grad,) = torch.autograd.grad(single, views[0])
    codes = sinkhorn(torch.cat([torch.stack(views[:2]).detach(), queue], dim=1))[:, :8]

    group = FakeGroup(2)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", group.rank)
    monkeypatch.setattr(distributed, "total", group.total)

    def on_rank(rank: int):
        local = [v.detach()[rank * 4 : (rank + 1) * 4].requires_grad_() for v in views]
        share = distributed.shard(queue_rows)
        mine = queue[:, share.start : share.stop] if queue_rows else None
        loss = swav_loss(local, queue_scores=mine)
        (grad,) = torch.autograd.grad(loss, local[0])
        problem = torch.stack(local[:2]).detach()
        if queue_rows:
            problem = torch.cat([problem, mine], dim=1)
        return loss, grad, sinkhorn(problem)[:, :4], len(share)

    results = group.run(on_rank)
    assert [r[3] for r in results] == ([0, 0] if not queue_rows else [4, 3] if queue_rows == 7 else [8, 8])
    torch.testing.assert_close(torch.cat([r[2] for r in results], dim=1), codes, rtol=1e-5, atol=1e-7)
    # DDP averages the processes' gradients of their own losses: each local mean over 4 rows
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, single, **CLOSE)
    torch.testing.assert_close(torch.cat([r[1] for r in results]) / 2, single_grad, rtol=1e-4, atol=1e-8)

    monkeypatch.setattr(distributed, "total", lambda x: x)  # sums of one process only: not the same codes
    alone = sinkhorn(torch.stack(views[:2]).detach()[:, :4])
    assert not torch.allclose(alone, codes[:, :4], atol=1e-3)


def test_the_method_on_two_processes_equals_one(monkeypatch) -> None:
    """The whole step on two simulated processes, each with half the batch, through the queue's fill and
    use (21 rows: shares of 11 and 10): the mean of their losses is one process's loss at every step,
    and all hold one process's queue. Batch norm in eval mode, so that a row's projection does not
    depend on the other rows (on real processes it is synchronised)."""
    steps, batches = 6, [[torch.randn(8, 16), torch.randn(8, 16)] for _ in range(6)]
    single = small_swav(queue_size=21, epoch_queue_starts=0).eval()
    expected = []
    for step in range(steps):
        single.set_progress(step, 1, steps)
        expected.append(single.training_step(batches[step]))
    assert [e["queue_used"].item() for e in expected] == [0, 0, 0, 1, 1, 1]

    group = FakeGroup(2)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", group.rank)
    monkeypatch.setattr(distributed, "total", group.total)
    monkeypatch.setattr(distributed, "gather", group.gather)

    # built here, not in the threads: both would seed and draw from torch's one global generator at once
    models = [small_swav(queue_size=21, epoch_queue_starts=0).eval() for _ in range(2)]

    def on_rank(rank: int):
        model, losses = models[rank], []
        for step in range(steps):
            model.set_progress(step, 1, steps)
            losses.append(model.training_step([v[rank * 4 : (rank + 1) * 4] for v in batches[step]])["loss"])
        return losses, model.queue

    results = group.run(on_rank)
    for step in range(steps):
        torch.testing.assert_close(
            (results[0][0][step] + results[1][0][step]) / 2, expected[step]["loss"], **CLOSE
        )
    for _, queue in results:
        torch.testing.assert_close(queue, single.queue)


def test_the_head_and_prototypes_are_lightlys() -> None:
    """The projector layer by layer as lightly's SwaVProjectionHead (its weights copied in: the same
    output); the prototypes as lightly's SwaVPrototypes after its normalize(), but without its bias (the
    official prototypes have none): with lightly's bias zeroed, the same scores."""
    model = small_swav()
    head, prototypes = SwaVProjectionHead(16, 32, 8), SwaVPrototypes(8, 40)
    assert [type(m) for m in model.projector] == [type(m) for m in head.layers]
    assert [tuple(p.shape) for p in model.projector.parameters()] == [
        tuple(p.shape) for p in head.layers.parameters()
    ]
    with torch.no_grad():
        for a, b in zip(model.projector.parameters(), head.layers.parameters()):
            a.copy_(b)
        model.prototypes.weight.copy_(prototypes.heads[0].weight)
        prototypes.heads[0].bias.zero_()
    model.normalize_prototypes()
    prototypes.normalize()
    x = torch.randn(6, 16)
    z = F.normalize(model.projector(x), dim=1)
    torch.testing.assert_close(z, F.normalize(head(x), dim=1))
    torch.testing.assert_close(model.prototypes(z), prototypes(z))
    assert model.prototypes.bias is None and model.evaluated == "backbone"
    assert model.encoder is model.backbone and model.encoder_head is model.projector


def test_the_queue_starts_at_its_epoch_and_is_used_once_full() -> None:
    """queue_size 24, global batch 8, 2 steps an epoch, from epoch 2: epochs 0-1 push nothing; steps
    4, 5, 6 fill it (24 rows) and leave it out of Sinkhorn (the loss is the one without a queue);
    from step 7 it is in, and the loss is lightly's with the queue's scores."""
    model = small_swav(epoch_queue_starts=2, temperature=0.1)
    torch.manual_seed(1)
    for step in range(9):
        model.set_progress(step, steps_per_epoch=2, total_steps=100)
        views = [torch.randn(8, 16), torch.randn(8, 16)]
        before = model.queue.clone()
        out = model.training_step(views)
        with torch.no_grad():  # the same forward by hand
            z = F.normalize(model.projector(torch.cat(views)), dim=1).chunk(2)  # both views in one pass
            scores = [model.prototypes(x) for x in z]
            queued = [model.prototypes(q) for q in before]
        used = step >= 7
        assert out["queue_used"].item() == float(used), step
        expected = SwaVLoss()(scores, [], queued if used else None)
        torch.testing.assert_close(out["loss"], expected.reshape(()), **CLOSE)
        filled = min(max(step - 3, 0) * 8, 24)
        assert model.queue_filled.item() == filled, step
        if step < 4:
            assert torch.equal(model.queue, torch.zeros_like(model.queue))
        else:  # the newest embeddings of each global view, where the pointer was
            rows = [(8 * (step - 4) + i) % 24 for i in range(8)]
            torch.testing.assert_close(model.queue[:, rows], torch.stack(z))


def test_prototypes_are_frozen_then_trained_and_unit_norm_after_each_step() -> None:
    """after_backward drops the prototypes' gradient while epoch < freeze_prototypes_epochs, so an
    optimizer with weight decay leaves them as initialised; later they move; after_step puts every row
    back on the unit sphere (it is so from init)."""
    model = small_swav(freeze_prototypes_epochs=1, queue_size=0)
    w = model.prototypes.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(40))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)
    before = w.detach().clone()
    for epoch, moves in ((0, False), (1, True)):
        opt.zero_grad()
        model.training_step([torch.randn(8, 16), torch.randn(8, 16)])["loss"].backward()
        model.after_backward(step=epoch, epoch=epoch)
        assert (w.grad is not None) is moves
        opt.step()
        assert (not torch.equal(w, before)) is moves
        assert model.projector[0].weight.grad.abs().sum() > 0
        if moves:
            assert (w.norm(dim=1) - 1).abs().max() > 1e-4  # the step left the sphere
        model.after_step(epoch, 10)
        torch.testing.assert_close(w.norm(dim=1), torch.ones(40))


def test_the_loss_is_fp32_under_bf16_autocast() -> None:
    """At T 0.1 and eps 0.05, bf16 scores would be resolved to ~0.04 in logit units: the loss inside
    autocast equals the one outside."""
    prototypes = F.normalize(torch.randn(300, 16), dim=1)
    views = [cosines(64, prototypes, seed, grad=False) for seed in range(2)]
    reference = swav_loss(views)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = swav_loss(views)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)


def test_multi_crop_views_and_one_pass_per_size() -> None:
    model = small_swav(num_local_crops=4, local_crop_size=3, global_crop_scale=[0.14, 1.0])
    asked = []

    def draw(**changes):  # a global view: 16 values a row; a local one: 4 x 4 (flattened alike)
        asked.append(changes)
        return torch.randn(6, 4, 4) if "size" in changes else torch.randn(6, 16)

    views = model.views(draw)
    assert asked == [{"crop_scale": (0.14, 1.0)}] * 2 + [{"size": 3, "crop_scale": (0.05, 0.14)}] * 4
    model.backbone.calls.clear()
    out = model.training_step(views)
    assert model.backbone.calls == [(12, 16), (24, 4, 4)] and torch.isfinite(out["loss"])
    assert model.queue_filled.item() == 0  # only the global views would be queued, from epoch 15


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
    ],
)
def test_impossible_settings_are_refused_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        small_swav(**kwargs)


def test_a_queue_smaller_than_the_global_batch_is_refused() -> None:
    model = small_swav(queue_size=24)
    model.check_batch(24)
    with pytest.raises(UserError, match="method.queue_size=24 is smaller than batch_size=32") as error:
        model.check_batch(32)
    assert "\n" not in str(error.value)
    small_swav(queue_size=0).check_batch(4096)  # no queue, no limit
