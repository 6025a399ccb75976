"""DINOv2 against lightly's KoLeoLoss and the official losses (facebookresearch/dinov2: ssl_meta_arch.py,
loss/dino_clstoken_loss.py, loss/ibot_patch_loss.py, written out below from their text), its
layer-wise lr decay, and a duplicate image's effect on KoLeo (dinov2 #314)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VIT, compose_cfg
from hydra.utils import instantiate

from ssl_lab.errors import UserError
from ssl_lab.methods.base import Draw
from ssl_lab.methods.dinov2 import DINOv2, layer_id
from ssl_lab.methods.ibot import masked_patch_loss
from ssl_lab.methods.parts import cross_view_loss, koleo_loss, sinkhorn


def official_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """dino_clstoken_loss.py's sinkhorn_knopp_teacher on one process."""
    q = torch.exp(teacher_output.float() / teacher_temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def official_dino_loss(student_list, teacher_list, student_temp=0.1):
    """dino_clstoken_loss.py's DINOLoss.forward."""
    total = 0
    for s in student_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_list:
            total -= torch.sum(t * lsm, dim=-1).mean()
    return total


def test_koleo_equals_lightlys_and_reports_the_nearest_distance() -> None:
    from lightly.loss import KoLeoLoss

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    loss, nearest = koleo_loss(x)
    torch.testing.assert_close(loss, KoLeoLoss()(x), rtol=1e-5, atol=1e-6)
    z = F.normalize(x, dim=-1)
    distances = torch.cdist(z, z) + torch.eye(16) * 10
    torch.testing.assert_close(nearest, distances.min(), rtol=1e-4, atol=1e-6)


def test_a_duplicate_image_shows_as_a_zero_nearest_distance() -> None:
    """dinov2 #314: two equal rows sit at distance ~0; KoLeo's -log(d + eps) is then ~18 for them, its
    gradient ~1/eps. `koleo_min_distance` (logged) is what tells."""
    x = torch.randn(8, 16)
    x[3] = x[5]
    loss, nearest = koleo_loss(x.requires_grad_())
    assert nearest < 1e-6 and torch.isfinite(loss) and loss > 2


def test_sinkhorn_centring_is_dinov2s() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 32)
    torch.testing.assert_close(
        sinkhorn(logits, 0.05, 3), official_sinkhorn_knopp(logits, 0.05), rtol=1e-4, atol=1e-6
    )
    # the masked patches only (DINOv2 selects them): the others weigh 0 and change nothing
    weight = (torch.rand(12) < 0.5).float()
    weight[0] = 1
    chosen = weight.bool()
    torch.testing.assert_close(
        sinkhorn(logits, 0.05, 3, weight=weight)[chosen],
        official_sinkhorn_knopp(logits[chosen], 0.05),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("local", [0, 4])
def test_the_dino_term_is_dinov2s_global_and_local_terms(local: int) -> None:
    """ssl_meta_arch.py: the global term (each student global crop against the other view's teacher,
    the teacher's views stacked in reverse) x 2 and the local term, over 2 + max(2 x local, 1): the mean
    over the pairs times pairs / that (2/3 without local crops), as DINOv2.training_step scales it."""
    torch.manual_seed(0)
    b, k = 5, 16
    targets = F.softmax(torch.randn(2, b, k), dim=-1)
    student = [torch.randn(b, k) for _ in range(2 + local)]
    n_global_terms, n_local_terms = 2, max(local * 2, 1)
    scale = n_global_terms + n_local_terms
    swapped = torch.cat([targets[1], targets[0]])
    expected = official_dino_loss([torch.cat(student[:2])], [swapped]) * 2 / scale
    if local:
        expected = expected + official_dino_loss(student[2:], list(targets)) / scale
    pairs = 2 + 2 * local
    torch.testing.assert_close(
        cross_view_loss(targets, student, 0.1) * pairs / scale, expected, rtol=1e-5, atol=1e-6
    )


def test_the_patch_term_is_dinov2s_forward_masked() -> None:
    """ibot_patch_loss.py's forward_masked: each masked patch's cross entropy weighted by 1 / its image's
    masked count, summed, over the number of images (both views)."""
    torch.manual_seed(0)
    b, n, k = 6, 7, 16
    targets, student = F.softmax(torch.randn(b, n, k), dim=-1), torch.randn(b, n, k)
    mask = torch.rand(b, n) < 0.5
    mask[2] = False
    weights = (1 / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(mask)[mask]
    loss = torch.sum(targets[mask] * F.log_softmax(student[mask] / 0.1, dim=-1), dim=-1) * weights
    torch.testing.assert_close(
        masked_patch_loss(targets, student, mask, 0.1), -loss.sum() / b, rtol=1e-5, atol=1e-6
    )


def small_dinov2(**kwargs) -> DINOv2:
    cfg = compose_cfg(["backbone=timm", *VIT])
    torch.manual_seed(0)
    settings = dict(num_prototypes=64, patch_prototypes=48, proj_hidden_dim=32, bottleneck_dim=16) | kwargs
    return DINOv2(instantiate(cfg.backbone), **settings)


def test_layer_decay_scales_each_layers_lr() -> None:
    model = small_dinov2(layer_decay=0.5, patch_embed_lr_scale=0.2)
    depth = len(model.backbone.blocks)
    scales = {name: g["lr_scale"] for g in model.param_groups() for name, _ in g["params"]}
    assert scales["backbone.blocks.0.attn.qkv.weight"] == 0.5**depth
    assert scales[f"backbone.blocks.{depth - 1}.mlp.fc1.weight"] == 0.5
    assert scales["backbone.patch_embed.proj.weight"] == pytest.approx(0.2 * 0.5 ** (depth + 1))
    assert scales["backbone.cls_token"] == 0.5 ** (depth + 1) and scales["backbone.norm.weight"] == 1.0
    assert scales["head.last_layer.weight"] == 1.0 and scales["mask_token"] == 1.0
    assert layer_id("blocks.11.norm1.weight", 12) == 12 and layer_id("reg_token", 12) == 0


def test_the_step_masks_within_its_budget_and_logs_its_terms() -> None:
    model = small_dinov2()
    views = model.views(Draw(lambda **c: torch.randn(8, 3, 32, 32), lambda *s: torch.rand(8, *s)))
    out = model.training_step(views)
    out["loss"].backward()
    assert model.mask_token.grad is not None and model.patch_head.last_layer.weight.grad is not None
    assert {"dino_loss", "ibot_loss", "koleo_loss", "koleo_min_distance", "teacher_entropy"} <= set(out)
    total = (
        model.weights[0] * out["dino_loss"]
        + model.weights[1] * out["ibot_loss"]
        + model.weights[2] * out["koleo_loss"]
    )
    torch.testing.assert_close(out["loss"].detach(), total)


def test_settings_that_cannot_work_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="KoLeo needs at least 2 images"):
        small_dinov2().check_batch(1)
    small_dinov2(koleo_loss_weight=0.0).check_batch(1)
    cfg = compose_cfg(["backbone=timm", "backbone.name=test_resnet"])
    with pytest.raises(UserError, match="method=dinov2 needs a ViT backbone"):
        DINOv2(instantiate(cfg.backbone))
