"""iBOT against lightly's IBOTPatchLoss and the official iBOTLoss (bytedance/ibot main_ibot.py, written
out below from its text), its head against iBOTHead's definition, and its masks against the settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VIT, compose_cfg
from hydra.utils import instantiate

from ssl_lab.errors import UserError
from ssl_lab.methods.base import Draw
from ssl_lab.methods.ibot import IBOT, ibot_loss, ibot_patch_loss


def official_ibot_loss(
    student_cls, student_patch, teacher_cls, teacher_patch, masks, centers, temps, ngcrops=2
):
    """main_ibot.py's iBOTLoss.forward (the loss value; its centre update is tested apart)."""
    ncrops = len(student_cls)
    student_cls = torch.cat(student_cls) / 0.1
    student_cls_c = student_cls.chunk(ncrops)
    student_patch_c = (student_patch / 0.1).chunk(ngcrops)
    teacher_cls_c = F.softmax((teacher_cls - centers[0]) / temps[0], dim=-1).chunk(ngcrops)
    teacher_patch_c = F.softmax((teacher_patch - centers[1]) / temps[1], dim=-1).chunk(ngcrops)
    total1 = total2 = n1 = n2 = 0
    for q in range(len(teacher_cls_c)):
        for v in range(len(student_cls_c)):
            if v == q:
                loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], dim=-1), dim=-1)
                mask = masks.chunk(ngcrops)[v]
                loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                total2, n2 = total2 + loss2.mean(), n2 + 1
            else:
                loss1 = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls_c[v], dim=-1), dim=-1)
                total1, n1 = total1 + loss1.mean(), n1 + 1
    return total1 / n1, total2 / n2


@pytest.mark.parametrize("local", [0, 3])
def test_the_loss_is_the_official_ibot_loss(local: int) -> None:
    torch.manual_seed(0)
    b, n, k, k2 = 6, 9, 32, 24
    teacher_cls, teacher_patch = torch.randn(2 * b, k), torch.randn(2 * b, n, k2)
    student_cls = [torch.randn(b, k) for _ in range(2 + local)]
    student_patch = torch.randn(2 * b, n, k2)
    masks = torch.rand(2 * b, n) < 0.4
    masks[0] = False  # an unmasked image counts 0 in its view's mean
    centers, temps = (0.1 * torch.randn(1, k), 0.1 * torch.randn(1, 1, k2)), (0.04, 0.06)
    cls, patch, _ = ibot_loss(
        teacher_cls, student_cls, teacher_patch, student_patch, masks, centers, temps, 0.1
    )
    expected = official_ibot_loss(
        student_cls, student_patch, teacher_cls, teacher_patch, masks, centers, temps
    )
    torch.testing.assert_close(cls, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patch, expected[1], rtol=1e-5, atol=1e-6)


def test_the_patch_loss_equals_lightlys() -> None:
    """lightly's IBOTPatchLoss (DINOv2's ibot_patch_loss) on the masked tokens of one view, centre 0."""
    from lightly.loss import IBOTPatchLoss

    torch.manual_seed(0)
    b, h, w, k = 4, 3, 3, 16
    teacher, student = torch.randn(b, h * w, k), torch.randn(b, h * w, k)
    mask = torch.rand(b, h * w) < 0.5
    mask[1] = False
    theirs = IBOTPatchLoss(output_dim=k, teacher_temp=0.05, student_temp=0.1)
    expected = theirs(teacher[mask], student[mask], mask.view(b, h, w))
    ours = ibot_patch_loss(teacher, student, mask, torch.zeros(1, 1, k), 0.05, 0.1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def small_ibot(**kwargs) -> IBOT:
    cfg = compose_cfg(["backbone=timm", *VIT])
    torch.manual_seed(0)
    settings = dict(num_prototypes=64, patch_prototypes=64, proj_hidden_dim=32, bottleneck_dim=16) | kwargs
    return IBOT(instantiate(cfg.backbone), **settings)


def views_of(model: IBOT, batch: int = 4) -> list[torch.Tensor]:
    return model.views(Draw(lambda **c: torch.randn(batch, 3, 32, 32), lambda *s: torch.rand(batch, *s)))


def test_the_patch_head_is_shared_or_its_own() -> None:
    """iBOTHead: the patches through the [CLS] prototypes when shared (last_layer2 = last_layer),
    through their own otherwise; the MLP and its L2 normalisation are the same for both."""
    model = small_ibot(shared_head=False, shared_head_teacher=False, patch_prototypes=48)
    cls, patches = torch.randn(2, model.num_features), torch.randn(2, 5, model.num_features)
    head = model.head
    out_cls, out_patch = head(cls, patches, shared=False)
    z = F.normalize(head.mlp(patches), dim=-1)
    torch.testing.assert_close(out_patch, head.patch_layer(z), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_cls, head(cls), rtol=1e-5, atol=1e-6)
    _, shared = head(cls, patches, shared=True)
    torch.testing.assert_close(shared, head.last_layer(z), rtol=1e-5, atol=1e-6)
    assert out_patch.shape == (2, 5, 48) and shared.shape == (2, 5, 64)


def test_masks_cover_the_global_views_only_at_the_settings_ratios() -> None:
    model = small_ibot()
    views = views_of(model, batch=512)
    mask = model.masks(views[-1][:, 0])
    fractions = mask.float().mean(1)
    assert (fractions <= 0.5).all() and 0.3 < (fractions > 0).float().mean() < 0.7


def test_the_step_learns_from_masked_patches_and_centres_both_outputs() -> None:
    model = small_ibot()
    views = views_of(model)
    out = model.training_step(views)
    out["loss"].backward()
    assert model.mask_token.grad is not None  # the masked patches reach the loss
    assert model.center.abs().sum() > 0 and model.patch_center.abs().sum() > 0
    assert set(out) >= {"loss", "cls_loss", "patch_loss", "teacher_entropy", "masked"}


def test_settings_that_cannot_work_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="method.patch_prototypes=method.num_prototypes"):
        small_ibot(shared_head=False, shared_head_teacher=True, patch_prototypes=32)
    cfg = compose_cfg(["backbone=timm", "backbone.name=test_resnet"])
    with pytest.raises(UserError, match="method=ibot needs a ViT backbone"):
        IBOT(instantiate(cfg.backbone))
