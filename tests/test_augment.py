"""Batched augmentation: parameter distributions against the recipes, pixels against torchvision."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import compose_cfg
from hydra.utils import instantiate

from ssl_lab.data.augment import Augment, normalize

N = 100_000


def recipe(name: str) -> Augment:
    return instantiate(compose_cfg([f"augment={name}"]).augment)


@pytest.fixture(scope="module")
def cifar_params() -> dict[str, torch.Tensor]:
    return recipe("simclr_cifar").sample_params(N, 32, 32, torch.Generator().manual_seed(0))


def test_crop_distribution(cifar_params) -> None:
    top, left, h, w = cifar_params["crop"].unbind(1)
    area = h * w / 32**2
    assert area.min() >= 0.08 - 0.03 and area.max() <= 1.0  # rounding of w, h moves the area a little
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    # Reference: torchvision's own RandomResizedCrop.get_params on the same image size.
    torch.manual_seed(0)
    ref = torch.tensor([TF_params() for _ in range(20_000)], dtype=torch.float)
    ref_area = ref[:, 2] * ref[:, 3] / 32**2
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert area.quantile(q).item() == pytest.approx(ref_area.quantile(q).item(), abs=0.03), q
    ref_ratio = (ref[:, 3] / ref[:, 2]).log()
    ratio = (w / h).log()
    position = (left + 0.5) / (32 - w + 1)  # uniform over the allowed offsets
    ref_position = (ref[:, 1] + 0.5) / (32 - ref[:, 3] + 1)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert ratio.quantile(q).item() == pytest.approx(ref_ratio.quantile(q).item(), abs=0.05), q
        assert position.quantile(q).item() == pytest.approx(ref_position.quantile(q).item(), abs=0.03), q
    assert position.mean().item() == pytest.approx(0.5, abs=0.01)


def TF_params() -> tuple[int, int, int, int]:
    from torchvision.transforms import RandomResizedCrop

    return RandomResizedCrop.get_params(torch.empty(3, 32, 32), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))


def test_flip_jitter_gray_blur_rates_and_ranges(cifar_params) -> None:
    p = cifar_params
    assert p["flip"].float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert p["jitter"].float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert p["gray"].float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert not p["blur"].any()  # simclr_cifar: no blur
    brightness, contrast, saturation, hue = p["factors"].unbind(1)
    for factor, s in ((brightness, 0.4), (contrast, 0.4), (saturation, 0.4), (hue, 0.1)):
        center = 0.0 if factor is hue else 1.0
        assert factor.min() >= center - s and factor.max() <= center + s
        assert factor.mean().item() == pytest.approx(center, abs=0.01)
        assert factor.std().item() == pytest.approx(2 * s / math.sqrt(12), rel=0.03)  # uniform
    assert p["order"].unique().numel() == 24  # every order of the four jitter ops occurs


def assert_uniform(values: torch.Tensor, low: float, high: float) -> None:
    assert values.min() >= low and values.max() <= high
    assert values.mean().item() == pytest.approx((low + high) / 2, abs=0.01)
    assert values.std().item() == pytest.approx((high - low) / math.sqrt(12), rel=0.03)


def test_blur_recipe() -> None:
    """simclr_imagenet is the SimCLR paper's ImageNet recipe: colour strength s=1.0 and blur p 0.5."""
    aug = recipe("simclr_imagenet")
    p = aug.sample_params(N, 32, 32, torch.Generator().manual_seed(1))
    assert p["blur"].float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert_uniform(p["sigma"], 0.1, 2.0)
    for factor, (low, high) in zip(p["factors"].unbind(1), [(0.2, 1.8)] * 3 + [(-0.2, 0.2)]):
        assert_uniform(factor, low, high)
    assert p["jitter"].float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert p["gray"].float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert "solarize" not in p  # drawn only by recipes that solarize: the others keep their stream
    assert aug.blur_kernel == 3
    assert Augment(size=224, blur_p=0.5).blur_kernel == 23  # SimCLR: 10 % of 224, made odd
    assert Augment(size=96, blur_p=0.5).blur_kernel == 9


def one(params: dict[str, torch.Tensor], **override) -> dict[str, torch.Tensor]:
    """A single-sample parameter set with every op switched off unless overridden."""
    base = {
        "crop": torch.tensor([[0.0, 0.0, 32.0, 32.0]]),
        "flip": torch.tensor([False]),
        "jitter": torch.tensor([False]),
        "factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        "order": torch.tensor([0]),
        "gray": torch.tensor([False]),
        "blur": torch.tensor([False]),
        "sigma": torch.tensor([1.0]),
    }
    return {**base, **override}


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)


def unnormalized(aug: Augment, image: torch.Tensor, params) -> torch.Tensor:
    out = aug.apply(image, params)
    mean, std = torch.tensor(aug.mean).view(1, 3, 1, 1), torch.tensor(aug.std).view(1, 3, 1, 1)
    return out * std + mean


@pytest.mark.parametrize("box", [(0, 0, 32, 32), (3, 5, 12, 20), (10, 0, 22, 9), (0, 20, 4, 4)])
@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_and_flip_equal_torchvision(image, box, flip) -> None:
    aug = Augment(size=32)
    ours = unnormalized(
        aug, image, one({}, crop=torch.tensor([box], dtype=torch.float), flip=torch.tensor([flip]))
    )
    ref = TF.resized_crop(image.float() / 255, *box, size=[32, 32], antialias=False)
    if flip:
        ref = TF.horizontal_flip(ref)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "op,factor", [(0, 1.3), (0, 0.6), (1, 1.4), (1, 0.7), (2, 1.35), (2, 0.6), (3, 0.08), (3, -0.1)]
)
def test_each_jitter_op_equals_torchvision(image, op, factor) -> None:
    aug = Augment(size=32)
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    factors[0, op] = factor
    ours = unnormalized(aug, image, one({}, jitter=torch.tensor([True]), factors=factors))
    x = image.float() / 255
    ref = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][op](x, factor)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_jitter_order_grayscale_and_blur_equal_torchvision(image) -> None:
    from ssl_lab.data.augment import ORDERS

    aug = Augment(size=32, blur_p=0.5)  # a recipe with blur: apply() blurs only for those
    order = 17
    factors = torch.tensor([[1.2, 0.8, 1.3, 0.05]])
    params = one(
        {},
        jitter=torch.tensor([True]),
        factors=factors,
        order=torch.tensor([order]),
        blur=torch.tensor([True]),
    )
    params["sigma"] = torch.tensor([1.3])
    ours = unnormalized(aug, image, params)
    ref = image.float() / 255
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for op in ORDERS[order].tolist():
        ref = fns[op](ref, factors[0, op].item())
    ref = TF.gaussian_blur(ref, kernel_size=[3, 3], sigma=[1.3, 1.3])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)

    gray = unnormalized(aug, image, one({}, gray=torch.tensor([True])))
    torch.testing.assert_close(
        gray, TF.rgb_to_grayscale(image.float() / 255, num_output_channels=3), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_equals_torchvision(image, threshold) -> None:
    aug = Augment(size=32, solarize_p=0.2, solarize_threshold=threshold)
    on = unnormalized(aug, image, one({}, solarize=torch.tensor([True])))
    torch.testing.assert_close(on, TF.solarize(image.float() / 255, threshold), atol=1e-6, rtol=0)
    off = unnormalized(aug, image, one({}, solarize=torch.tensor([False])))
    torch.testing.assert_close(off, image.float() / 255, atol=1e-6, rtol=0)


def test_asymmetric_views_draw_their_own_parameters() -> None:
    """nnclr_cifar (solo-learn's asymmetric CIFAR recipe): both views share crop, flip, jitter
    0.4/0.4/0.2/0.1 and grey; the first never solarizes, the second does with p 0.2; a third view
    (past the list) takes the shared settings."""
    aug = recipe("nnclr_cifar")
    first, second = aug.for_view(0), aug.for_view(1)
    assert aug.for_view(2) is aug and len(aug.views) == 2
    g = torch.Generator().manual_seed(0)
    p0, p1 = first.sample_params(N, 32, 32, g), second.sample_params(N, 32, 32, g)
    assert "solarize" not in p0  # p 0: solarization never drawn, never applied
    assert p1["solarize"].float().mean().item() == pytest.approx(0.2, abs=0.01)
    for p in (p0, p1):
        for factor, (low, high) in zip(
            p["factors"].unbind(1), [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]
        ):
            assert_uniform(factor, low, high)
        assert p["jitter"].float().mean().item() == pytest.approx(0.8, abs=0.01)
        assert p["gray"].float().mean().item() == pytest.approx(0.2, abs=0.01)
        assert p["flip"].float().mean().item() == pytest.approx(0.5, abs=0.01)
        assert not p["blur"].any()
    assert second.solarize_threshold == 0.5 and first.size == second.size == 32


def test_the_training_step_draws_each_view_with_its_own_settings() -> None:
    """TrainStep.views hands the i-th draw the i-th view's augmentation: with view 1 always solarizing
    and view 0 never, view 1 equals view 0's pixels solarized when both get the same stream."""
    from conftest import compose_cfg as compose

    from ssl_lab.build import build_model, build_step

    cfg = compose(["augment=nnclr_cifar", "augment.views=[{solarize_p: 0.0},{solarize_p: 1.0}]",
                   "augment.jitter_p=0", "augment.gray_p=0", "trainer.channels_last=false"])  # fmt: skip
    model = build_model(cfg, torch.device("cpu"))
    step = build_step(cfg, model, instantiate(cfg.augment), steps_per_epoch=1)
    images = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8)
    views = step.views(images, torch.Generator().manual_seed(0))
    assert len(views) == 2
    # the same draws for view 0 again (no solarize draw in view 0; view 1 draws it last)
    g = torch.Generator().manual_seed(0)
    plain = step.augment.for_view(0)
    again0 = plain.apply(images, plain.sample_params(cfg.batch_size, 32, 32, g))
    torch.testing.assert_close(views[0], again0)
    solar = step.augment.for_view(1)
    params = solar.sample_params(cfg.batch_size, 32, 32, g)
    assert params["solarize"].all()
    torch.testing.assert_close(views[1], solar.apply(images, params))


@pytest.mark.parametrize(
    "views,message",
    [
        ("[{solarise_p: 0.2}]", "augment.views[0]: Augment has no setting 'solarise_p'"),
        ("[{},{solarize_p: 2}]", "augment.views[1].solarize_p=2"),
    ],
)
def test_a_bad_view_setting_is_one_line(views, message) -> None:
    from ssl_lab.errors import user_message

    with pytest.raises(Exception) as raised:  # Hydra wraps it; the runner prints the line inside
        instantiate(compose_cfg([f"augment.views={views}"]).augment)
    assert user_message(raised.value).startswith(message)


def test_samples_get_their_own_parameters_and_seed_reproduces() -> None:
    aug = Augment(size=32)
    batch = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(64, -1, -1, -1)
    out = aug(batch, generator=torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten()[:50].tolist()) for o in out}
    assert len(distinct) == 64  # the same image comes out differently in every slot
    again = aug(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, aug(batch, generator=torch.Generator().manual_seed(1)))


def test_params_slice_per_sample() -> None:
    """Every parameter has the batch first, so a process can take its slice of a global batch."""
    params = Augment(size=32, blur_p=0.5).sample_params(8, 32, 32, torch.Generator().manual_seed(0))
    assert all(v.shape[0] == 8 for v in params.values())


def test_normalize_resizes_and_standardises() -> None:
    x = torch.full((2, 3, 64, 64), 255, dtype=torch.uint8)
    out = normalize(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=32)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))


def test_a_mixed_batch_equals_torchvision_sample_by_sample() -> None:
    """All 24 jitter orders, jitter/grayscale/blur on and off, in one batch: each sample gets exactly
    its own ops, as torchvision applies them to that image alone."""
    from ssl_lab.data.augment import ORDERS

    torch.manual_seed(1)
    n = 48
    aug = Augment(size=32, blur_p=0.5, solarize_p=0.2)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    params = aug.sample_params(n, 32, 32, torch.Generator().manual_seed(3))
    params["order"] = torch.arange(n) % 24
    params["jitter"] = torch.arange(n) % 5 != 0
    params["gray"] = torch.arange(n) % 7 == 0
    params["blur"] = torch.arange(n) % 3 == 0
    params["solarize"] = torch.arange(n) % 4 == 1
    out = unnormalized(aug, images, params)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        top, left, h, w = params["crop"][i].long().tolist()
        ref = TF.resized_crop(images[i : i + 1].float() / 255, top, left, h, w, [32, 32], antialias=False)
        if params["flip"][i]:
            ref = ref.flip(-1)
        if params["jitter"][i]:
            for op in ORDERS[params["order"][i]].tolist():
                ref = fns[op](ref, params["factors"][i, op].item())
        if params["gray"][i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if params["blur"][i]:
            sigma = params["sigma"][i].item()
            ref = TF.gaussian_blur(ref, kernel_size=[aug.blur_kernel] * 2, sigma=[sigma, sigma])
        if params["solarize"][i]:
            ref = TF.solarize(ref, 0.5)
        torch.testing.assert_close(out[i : i + 1], ref, atol=5e-5, rtol=0, msg=f"sample {i}")


@pytest.mark.slow
def test_augmentation_compiles_without_a_graph_break() -> None:
    """sample_params + apply as one graph (fullgraph=True fails on any break: on a GPU, a host sync)."""
    aug = Augment(size=32, blur_p=0.5, solarize_p=0.2)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)

    def view(images: torch.Tensor) -> torch.Tensor:  # dynamo cannot take a Generator argument (the
        # same draws then come from the default one): what matters is that no op breaks the graph
        return aug.apply(images, aug.sample_params(16, 32, 32, None, device=images.device))

    compiled = torch.compile(view, fullgraph=True)
    out = compiled(images)
    assert out.shape == (16, 3, 32, 32) and torch.isfinite(out).all()
