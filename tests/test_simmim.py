"""SimMIM against the official code's loss and decoder (microsoft/SimMIM models/simmim.py) and lightly's
SimMIM example (MaskedVisionTransformerTIMM, a linear decoder, L1 on the masked patches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import VIT, compose_cfg
from hydra.utils import instantiate

from ssl_lab.errors import UserError
from ssl_lab.methods.base import Draw
from ssl_lab.methods.simmim import SimMIM, simmim_loss


def unpatchify(patches: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    b = patches.shape[0]
    x = patches.reshape(b, h, w, p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, h * p, w * p)


def test_the_loss_is_the_official_pixel_loss() -> None:
    """models/simmim.py: the mask upsampled to pixels, L1 'none', summed over the masked pixels and
    divided by (their count + 1e-5) and the channels; the prediction as its image (PixelShuffle)."""
    torch.manual_seed(0)
    p, h, w = 4, 3, 5
    images, pred = torch.randn(2, 3, h * p, w * p), torch.randn(2, h * w, p * p * 3)
    mask = torch.rand(2, h * w) < 0.6
    pixels = mask.view(2, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3).float()
    l1 = F.l1_loss(images, unpatchify(pred, p, h, w), reduction="none")
    official = (l1 * pixels).sum() / (pixels.sum() + 1e-5) / 3
    torch.testing.assert_close(simmim_loss(pred, images, mask, p), official, rtol=1e-6, atol=1e-7)


def test_the_linear_decoder_is_the_official_conv_and_pixel_shuffle() -> None:
    """A 1x1 convolution to p*p*3 channels, then PixelShuffle(p), on the [B, D, H, W] token map: the
    same function as the linear layer per token in patchify's order, with the weights permuted."""
    d, p, h = 16, 4, 3
    linear = nn.Linear(d, p * p * 3)
    conv = nn.Conv2d(d, p * p * 3, 1)
    order = torch.arange(p * p * 3).view(p, p, 3).permute(2, 0, 1).flatten()  # (c, i, j) -> (i, j, c) rows
    with torch.no_grad():
        conv.weight.copy_(linear.weight[order].view(-1, d, 1, 1))
        conv.bias.copy_(linear.bias[order])
    tokens = torch.randn(2, h * h, d)
    official = F.pixel_shuffle(conv(tokens.transpose(1, 2).reshape(2, d, h, h)), p)
    torch.testing.assert_close(unpatchify(linear(tokens), p, h, h), official, rtol=1e-5, atol=1e-6)


def small_simmim(**kwargs) -> SimMIM:
    cfg = compose_cfg(["backbone=timm", *VIT, "method=simmim"])
    torch.manual_seed(0)
    return SimMIM(instantiate(cfg.backbone), **kwargs)


def test_the_step_equals_lightlys_simmim_example() -> None:
    """lightly's examples/pytorch/simmim.py on the same ViT, mask token, decoder and mask: encode with
    the masked patches replaced, the decoder on the masked tokens, nn.L1Loss against their patches."""
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerTIMM

    model = small_simmim()
    images, noise = model.views(Draw(lambda **c: torch.randn(4, 3, 32, 32), lambda *s: torch.rand(4, *s)))
    loss = model.training_step([images, noise])["loss"]
    from ssl_lab.methods.masks import random_mask

    mask = random_mask(noise, model.num_masked, model.mask_grid, model.scale)
    token = nn.Parameter(model.mask_token.detach().view(1, 1, -1))
    encoder = MaskedVisionTransformerTIMM(
        model.backbone, token, weight_initialization="skip", pos_embed_initialization="skip"
    )
    with_cls = torch.cat([torch.zeros(4, 1, dtype=torch.bool), mask], dim=1)
    tokens = encoder.encode(images, mask=with_cls)[:, 1:]
    target = utils.patchify(images, model.patch_size)
    expected = nn.L1Loss()(model.decoder(tokens[mask]), target[mask])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_only_masked_patches_are_learnt_from() -> None:
    model = small_simmim()
    images, noise = model.views(Draw(lambda **c: torch.randn(2, 3, 32, 32), lambda *s: torch.rand(2, *s)))
    outputs = {}
    model.decoder.register_forward_hook(lambda m, a, out: outputs.setdefault("pred", out))
    model.training_step([images, noise])["loss"].backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    pred = outputs["pred"]
    from ssl_lab.methods.masks import random_mask

    mask = random_mask(noise, model.num_masked, model.mask_grid, model.scale)
    grad = torch.autograd.grad(simmim_loss(pred, images, mask, model.patch_size), pred)[0]
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()


def test_settings_that_cannot_work_are_one_line_errors() -> None:
    with pytest.raises(UserError, match=r"method.mask_patch_size=12 must be a multiple of the ViT's 8 px"):
        small_simmim(mask_patch_size=12)
    with pytest.raises(UserError, match=r"method.mask_ratio=0.1 masks 1 of the 1 mask patches"):
        small_simmim(mask_patch_size=32, mask_ratio=0.1)
    cfg = compose_cfg(["backbone=timm", "backbone.name=test_resnet"])
    with pytest.raises(UserError, match="method=simmim needs a ViT backbone"):
        SimMIM(instantiate(cfg.backbone))
