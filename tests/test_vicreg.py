"""VICReg (ssl_lab/methods/vicreg.py): the loss against lightly's VICRegLoss and hand-computed cases,
the expander against lightly's head, and the variance/covariance over the global batch."""

import pytest
import torch
import torch.nn as nn
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead

from ssl_lab import distributed
from ssl_lab.errors import UserError
from ssl_lab.methods.vicreg import VICReg, vicreg_loss


@pytest.mark.parametrize("batch,dim", [(8, 4), (32, 64), (5, 16)])
@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 10.0, 0.5)])
@pytest.mark.parametrize("gather", [False, True])
def test_the_loss_is_lightlys_vicreg_loss(batch: int, dim: int, weights: tuple, gather: bool) -> None:
    torch.manual_seed(batch)
    z0, z1 = 0.5 * torch.randn(batch, dim, requires_grad=True), torch.randn(batch, dim, requires_grad=True)
    ours, terms = vicreg_loss(z0, z1, *weights, gather=gather)
    reference = VICRegLoss(*weights)(z0, z1)
    torch.testing.assert_close(ours, reference)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, [z0, z1]), torch.autograd.grad(reference, [z0, z1])):
        torch.testing.assert_close(g_ours, g_ref)
    recombined = (
        weights[0] * terms["invariance"] + weights[1] * terms["variance"] + weights[2] * terms["covariance"]
    )
    torch.testing.assert_close(recombined, ours.detach())


def test_the_loss_hand_computed() -> None:
    """Equal views with centred, uncorrelated features of std > 1: every term 0. A collapsed batch (all
    rows equal): invariance 0, covariance 0, variance 1 - sqrt(1e-4) = 0.99 for each branch, so 25 x 0.99
    (the mean of the branches, not their sum as solo-learn has it)."""
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert vicreg_loss(z, z.clone())[0].item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.ones(4, 2)
    loss, terms = vicreg_loss(collapsed, collapsed.clone())
    assert terms["variance"].item() == pytest.approx(0.99) and loss.item() == pytest.approx(25 * 0.99)


def test_variance_and_covariance_are_over_the_global_batch(monkeypatch) -> None:
    """Two processes simulated: the invariance term is each process's own mean (DDP averages it into the
    global one); the variance and covariance terms are the whole batch's on both."""
    torch.manual_seed(0)
    z0, z1 = torch.randn(16, 8), torch.randn(16, 8) + torch.arange(16.0)[:, None] * 0.3
    _, whole = vicreg_loss(z0, z1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    invariances = []
    for rank in (0, 1):
        local0, local1 = z0.chunk(2)[rank], z1.chunk(2)[rank]
        everyones = {id(local0): z0, id(local1): z1}
        monkeypatch.setattr(distributed, "gather_with_grad", lambda x, everyones=everyones: everyones[id(x)])
        _, terms = vicreg_loss(local0, local1, gather=True)
        for name in ("variance", "covariance"):
            torch.testing.assert_close(terms[name], whole[name])
        invariances.append(terms["invariance"])
        assert not torch.allclose(
            vicreg_loss(local0, local1)[1]["covariance"], whole["covariance"], rtol=1e-3
        )
    torch.testing.assert_close(sum(invariances) / 2, whole["invariance"])


def test_the_expander_is_lightlys_vicreg_head_but_the_official_last_layer() -> None:
    """Layer types and weight shapes as lightly's VICRegProjectionHead; the last Linear without a bias,
    as the official Projector (lightly's has one)."""
    backbone = nn.Flatten()
    backbone.num_features = 8
    ours = VICReg(backbone, proj_hidden_dim=32, proj_output_dim=16).projector
    theirs = VICRegProjectionHead(8, 32, 16, num_layers=3).layers
    kinds = lambda m: [type(x).__name__ for x in m.modules() if not list(x.children())]  # noqa: E731
    assert kinds(ours) == kinds(theirs)
    weights = lambda m: [tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")]  # noqa: E731
    assert weights(ours) == weights(theirs)
    assert ours[-1].bias is None and theirs[-1].bias is not None


def test_all_weights_zero_is_a_one_line_error() -> None:
    with pytest.raises(UserError, match="are all 0, which leaves no loss to train"):
        VICReg(nn.Flatten(), sim_loss_weight=0.0, var_loss_weight=0.0, cov_loss_weight=0.0)
