"""I-JEPA against the official code's mask sampler (src/masks/multiblock.py, written out below) and
lightly's IJEPAPredictorTIMM, and the padded fixed-shape batch against each image encoded and predicted
alone, as the official code does with exact patch lists."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VIT, compose_cfg
from hydra.utils import instantiate

from ssl_lab.errors import UserError
from ssl_lab.methods.base import Draw
from ssl_lab.methods.ijepa import IJEPA, IJEPAPredictor, ijepa_loss
from ssl_lab.methods.mae import MAEDecoder
from ssl_lab.methods.masks import block_size, first_true, multiblock_masks, multiblock_noise
from ssl_lab.methods.parts import vit_tokens


def official_block_size(u: float, grid, scale, aspect) -> tuple[int, int]:
    """multiblock.py's _sample_block_size, with its one uniform `_rand`."""
    height, width = grid
    s = scale[0] + u * (scale[1] - scale[0])
    max_keep = int(height * width * s)
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    h, w = int(round(math.sqrt(max_keep * ar))), int(round(math.sqrt(max_keep / ar)))
    while h >= height:
        h -= 1
    while w >= width:
        w -= 1
    return h, w


def test_the_predictor_and_mae_decoder_start_as_their_papers_code() -> None:
    """I-JEPA's init_model: Linear weights normal with std 0.02; models_mae.py: Xavier-uniform, each
    within sqrt(6 / (fan_in + fan_out)) and spread as uniform (std bound / sqrt(3)). Biases 0, LayerNorms
    1 and 0. The two were told apart by a 0.02 std against Xavier's ~0.06-0.09 at these widths."""
    torch.manual_seed(0)
    for module, expected_std in [
        (IJEPAPredictor(192, (8, 8), dim=384, depth=2, heads=6), lambda w: 0.02),
        (MAEDecoder(192, (8, 8), 4, dim=256, depth=2, heads=8), lambda w: math.sqrt(2 / sum(w.shape))),
    ]:
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        norms = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert linears and norms
        for linear in linears:
            assert linear.weight.std().item() == pytest.approx(expected_std(linear.weight), rel=0.1)
            assert linear.bias is None or not linear.bias.any()
        for norm in norms:
            assert (norm.weight == 1).all() and not norm.bias.any()


@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (4, 4)])
def test_block_sizes_are_the_official_ones(grid) -> None:
    u = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    for scale, aspect in [((0.15, 0.2), (0.75, 1.5)), ((0.85, 1.0), (1.0, 1.0))]:
        h, w = block_size(u, grid, scale, aspect)
        expected = [official_block_size(x, grid, scale, aspect) for x in u.tolist()]
        ok = [(int(a), int(b)) == (max(c, 1), max(d, 1)) for a, b, (c, d) in zip(h, w, expected)]
        assert sum(ok) >= 1995  # float32 here, float64 there: a rounding boundary may fall apart


def test_the_masks_are_blocks_and_the_context_excludes_the_targets() -> None:
    noise = torch.rand(64, multiblock_noise(4), generator=torch.Generator().manual_seed(1))
    targets, context = multiblock_masks(noise, (14, 14))
    area = targets.sum(-1)
    assert (area == area[:, :1]).all()  # one size for an image's 4 targets
    assert ((area >= 25) & (area <= 42)).all()  # 0.15-0.2 of 196 patches, rounded to a rectangle
    for mask in targets.view(-1, 14, 14):
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask.sum() == len(rows) * len(cols)  # a filled rectangle
        assert (rows.diff() == 1).all() and (cols.diff() == 1).all()
    assert not (context & targets.any(1)).any()
    assert (context.sum(-1) > 10).all()


def test_a_context_with_too_few_patches_keeps_the_target_patches() -> None:
    """On a 4 x 4 grid the context block (at most 3 x 3) minus the targets has at most 9 <= min_keep
    patches: the official sampler would loop; here the context keeps its whole block."""
    targets, context = multiblock_masks(torch.rand(16, multiblock_noise(4)), (4, 4))
    assert (context.sum(-1) == 9).all()


def test_first_true_lists_the_patches_in_order_padded() -> None:
    mask = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    idx, valid = first_true(mask, 3)
    assert idx[0].tolist() == [1, 3, 4] and valid[0].all()
    assert idx[1, 0] == 0 and valid[1].tolist() == [True, False, False]


def small_ijepa(**kwargs) -> IJEPA:
    cfg = compose_cfg(["backbone=timm", *VIT, "backbone.image_size=64", "method=ijepa"])
    torch.manual_seed(0)
    return IJEPA(instantiate(cfg.backbone), **{"pred_dim": 32, "pred_depth": 2, **kwargs})


def test_the_predictor_is_lightlys() -> None:
    """IJEPAPredictorTIMM with the same weights, on equal-size blocks (no padding): the same predictions,
    lightly's mask-major order against this image-major one."""
    from lightly.models.modules import IJEPAPredictorTIMM

    torch.manual_seed(0)
    ours = IJEPAPredictor(16, (4, 4), dim=8, depth=2, heads=2)
    theirs = IJEPAPredictorTIMM(num_patches=16, depth=2, mlp_dim=16, predictor_embed_dim=8, num_heads=2)
    theirs.predictor_embed.load_state_dict(ours.embed.state_dict())
    theirs.predictor_proj.load_state_dict(ours.proj.state_dict())
    theirs.decoder.blocks.load_state_dict(ours.blocks.state_dict())
    theirs.decoder.norm.load_state_dict(ours.norm.state_dict())
    with torch.no_grad():
        theirs.decoder.mask_token.copy_(ours.mask_token)
    torch.testing.assert_close(theirs.decoder.pos_embed[0], ours.pos_embed)
    b, t = 3, 2
    context_idx = torch.stack([torch.randperm(16)[:6].sort().values for _ in range(b)])
    target_idx = torch.stack(
        [torch.stack([torch.randperm(16)[:4].sort().values for _ in range(t)]) for _ in range(b)]
    )
    context = torch.randn(b, 6, 16)
    pred = ours(
        context,
        context_idx,
        torch.ones(b, 6, dtype=torch.bool),
        target_idx,
        torch.ones(b, t, 4, dtype=torch.bool),
    )
    expected = theirs(context, [context_idx], [target_idx[:, j] for j in range(t)])  # [t * b, 4, 16]
    torch.testing.assert_close(pred.transpose(0, 1).reshape(t * b, 4, 16), expected, rtol=1e-5, atol=1e-6)


def test_the_padded_batch_gives_each_image_what_it_gives_alone() -> None:
    """The step on a batch whose images have different context and target sizes equals, image by image,
    the official computation on exact patch lists: the context encoder on its context patches only, the
    predictor on them and one target block at a time, smooth L1 against the layer-normalised targets."""
    model = small_ijepa()
    draw = Draw(
        lambda **c: torch.randn(4, 3, 64, 64),
        lambda *s: torch.rand(4, *s, generator=torch.Generator().manual_seed(2)),
    )
    images, noise = model.views(draw)
    targets, context = multiblock_masks(noise, model.grid)
    assert (
        len(set(context.sum(-1).tolist())) > 1 and len(set(targets[:, 0].sum(-1).tolist())) > 1
    )  # really padded
    loss = model.training_step([images, noise])["loss"]
    total, count = 0.0, 0
    for i in range(4):
        ctx = context[i].nonzero().flatten()[None]
        encoded = vit_tokens(model.backbone, images[i : i + 1], keep=ctx).patches
        h = vit_tokens(model.teacher.backbone, images[i : i + 1]).patches
        h = F.layer_norm(h, (h.shape[-1],))
        for j in range(model.num_targets):
            tgt = targets[i, j].nonzero().flatten()[None]
            ones = torch.ones_like(ctx, dtype=torch.bool), torch.ones_like(tgt, dtype=torch.bool)[None]
            pred = model.predictor(encoded, ctx, ones[0], tgt[None], ones[1])[0, 0]
            total = total + F.smooth_l1_loss(pred, h[0, tgt[0]], reduction="sum") / h.shape[-1]
            count += tgt.shape[1]
    torch.testing.assert_close(loss, total / count, rtol=1e-4, atol=1e-6)


def test_the_loss_counts_only_real_patches() -> None:
    pred, target = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    valid = torch.rand(2, 3, 5) < 0.6
    expected = F.smooth_l1_loss(pred[valid], target[valid])
    torch.testing.assert_close(ijepa_loss(pred, target, valid.float()), expected)


def test_the_evaluated_encoder_averages_the_target_encoders_patch_tokens() -> None:
    model = small_ijepa()
    x = torch.randn(2, 3, 64, 64)
    expected = vit_tokens(model.teacher.backbone, x).patches.mean(1)
    torch.testing.assert_close(model(x), expected)
    assert not model.backbone.pos_embed.requires_grad  # fixed sine-cosine


def test_bad_settings_are_refused() -> None:
    with pytest.raises(UserError, match="pred_dim=33"):
        small_ijepa(pred_dim=33)
    with pytest.raises(UserError, match="target_scale"):
        small_ijepa(target_scale=[0.3, 0.2])
    with pytest.raises(UserError, match="method.pool='max'"):
        small_ijepa(pool="max")
    cfg = compose_cfg(
        ["backbone=timm", *VIT, "++backbone.kwargs.class_token=false", "++backbone.kwargs.global_pool=avg"]
    )
    with pytest.raises(UserError, match="method.pool=token reads the \\[CLS\\] token"):
        IJEPA(instantiate(cfg.backbone), pred_dim=32, pred_depth=1, pool="token")
