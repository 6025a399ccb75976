"""LeJEPA against lightly's LeJEPALoss and SIGReg (the same formulas as the paper's MINIMAL.md) on the same
inputs and random directions."""

from __future__ import annotations

import pytest
import torch
from conftest import VIT, compose_cfg
from hydra.utils import instantiate

from ssl_lab.errors import UserError
from ssl_lab.methods.base import Draw
from ssl_lab.methods.lejepa import LeJEPA, invariance_loss, sigreg, slicing_directions


def lightly_directions(seed: int, dim: int, slices: int) -> torch.Tensor:
    """What lightly's SIGReg draws after torch.manual_seed(seed): randn(D, M), columns normalised."""
    torch.manual_seed(seed)
    a = torch.randn(dim, slices)
    return a / a.norm(p=2, dim=0)


@pytest.mark.parametrize("local_views", [1, 6])
def test_the_loss_is_lightlys_lejepa_loss(local_views: int) -> None:
    from lightly.loss import LeJEPALoss

    torch.manual_seed(0)
    glob, local = torch.randn(2, 16, 8) * 1.5 + 0.3, torch.randn(local_views, 16, 8)
    proj = torch.cat([glob, local])
    ours = 0.05 * sigreg(proj, lightly_directions(3, 8, 64)) + 0.95 * invariance_loss(proj, 2)
    torch.manual_seed(3)
    theirs = LeJEPALoss(lambda_param=0.05, sigreg_num_vectors=64)(local_proj=local, global_proj=glob)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("knots", "t_max"), [(17, 3.0), (5, 1.5)])
def test_sigreg_is_lightlys_at_other_grids(knots: int, t_max: float) -> None:
    from lightly.loss import SIGReg

    torch.manual_seed(1)
    proj = torch.randn(3, 32, 6, requires_grad=True)
    ours = sigreg(proj, lightly_directions(5, 6, 16), knots, t_max)
    (ours_grad,) = torch.autograd.grad(ours, proj)
    torch.manual_seed(5)
    theirs = SIGReg(knots=knots, t_max=t_max, num_vectors=16)(proj)
    (theirs_grad,) = torch.autograd.grad(theirs, proj)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-6)


def test_sigreg_tells_a_gaussian_from_a_collapse() -> None:
    """Of order 1 for isotropic Gaussian projections (N x a squared error that shrinks as 1/N), hundreds
    of times larger for a stretched batch and larger still for a collapsed one: the property the
    regulariser exists for."""
    torch.manual_seed(0)
    directions = slicing_directions(torch.rand(2, 16, 256))
    gaussian = sigreg(torch.randn(1, 4096, 16), directions)
    collapsed = sigreg(torch.full((1, 4096, 16), 0.5) + 0.01 * torch.randn(1, 4096, 16), directions)
    stretched = sigreg(torch.randn(1, 4096, 16) * torch.linspace(0.1, 3, 16), directions)
    assert gaussian < 3 and 100 * gaussian < stretched < collapsed


def test_the_slicing_directions_are_uniform_unit_vectors() -> None:
    """Box-Muller from the shared noise: unit columns whose coordinates have the moments of a uniform
    direction on the sphere (mean 0, variance 1/D), and never a NaN at noise 0."""
    noise = torch.rand(2, 8, 20000)
    noise[:, 0, 0] = 0.0
    d = slicing_directions(noise)
    torch.testing.assert_close(d.norm(dim=0), torch.ones(20000))
    assert d.mean().abs() < 0.01 and abs(d.var().item() - 1 / 8) < 0.005
    assert torch.isfinite(d).all()


def small_lejepa(**kwargs) -> LeJEPA:
    cfg = compose_cfg(["backbone=timm", *VIT, "method=lejepa"])
    torch.manual_seed(0)
    return LeJEPA(instantiate(cfg.backbone), proj_hidden_dim=32, proj_output_dim=8, num_slices=16, **kwargs)


def test_the_step_is_lightlys_loss_on_the_projections() -> None:
    """The whole step: the views through the backbone and projector, then LeJEPALoss with its global
    and local views, and the slicing directions drawn from the step's shared noise."""
    from lightly.loss import LeJEPALoss

    model = small_lejepa(num_local_crops=2, local_crop_size=16)
    model.backbone.dynamic_img_size = True
    torch.manual_seed(1)
    draw = Draw(lambda size=32, **c: torch.randn(4, 3, size, size), lambda *s: torch.rand(4, *s), torch.rand)
    views = model.views(draw)
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2 + [(2, 8, 16)]
    out = model.training_step(views)
    proj = torch.stack(model.embed_views(views[:-1], model.projector))
    criterion = LeJEPALoss(lambda_param=0.05, sigreg_num_vectors=16)
    criterion.sigreg._generate_unit_vectors = lambda *a: slicing_directions(views[-1])
    expected = criterion(local_proj=proj[2:], global_proj=proj[:2])
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)


def test_a_batch_of_one_and_a_single_view_are_refused() -> None:
    with pytest.raises(UserError, match="batch_size=1"):
        small_lejepa().check_batch(1)
    with pytest.raises(UserError, match="at least two views"):
        small_lejepa(num_global_views=1)


def test_the_projector_is_lightlys_lejepa_projection_head() -> None:
    """Layer by layer the same as LeJEPAProjectionHead (Linear-BN-ReLU twice, then a Linear with bias):
    with the same weights, the same outputs."""
    from lightly.models.modules import LeJEPAProjectionHead

    model = small_lejepa()
    theirs = LeJEPAProjectionHead(input_dim=model.num_features, hidden_dim=32, output_dim=8)
    theirs.layers.load_state_dict(model.projector.state_dict())  # the same names: a missing one raises
    x = torch.randn(16, model.num_features)
    torch.testing.assert_close(model.projector(x), theirs(x))
