"""MSN against lightly's MSNLoss and the official losses.py (written out below) on the same inputs, and
its step against the official arrangement: the anchor view with patches dropped, focal views whole, the
unmasked target view through the momentum network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VIT, compose_cfg
from hydra.utils import instantiate

from ssl_lab.errors import UserError
from ssl_lab.methods.base import Draw
from ssl_lab.methods.mae import random_masking
from ssl_lab.methods.msn import MSN, msn_loss
from ssl_lab.methods.parts import vit_tokens


def official_msn_loss(anchors, targets, prototypes, tau=0.1, t=0.25, use_sinkhorn=True):
    """facebookresearch/msn src/losses.py on one process: snn, sharpen, distributed_sinkhorn, the cross
    entropy as log(probs ** -targets), me-max as -sum(log(avg ** -avg)) + log K."""

    def snn(q):
        return F.softmax(F.normalize(q) @ F.normalize(prototypes).T / tau, dim=1)

    probs = snn(anchors)
    with torch.no_grad():
        sharp = snn(targets) ** (1.0 / t)
        sharp = sharp / sharp.sum(dim=1, keepdim=True)
        if use_sinkhorn:
            q = sharp.T.clone()
            b, k = q.shape[1], q.shape[0]
            q /= q.sum()
            for _ in range(3):
                q /= q.sum(dim=1, keepdim=True)
                q /= k
                q /= q.sum(dim=0, keepdim=True)
                q /= b
            sharp = (q * b).T
        sharp = torch.cat([sharp] * (len(anchors) // len(targets)))
    loss = torch.mean(torch.sum(torch.log(probs ** (-sharp)), dim=1))
    avg = probs.mean(dim=0)
    return loss - torch.sum(torch.log(avg ** (-avg))) + math.log(len(avg))


@pytest.mark.parametrize("iterations", [3, 0])
@pytest.mark.parametrize("anchor_views", [1, 4])
def test_the_loss_is_lightlys_msn_loss_and_the_official_one(iterations: int, anchor_views: int) -> None:
    from lightly.loss import MSNLoss

    torch.manual_seed(0)
    targets, prototypes = torch.randn(8, 16), torch.randn(32, 16)
    anchors = torch.randn(8 * anchor_views, 16, requires_grad=True)
    ours, _, _ = msn_loss(anchors, targets, prototypes, 0.1, 0.25, iterations, 1.0)
    theirs = MSNLoss(temperature=0.1, sinkhorn_iterations=iterations)(anchors, targets, prototypes, 0.25)
    official = official_msn_loss(anchors, targets, prototypes, use_sinkhorn=bool(iterations))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, anchors)
    (g_official,) = torch.autograd.grad(official, anchors)
    torch.testing.assert_close(g_ours, g_official, rtol=1e-4, atol=1e-7)


def test_me_max_is_zero_for_uniform_use_and_log_k_for_one_prototype() -> None:
    """The mean-entropy term: 0 when the anchors use every prototype equally on average, log K when all
    pick the same one (the collapse it prevents)."""
    prototypes = torch.eye(4)
    spread = torch.eye(4).repeat(2, 1) * 50  # every prototype chosen by two anchors, sharply
    _, spread_me_max, used = msn_loss(spread, spread[:4], prototypes, 0.1, 0.25, 0, 1.0)
    one = torch.tensor([[50.0, 0, 0, 0]]).repeat(8, 1)
    _, one_me_max, one_used = msn_loss(one, one[:4], prototypes, 0.1, 0.25, 0, 1.0)
    assert (
        spread_me_max.abs() < 1e-4 and abs(one_me_max - math.log(4)) < 0.01
    )  # softmax at T=0.1: not quite one-hot
    assert used == 4 and one_used == 1


def small_msn(**kwargs) -> MSN:
    cfg = compose_cfg(["backbone=timm", *VIT, "method=msn"])
    torch.manual_seed(0)
    return MSN(instantiate(cfg.backbone), num_prototypes=32, proj_hidden_dim=32, proj_output_dim=16, **kwargs)


def test_the_step_masks_only_the_anchor_view() -> None:
    """The anchor view keeps int(N x 0.85) patches of the lowest noise (deit.py's T_H), the focal views
    and the target view are whole, the target through the momentum copy of the backbone and projector."""
    model = small_msn(num_local_crops=2, local_crop_size=16)
    model.backbone.dynamic_img_size = model.teacher.backbone.dynamic_img_size = True
    torch.manual_seed(1)
    views = model.views(
        Draw(lambda size=32, **c: torch.randn(4, 3, size, size), lambda *s: torch.rand(4, *s))
    )
    target, anchor, *focal, noise = views
    assert [tuple(v.shape) for v in focal] == [(4, 3, 16, 16)] * 2 and noise.shape == (4, 16)
    out = model.training_step(views)
    keep, _, _ = random_masking(noise, int(16 * 0.85))
    assert keep.shape == (4, 13)
    anchors = [model.projector(vit_tokens(model.backbone, anchor, keep=keep).pooled)]
    anchors += [model.projector(model.backbone(torch.cat(focal))).view(2, 4, -1).flatten(0, 1)]
    with torch.no_grad():
        t = model.teacher.projector(model.teacher.backbone(target))
    expected = official_msn_loss(torch.cat(anchors), t, model.prototypes)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-6)


def test_the_prototypes_have_no_weight_decay_and_the_target_network_no_gradient() -> None:
    model = small_msn()
    groups = model.param_groups()
    assert [name for name, _ in groups[1]["params"]] == ["prototypes"] and groups[1]["no_decay"]
    names = {n for g in groups for n, _ in g["params"]}
    assert "prototypes" not in {n for n, _ in groups[0]["params"]} and not any(
        n.startswith("teacher.") for n in names
    )


def test_the_momentum_is_linear_from_its_base_to_its_end() -> None:
    model = small_msn()
    for step, expected in [(0, 0.996), (50, 0.996 + 0.5 * 0.0032), (100, 0.9992)]:
        model.after_step(step, 101)
        assert abs(model.teacher.momentum.item() - expected) < 1e-6


def test_bad_settings_are_refused() -> None:
    with pytest.raises(UserError, match="mask_ratio"):
        small_msn(mask_ratio=0.99)
    with pytest.raises(UserError, match="batch_size=1"):
        small_msn().check_batch(1)


def test_the_projector_is_the_official_fc_and_lightlys_head() -> None:
    """deit.py's fc with use_bn: Linear-BN-GELU twice, then a Linear, every Linear with a bias (zero at
    init). lightly's MSNProjectionHead leaves the bias out of the Linears before BN, which cancels a
    bias in training mode: with the same weights, the same outputs, whatever those biases are."""
    from lightly.models.modules.heads import MSNProjectionHead

    from ssl_lab.methods.msn import msn_projector

    ours = msn_projector(16, 32, 8)
    assert [type(m).__name__ for m in ours] == ["Linear", "BatchNorm1d", "GELU"] * 2 + ["Linear"]
    assert all(m.bias is not None and not m.bias.any() for m in ours if isinstance(m, torch.nn.Linear))
    theirs = MSNProjectionHead(input_dim=16, hidden_dim=32, output_dim=8)
    theirs.layers.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if k not in ("0.bias", "3.bias")}
    )
    with torch.no_grad():
        ours[0].bias.add_(1.0)
        ours[3].bias.add_(-0.5)
    x = torch.randn(12, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
