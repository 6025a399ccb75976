"""ssl_lab.methods.masks: token masks from the run's noise, against DINOv2's generator (lightly's
random_block_mask_image), MAE's masking and hand-computed rectangles; per sample (so the same on 1 and
N processes) and traceable in one graph."""

from __future__ import annotations

import random

import pytest
import torch
from lightly.models.utils import random_block_mask_image

from ssl_lab.errors import UserError
from ssl_lab.methods.mae import random_masking
from ssl_lab.methods.masks import BLOCK_CANDIDATES, block_mask, random_mask, sample_ratios


def one_candidate(area: float, aspect: float, top: float, left: float) -> torch.Tensor:
    return torch.tensor([[[area, aspect, top, left]]])


def test_one_rectangle_by_hand() -> None:
    """Target 20 on 14 x 14: area 4 + 0.5 (20 - 4) = 12, aspect 1 (the log-uniform's middle), so 3 x 3
    (round(sqrt(12))), at row 0 and column floor(0.999 * 12) = 11."""
    mask = block_mask(one_candidate(0.5, 0.5, 0.0, 0.999), (14, 14), torch.tensor([20])).view(14, 14)
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[0:3, 11:14] = True
    assert torch.equal(mask, expected)


def test_a_rectangle_is_refused_when_it_masks_more_than_is_left_or_does_not_fit() -> None:
    too_big = block_mask(one_candidate(0.99, 0.5, 0.5, 0.5), (14, 14), torch.tensor([8]))
    assert too_big.sum() <= 8
    # a rectangle as tall as the grid (h == H) is refused, as DINOv2's `h < H`
    tall = block_mask(one_candidate(0.99, 0.999, 0.0, 0.0), (4, 4), torch.tensor([15]))
    assert tall.sum() == 0


def test_block_masks_reach_what_dinov2s_generator_reaches() -> None:
    """14 x 14 patches (224 px at 16), targets of DINOv2's range (0.1-0.5 of the patches): the mean
    masked count within 5 % of lightly's random_block_mask_image (DINOv2's MaskingGenerator) on the
    same targets, never above the target, and the same share of patches per row band (no bias)."""
    random.seed(0)
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(20, 98, (400,), generator=generator)
    ours = block_mask(torch.rand(400, BLOCK_CANDIDATES, 4, generator=generator), (14, 14), targets)
    theirs = torch.stack([random_block_mask_image((14, 14), int(t)).flatten() for t in targets])
    assert (ours.sum(1) <= targets).all()
    assert ours.sum(1).float().mean() == pytest.approx(theirs.sum(1).float().mean(), rel=0.05)
    bands = [slice(0, 5 * 14), slice(5 * 14, 9 * 14), slice(9 * 14, 196)]
    for band in bands:
        assert ours[:, band].float().mean() == pytest.approx(theirs[:, band].float().mean(), abs=0.03)


def test_no_target_masks_nothing_and_each_image_is_its_own() -> None:
    """Row by row: the masks of a batch's slice (one process's share) are the slice of the batch's."""
    noise = torch.rand(6, BLOCK_CANDIDATES, 4)
    targets = torch.tensor([0, 30, 60, 0, 45, 90])
    masks = block_mask(noise, (14, 14), targets)
    assert masks[0].sum() == 0 and masks[3].sum() == 0
    assert torch.equal(block_mask(noise[2:4], (14, 14), targets[2:4]), masks[2:4])


def test_random_mask_is_maes_mask_and_scales_to_model_patches() -> None:
    noise = torch.rand(5, 16)
    _, _, mae_mask = random_masking(noise, keep=4)
    assert torch.equal(random_mask(noise, 12), mae_mask.bool())
    coarse = random_mask(noise, 10, grid=(4, 4), scale=2)  # SimMIM: 2 x 2 model patches per mask patch
    assert coarse.shape == (5, 64) and (coarse.sum(1) == 40).all()
    model = coarse.view(5, 8, 8)
    assert torch.equal(
        model, random_mask(noise, 10).view(5, 4, 1, 4, 1).expand(5, 4, 2, 4, 2).reshape(5, 8, 8)
    )


def test_sample_ratios_mask_a_share_of_the_images_at_fractions_in_range() -> None:
    ratios = sample_ratios(torch.rand(4000, 2, generator=torch.Generator().manual_seed(0)), 0.5, (0.1, 0.5))
    masked = ratios > 0
    assert masked.float().mean() == pytest.approx(0.5, abs=0.03)
    assert ratios[masked].min() >= 0.1 and ratios[masked].max() < 0.5
    assert ratios[masked].mean() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(UserError, match=r"mask ratio range \[0.5, 0.2\]"):
        sample_ratios(torch.rand(2, 2), 0.5, (0.5, 0.2))


def test_block_masks_trace_in_one_graph() -> None:
    """fullgraph=True fails on any graph break (on a GPU, a host sync)."""
    noise, targets = torch.rand(4, 8, 4), torch.tensor([10, 20, 0, 40])
    compiled = torch.compile(lambda n, t: block_mask(n, (8, 8), t), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(noise, targets), block_mask(noise, (8, 8), targets))
