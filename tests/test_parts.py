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


# ---------------------------------------------------------------------------- a ViT's tokens


def small_vit(**kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8, **kwargs
    ).eval()


def test_masked_tokens_equal_lightlys_masked_vision_transformer() -> None:
    """`mask` puts the mask token in the masked patches' places before the position embedding:
    lightly's MaskedVisionTransformerTIMM.encode(images, mask=...) on the same ViT and token."""
    from lightly.models.modules import MaskedVisionTransformerTIMM

    from ssl_lab.methods.parts import vit_tokens

    vit, images = small_vit(), torch.randn(3, 3, 32, 32)
    mask_token = torch.nn.Parameter(torch.randn(1, 1, vit.embed_dim))
    lightly_vit = MaskedVisionTransformerTIMM(
        vit, mask_token, weight_initialization="skip", pos_embed_initialization="skip"
    )
    mask = torch.rand(3, 16) < 0.4
    ours = vit_tokens(vit, images, mask=mask, mask_token=mask_token.view(1, -1))
    lightly_mask = torch.cat([torch.zeros(3, 1, dtype=torch.bool), mask], dim=1)  # its [CLS] included
    torch.testing.assert_close(
        ours.sequence, lightly_vit.encode(images, mask=lightly_mask), rtol=1e-5, atol=1e-5
    )
    # dropped patches: lightly's idx_keep counts the class token as index 0
    keep = torch.argsort(torch.rand(3, 16), dim=1)[:, :5]
    lightly_keep = torch.cat([torch.zeros(3, 1, dtype=torch.long), keep + 1], dim=1)
    kept = vit_tokens(vit, images, keep=keep)
    torch.testing.assert_close(
        kept.sequence, lightly_vit.encode(images, idx_keep=lightly_keep), rtol=1e-5, atol=1e-5
    )
    assert kept.patches.shape == (3, 5, vit.embed_dim)


def test_tokens_are_named_and_pooled_as_the_backbone_pools() -> None:
    from ssl_lab.methods.parts import vit_tokens

    images = torch.randn(2, 3, 32, 32)
    for kwargs in (
        {},
        {"reg_tokens": 4},
        {"reg_tokens": 2, "global_pool": "avg"},
        {"class_token": False, "global_pool": "avg"},
    ):
        vit = small_vit(**kwargs)
        tokens = vit_tokens(vit, images)
        torch.testing.assert_close(tokens.pooled, vit(images), rtol=1e-5, atol=1e-6)
        assert tokens.registers.shape[1] == kwargs.get("reg_tokens", 0) and tokens.patches.shape[1] == 16
        assert (tokens.cls is None) == (kwargs.get("class_token") is False)
        if tokens.cls is not None:
            torch.testing.assert_close(tokens.cls, tokens.sequence[:, 0])


def test_a_teacher_built_without_stochastic_depth_leaves_the_students() -> None:
    """DINO's, iBOT's and DINOv2's teachers: drop_path=False zeroes every copy's DropPath, not the student's."""
    student = small_vit(drop_path_rate=0.2)
    rates = lambda m: {x.drop_prob for x in m.modules() if hasattr(x, "drop_prob")}  # noqa: E731
    teacher = MomentumTeacher({"backbone": student}, 0.99, drop_path=False)
    assert rates(teacher) == {0.0} and max(rates(student)) == pytest.approx(0.2)
    assert max(rates(MomentumTeacher({"backbone": student}, 0.99))) == pytest.approx(0.2)
