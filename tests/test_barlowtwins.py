"""Barlow Twins (ssl_lab/methods/barlowtwins.py): the loss against lightly's BarlowTwinsLoss and a
hand-computed case, the projector against lightly's head, and the global batch's correlation."""

import pytest
import torch
import torch.nn as nn
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules.heads import BarlowTwinsProjectionHead

from ssl_lab import distributed
from ssl_lab.methods.barlowtwins import BarlowTwins, barlow_twins_loss


@pytest.mark.parametrize(
    "batch,dim,lambda_param,scale", [(8, 4, 0.0051, 1.0), (32, 64, 5e-3, 0.1), (5, 16, 0.1, 1.0)]
)
@pytest.mark.parametrize("gather", [False, True])
def test_the_loss_is_scale_times_lightlys(
    batch: int, dim: int, lambda_param: float, scale: float, gather: bool
) -> None:
    """solo-learn's loss is scale_loss x lightly's; with `gather` (world size 1 here) the gathering path."""
    torch.manual_seed(batch)
    z0, z1 = torch.randn(batch, dim, requires_grad=True), torch.randn(batch, dim, requires_grad=True)
    ours = barlow_twins_loss(z0, z1, lambda_param, scale, gather)
    reference = scale * BarlowTwinsLoss(lambda_param=lambda_param)(z0, z1)
    torch.testing.assert_close(ours, reference)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, [z0, z1]), torch.autograd.grad(reference, [z0, z1])):
        torch.testing.assert_close(g_ours, g_ref)


def test_the_loss_hand_computed() -> None:
    """Equal views whose features are standardised and uncorrelated: C = I, loss 0. Views whose
    second feature is negated: C = diag(1, -1), loss (1 - -1)^2 = 4."""
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert barlow_twins_loss(z, z.clone(), 0.0051).item() == pytest.approx(0.0, abs=1e-5)
    flipped = z * torch.tensor([1.0, -1.0])
    assert barlow_twins_loss(z, flipped, 0.0051).item() == pytest.approx(4.0, abs=1e-4)
    assert barlow_twins_loss(z, flipped, 0.0051, scale_loss=0.1).item() == pytest.approx(0.4, abs=1e-5)


def test_the_correlation_is_over_the_global_batch(monkeypatch) -> None:
    """Two processes simulated: each gathers both halves before standardising, so both compute the
    loss of the whole batch (a per-process correlation, gather=False, gives another number)."""
    torch.manual_seed(0)
    z0, z1 = torch.randn(16, 8), torch.randn(16, 8) + torch.arange(16.0)[:, None] * 0.1
    whole = barlow_twins_loss(z0, z1, 0.0051)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in (0, 1):
        local0, local1 = z0.chunk(2)[rank], z1.chunk(2)[rank]
        everyones = {id(local0): z0, id(local1): z1}  # what all_gather returns for each
        monkeypatch.setattr(distributed, "gather_with_grad", lambda x, everyones=everyones: everyones[id(x)])
        torch.testing.assert_close(barlow_twins_loss(local0, local1, 0.0051, gather=True), whole)
        assert not torch.allclose(barlow_twins_loss(local0, local1, 0.0051), whole, rtol=1e-3)


def test_the_projector_is_lightlys_barlow_twins_head_but_the_official_last_layer() -> None:
    """Layer types and weight shapes as lightly's BarlowTwinsProjectionHead; the last Linear without a
    bias, as the official code (lightly's has one)."""
    backbone = nn.Flatten()
    backbone.num_features = 8
    ours = BarlowTwins(backbone, proj_hidden_dim=32, proj_output_dim=16).projector
    theirs = BarlowTwinsProjectionHead(8, 32, 16).layers
    kinds = lambda m: [type(x).__name__ for x in m]  # noqa: E731
    weights = lambda m: [tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")]  # noqa: E731
    assert kinds(ours) == kinds(theirs) and weights(ours) == weights(theirs)
    assert ours[-1].bias is None and theirs[-1].bias is not None
