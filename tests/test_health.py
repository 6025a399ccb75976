"""ssl_lab.health: the collapse signals against lightly's and hand-computed values, and what the runner's
step adds around them (the gradient norm, non-finite gradients), without a host sync."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import FAST, compose_cfg, method_args
from hydra.utils import instantiate
from lightly.utils.debug import std_of_l2_normalized
from test_methods import NoTensorsFromPythonData

from ssl_lab.build import build_model, build_step, grad_norm
from ssl_lab.health import effective_rank, feature_std, health

CPU = torch.device("cpu")


def test_feature_std_equals_lightlys() -> None:
    z = torch.randn(64, 32) * torch.linspace(0.1, 3, 32) + 0.5
    torch.testing.assert_close(feature_std(z), std_of_l2_normalized(z), rtol=1e-6, atol=1e-7)


def test_feature_std_is_zero_on_a_collapse_and_about_one_over_root_dim_when_spread() -> None:
    assert feature_std(torch.randn(1, 128).expand(256, 128)).abs() < 1e-6
    assert feature_std(torch.randn(4096, 128)) == pytest.approx(1 / math.sqrt(128), rel=0.02)


def test_effective_rank_by_hand() -> None:
    """RankMe's eq. 1 on singular values known by construction: r equal ones give r; one gives 1."""
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    for r in (1, 5, 32):
        z = (q[:, :r] * 3.0) @ q[:r, :]  # singular values: r threes
        assert effective_rank(z).item() == pytest.approx(r, rel=1e-3)  # eps: 1e-4 from 63 zero values
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0])
    z = torch.diag(sigma)
    p = sigma / sigma.sum() + 1e-7
    assert effective_rank(z).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    assert effective_rank(torch.randn(1, 16).expand(100, 16)).item() == pytest.approx(1.0, abs=1e-3)


def test_health_runs_the_encoder_in_eval_mode_and_restores_every_modules_mode() -> None:
    """No batch statistics updated, no dropout drawn (the global stream untouched), modes as they were
    (a submodule left in eval by its method stays so)."""
    encoder = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.ReLU())
    encoder.train()
    encoder[2].eval()
    stats, x = encoder[1].running_mean.clone(), torch.randn(32, 8)
    state = torch.get_rng_state()
    signals = health(encoder, x, None)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(encoder[1].running_mean, stats)
    assert [m.training for m in encoder] == [True, True, False, True]
    assert set(signals) == {"feature_std", "feature_rank"} and all(v.dim() == 0 for v in signals.values())


def test_grad_norm_is_the_norm_of_all_gradients_together() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.tensor([1.0, 2.0, 2.0]), torch.full((2, 2), 2.0)
    assert grad_norm(optimizer).item() == pytest.approx(5.0)
    b.grad[0, 0] = math.inf
    assert not torch.isfinite(grad_norm(optimizer))


def small_step(precision: str = "32"):
    # SGD: Adam reads its step count (a CPU tensor, even on GPUs) with .item(), which the spy would take for a sync
    cfg = compose_cfg([*FAST, *method_args("simclr"), "optimizer=sgd", f"trainer.precision={precision}"])
    torch.manual_seed(0)
    model = build_model(cfg, CPU)
    step = build_step(cfg, model, instantiate(cfg.augment), 4, num_classes=10)
    images = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8)
    return step, images, torch.randint(0, 10, (cfg.batch_size,))


def test_the_runners_step_and_its_health_never_sync_the_host(monkeypatch) -> None:
    """The step with its gradient norm and its non-finite check, and the log step's health figures:
    no .item(), bool(), nonzero() or .tolist(), and no tensor made from Python data (after the first
    step, in which the optimizer makes its state)."""
    step, images, labels = small_step()
    rng = torch.Generator().manual_seed(0)
    step.train_on(step.views(images, rng), 0, labels)  # the optimizer's state made (its first step)

    def host_sync(*args, **kwargs):
        raise AssertionError("a host sync in the step")

    for name in ("item", "__bool__", "nonzero", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    with NoTensorsFromPythonData():
        for i in (1, 2):
            views = step.views(images, rng)
            out = step.train_on(views, i, labels)
            broken = step.gradients_broken(out)
        signals = step.health(views[0])
    monkeypatch.undo()
    assert torch.isfinite(out["grad_norm"]) and out["grad_norm"] > 0 and not broken
    assert all(torch.isfinite(v) for v in signals.values())


def test_fp16_overflows_are_the_scalers_until_its_scale_falls_below_one() -> None:
    """In fp16 a skipped step (inf gradients) is normal: not broken, and its norm logged as 0; gradients
    non-finite however far the scaler scales down (its scale below 1) are."""
    step, images, labels = small_step("16")
    out = step.train_on(step.views(images, torch.Generator().manual_seed(0)), 0, labels)
    assert not step.gradients_broken(out)
    step.scaler._scale.fill_(0.5)
    assert step.gradients_broken(out)
    step.scaler._scale.fill_(2.0**16)
    poisoned = {**out, "grad_norm": torch.tensor(math.inf)}
    assert not step.gradients_broken(poisoned)  # the scaler's business in fp16


def test_in_bf16_and_fp32_any_nonfinite_gradient_is_broken() -> None:
    step, images, labels = small_step()
    out = step.train_on(step.views(images, torch.Generator().manual_seed(0)), 0, labels)
    assert not step.gradients_broken(out)
    assert step.gradients_broken({**out, "grad_norm": torch.tensor(math.nan)})
