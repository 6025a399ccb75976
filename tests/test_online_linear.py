"""The online linear probe (ssl_lab/eval/online_linear.py): it reads the method's own forward, never
changes the method's training, ignores hidden labels, and trains the same on 1 and 2 processes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FAST, compose_cfg, method_args
from hydra.utils import instantiate
from test_methods import NoTensorsFromPythonData
from test_swav import FakeGroup

from ssl_lab import distributed
from ssl_lab.build import build_model, build_step, probe_classes
from ssl_lab.data.datasets import hold_out
from ssl_lab.data.synthetic import make_synthetic
from ssl_lab.eval.online_linear import OnlineLinear

CPU = torch.device("cpu")


def constant_schedule(optimizer: torch.optim.Optimizer):
    from timm.scheduler import StepLRScheduler

    return StepLRScheduler(optimizer, decay_t=10**9, t_in_epochs=False)


def steps_of(method: str, probe: bool, steps: int = 2) -> tuple[dict, object]:
    """`steps` training steps of `method` (FAST's tiny ResNet, or the small ViT), with or without the
    probe, on the same images, labels and augmentation stream; the model's state and the step."""
    cfg = compose_cfg([*FAST, *method_args(method), f"monitor.online_linear={probe}"])
    torch.manual_seed(0)
    model = build_model(cfg, CPU)
    step = build_step(cfg, model, instantiate(cfg.augment), 4, num_classes=10)
    assert (step.probe is not None) == probe
    step.initial_probe = step.probe.linear.weight.detach().clone() if probe else None
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(-1, 10, (cfg.batch_size,), generator=generator)
    rng = torch.Generator().manual_seed(2)
    for i in range(steps):
        out = step(images, rng, i, labels)
    assert ("online_top1" in out) == probe and torch.isfinite(out["loss"])
    return {k: v.clone() for k, v in model.state_dict().items()}, step


@pytest.mark.parametrize("method", ["simclr", "dino", "mae"])  # the student's backbone, a teacher's, a
def test_the_probe_does_not_change_the_methods_training(method: str) -> None:  # pass of its own (MAE)
    """Bit for bit the same weights, buffers and teacher after two steps with and without the probe:
    detached features, its own optimizer, its own generator."""
    with_probe, step = steps_of(method, probe=True)
    without, _ = steps_of(method, probe=False)
    assert with_probe.keys() == without.keys()
    for key in without:
        torch.testing.assert_close(with_probe[key], without[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(step.probe.linear.weight, step.initial_probe)  # and the probe trained


class Encoder(nn.Module):
    """Features = flattened input times one weight per feature; counts its calls."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, self.num_features))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1) * self.scale


def test_the_probe_trains_on_the_first_encoder_pass_with_the_labels_repeated() -> None:
    """Two views concatenated in one pass ([2B, D]): the probe's step is an SGD step on the mean
    cross-entropy over the labelled rows of both, each view's row with its image's label, on features
    standardised over the batch."""
    encoder = Encoder()
    probe = OnlineLinear(encoder, 12, 4, lr=0.5, make_scheduler=constant_schedule)
    start = probe.linear.weight.detach().clone(), probe.linear.bias.detach().clone()
    views = [torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)]
    labels = torch.tensor([0, 1, -1, 3, 2, -1])
    with probe.capture():
        encoder(torch.cat(views))
        encoder(torch.randn(12, 3, 2, 2))  # a later pass (local crops): not the probe's
    out = probe.step(labels, views[0], step=0, total_steps=10)
    assert encoder.calls == 2  # no pass of its own

    weight, bias = (t.clone().requires_grad_() for t in start)
    features, targets = encoder(torch.cat(views)).detach(), labels.repeat(2)
    keep = targets >= 0
    standardised = F.batch_norm(features, None, None, training=True)  # over every row, labelled or not
    loss = F.cross_entropy(standardised[keep] @ weight.T + bias, targets[keep])
    loss.backward()
    torch.testing.assert_close(probe.linear.weight, start[0] - 0.5 * weight.grad)
    torch.testing.assert_close(probe.linear.bias, start[1] - 0.5 * bias.grad)
    torch.testing.assert_close(out["online_loss"], loss.detach())


def test_without_an_encoder_pass_the_probe_makes_one_over_the_first_view() -> None:
    encoder = Encoder()
    probe = OnlineLinear(encoder, 12, 4, lr=0.5, make_scheduler=constant_schedule)
    with probe.capture():
        pass  # MAE: the encoder's blocks run on the visible patches, never the encoder whole
    out = probe.step(torch.tensor([0, 1, 2]), torch.randn(3, 3, 2, 2), step=0, total_steps=10)
    assert encoder.calls == 1 and torch.isfinite(out["online_loss"])


def test_two_processes_train_the_probe_as_one(monkeypatch) -> None:
    """Each process holds half the batch, with different numbers of hidden labels: the gradient is the
    mean over every labelled row of both (summed with the count in one collective), as on one."""
    generator = torch.Generator().manual_seed(0)
    views = torch.randn(3, 8, 3, 2, 2, generator=generator)  # 3 steps of a batch of 8
    labels = torch.tensor(
        [[0, -1, -1, 3, 2, 1, 0, 3], [1, 1, 2, -1, 0, 3, 2, 1], [-1, -1, -1, 0, 1, 2, 3, 0]]
    )

    def train(rows: slice) -> torch.Tensor:
        encoder = Encoder()
        probe = OnlineLinear(encoder, 12, 4, lr=0.5, make_scheduler=constant_schedule)
        # the batch norm over the global batch is the method's SyncBatchNorm, which threads cannot
        # stand in for: check_ddp compares it on real processes; here the gradients' sum alone
        probe.head[0] = nn.Identity()
        for i in range(3):
            with probe.capture():
                encoder(views[i][rows])
            probe.step(labels[i][rows], views[i][rows], step=i, total_steps=3)
        return probe.linear.weight.detach()

    one = train(slice(None))
    group = FakeGroup(2)
    monkeypatch.setattr(distributed, "total", group.total)
    two = group.run(lambda rank: train(slice(4 * rank, 4 * rank + 4)))
    torch.testing.assert_close(two[0], one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two[1], two[0], rtol=0, atol=0)


def test_the_probes_step_never_syncs_the_host(monkeypatch) -> None:
    encoder = Encoder()
    probe = OnlineLinear(encoder, 12, 4, lr=0.5, make_scheduler=constant_schedule)
    views, labels = torch.randn(8, 3, 2, 2), torch.tensor([0, 1, -1, 3, 2, -1, 1, 0])

    def host_sync(*args, **kwargs):
        raise AssertionError("a host sync in the probe's step")

    for name in ("item", "__bool__", "nonzero", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    with NoTensorsFromPythonData():
        for i in range(2):
            with probe.capture():
                encoder(views)
            out = probe.step(labels, views, step=i, total_steps=10)
    monkeypatch.undo()
    assert torch.isfinite(out["online_top1"])


def test_the_validation_images_labels_are_hidden_from_the_probe() -> None:
    """The held-out images stay in pretraining (data.val_in_pretraining=true) but not in the probe's
    training: their labels in the training split are -1, the others unchanged."""
    from ssl_lab.data.datasets import DataSplits, ImageSet

    x, y, xt, yt = make_synthetic(200, 20, 8, 10, 0)
    train = ImageSet(images=x, labels=y, image_size=8)
    splits = hold_out(DataSplits(train, train, ImageSet(xt, labels=yt), 10, (0.5,) * 3, (0.25,) * 3), 20, "t")
    hidden = splits.train.labels == -1
    assert hidden.sum() == 20 and torch.equal(splits.train.images, splits.memory.images)
    assert sorted(x[hidden].flatten(1).sum(1).tolist()) == sorted(
        splits.val.images.flatten(1).sum(1).tolist()
    )
    assert torch.equal(splits.train.labels[~hidden], y[~hidden]) and splits.memory.labels is y


def test_unlabelled_data_has_no_probe_and_says_so(capsys) -> None:
    from ssl_lab.data.datasets import DataSplits, ImageSet

    cfg = compose_cfg(FAST)
    images = ImageSet(images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    unlabelled = DataSplits(images, None, None, 0, (0,) * 3, (1,) * 3)
    assert probe_classes(cfg, unlabelled) == 0
    assert "no online linear probe" in capsys.readouterr().out
    images = ImageSet(
        images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), labels=torch.zeros(4, dtype=torch.long)
    )
    labelled = DataSplits(images, images, images, 10, (0,) * 3, (1,) * 3)
    assert probe_classes(cfg, labelled) == 10
    cfg.monitor.online_linear = False
    assert probe_classes(cfg, labelled) == 0 and capsys.readouterr().out == ""
