"""The loop asks the method for everything method-specific (ssl_lab/methods/base.py): a method with
more than two views of different sizes (multi-crop), a momentum teacher, a hook on the gradients, its
own logged scalars, the training progress and its own evaluated network trains through the unchanged
runner, defined in this file alone."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FAST, compose_cfg
from omegaconf import open_dict

from ssl_lab import checkpoint
from ssl_lab.methods.base import Method
from ssl_lab.train import train


class MultiCropWithTeacher(Method):
    """Two global views and two small local ones; the student predicts an EMA teacher's embedding of
    the other global view (a toy BYOL/DINO)."""

    name = "multicrop_teacher"
    seen: list[tuple[str, object]] = []  # what the runner called, in order

    def __init__(self, backbone: nn.Module, momentum: float = 0.9, name: str = "multicrop_teacher") -> None:
        super().__init__(backbone)
        self.momentum = momentum
        self.head = nn.Linear(self.num_features, 16)
        self.teacher = copy.deepcopy(nn.Sequential(self.backbone, self.head)).requires_grad_(False)

    def views(self, draw):
        return [draw(), draw(), *(draw(size=16, crop_scale=(0.05, 0.4)) for _ in range(2))]

    def training_step(self, views):
        self.seen.append(("sizes", [tuple(v.shape[-2:]) for v in views]))
        with torch.no_grad():
            targets = [F.normalize(self.teacher(v), dim=1) for v in views[:2]]
        loss = 0
        for i, view in enumerate(views):
            prediction = F.normalize(self.head(self.backbone(view)), dim=1)
            loss = loss + (2 - 2 * (prediction * targets[1 - i % 2]).sum(1)).mean()
        return {"loss": loss / len(views)}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.seen.append(("after_step", (step, total_steps)))
        student = nn.Sequential(self.backbone, self.head)
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.lerp_(s, 1 - self.momentum)


def test_a_multicrop_method_with_a_momentum_teacher_trains_through_the_runner(tmp_path: Path) -> None:
    cfg = compose_cfg([*FAST, "epochs=2", "trainer.channels_last=false"])
    with open_dict(cfg):
        cfg.method = {"_target_": f"{__name__}.MultiCropWithTeacher", "name": "multicrop_teacher"}
    MultiCropWithTeacher.seen.clear()
    assert train(cfg, run_dir=tmp_path) is not None

    steps = [v for kind, v in MultiCropWithTeacher.seen if kind == "after_step"]
    total = 2 * (256 // 32)
    assert steps == [(i, total) for i in range(total)]  # once per optimizer step, after it
    sizes = {tuple(v) for kind, v in MultiCropWithTeacher.seen if kind == "sizes"}
    assert sizes == {((32, 32), (32, 32), (16, 16), (16, 16))}

    model = checkpoint.load(tmp_path / "final.pt")["model"]  # the teacher travels in checkpoints
    student = {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    teacher = {k.removeprefix("teacher.0."): v for k, v in model.items() if k.startswith("teacher.0.")}
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in student if student[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_the_teacher_follows_the_student_after_each_optimizer_step() -> None:
    """after_step runs after the update: the teacher moves toward the updated student."""
    from ssl_lab.build import build_model, build_step

    cfg = compose_cfg([*FAST, "trainer.channels_last=false", "optimizer=sgd"])
    with open_dict(cfg):
        cfg.method = {"_target_": f"{__name__}.MultiCropWithTeacher", "name": "m", "momentum": 0.0}
    model = build_model(cfg, torch.device("cpu"))
    step = build_step(cfg, model, torch.nn.Identity(), steps_per_epoch=1)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    step.update(views, 0)
    for t, s in zip(model.teacher.parameters(), nn.Sequential(model.backbone, model.head).parameters()):
        assert torch.equal(t, s)  # momentum 0: the teacher is the student after its update


class TeacherEvaluated(MultiCropWithTeacher):
    """The same, evaluated on its teacher's backbone (as DINO is), logging the progress it reads."""

    evaluated = "teacher.0"
    grads: list[tuple[int, int, bool]] = []

    def training_step(self, views):
        return {
            **super().training_step(views),
            "progress": self.progress(),
            "epoch": self.epoch_now().float(),
        }

    def after_backward(self, step: int, epoch: int) -> None:
        self.grads.append((step, epoch, all(p.grad is not None for p in self.head.parameters())))
        self.head.bias.grad = None  # dropped before the optimizer step: the bias must never move


def test_the_method_declares_what_is_evaluated_logged_and_done_to_the_gradients(tmp_path: Path) -> None:
    from ssl_lab.export import export, load_backbone
    from ssl_lab.loggers import read_metrics

    cfg = compose_cfg([*FAST, "epochs=2", "trainer.channels_last=false", "optimizer=sgd"])
    with open_dict(cfg):
        cfg.method = {"_target_": f"{__name__}.TeacherEvaluated", "name": "teacher_evaluated"}
    TeacherEvaluated.grads.clear()
    train(cfg, run_dir=tmp_path)

    per_epoch = 256 // 32
    assert TeacherEvaluated.grads == [(i, i // per_epoch, True) for i in range(2 * per_epoch)]
    rows = [r for r in read_metrics(tmp_path) if "train/progress" in r]
    assert rows and all(0 <= r["train/progress"] < 1 and r["train/epoch"] == r["epoch"] for r in rows)
    assert rows[-1]["train/progress"] > 0.5  # the mean over the last log window of the second epoch

    state = checkpoint.load(tmp_path / "final.pt")["model"]
    # the bias never moved: its EMA copy, which started equal, still is (lerp towards itself is exact)
    assert torch.equal(state["head.bias"], state["teacher.1.bias"])
    assert not torch.equal(state["head.weight"], state["teacher.1.weight"])
    loaded = load_backbone(export(tmp_path))  # what export and every evaluation read: the teacher
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[f"teacher.0.{name}"])
    assert any(not torch.equal(state[f"teacher.0.{k}"], state[f"backbone.{k}"]) for k in loaded.state_dict())
    model = TeacherEvaluated(loaded)
    assert model.encoder is model.teacher[0]


class Progressive(Method):
    """A loss scaled by the training progress: a schedule inside the step, as DINO's teacher temperature."""

    def training_step(self, views):
        loss = self.backbone(views[0]).mean() * (1 + self.progress())
        return {"loss": loss, "epoch": self.epoch_now().float()}


def test_a_compiled_step_reads_the_progress_without_recompiling() -> None:
    from torch._dynamo.testing import CompileCounter

    backbone = nn.Linear(4, 4)
    backbone.num_features = 4
    model, counter = Progressive(backbone), CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 4)
    for step in range(6):
        model.set_progress(step, steps_per_epoch=2, total_steps=6)
        out = compiled([x, x])
        torch.testing.assert_close(out["loss"], backbone(x).mean() * (1 + step / 6))
        assert out["epoch"].item() == step // 2
    assert counter.frame_count == 1


def test_the_loop_prefetching_the_next_batchs_views_trains_exactly_as_one_step_at_a_time() -> None:
    """ssl_lab.build.Prefetch makes batch i+1's views after step i is launched (on a GPU on a side stream,
    trainer.overlap): the same random draws in the same order as TrainStep(images, rng, i), which makes
    the views inside the step, so the losses, the parameters and the stream's final state are equal."""
    from hydra.utils import instantiate

    from ssl_lab.build import Prefetch, build_model, build_step
    from ssl_lab.data.loader import batches, epoch_order

    cfg = compose_cfg([*FAST, "method=mocov2", "method.symmetric=true", "method.shuffle_keys=true",
                       "method.queue_size=64", "data.num_train=96", "batch_size=32"])  # fmt: skip
    data = instantiate(cfg.data, num_workers=0)
    device = torch.device("cpu")
    runs = []
    for prefetch in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, device)
        step = build_step(cfg, model, instantiate(cfg.augment), len(data.train) // cfg.batch_size)
        rng = torch.Generator().manual_seed(5)
        loader = batches(data.train, epoch_order(len(data.train), 0, 0), cfg.batch_size, drop_last=True)
        if prefetch:
            losses = [
                step.train_on(v, i, y)["loss"] for i, (v, y) in enumerate(Prefetch(step, loader, rng, device))
            ]
        else:
            losses = [step(images, rng, i, labels)["loss"] for i, (images, labels) in enumerate(loader)]
        runs.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()], rng.get_state()))
    (loss_a, params_a, rng_a), (loss_b, params_b, rng_b) = runs
    assert len(loss_a) == 3 and torch.equal(loss_a, loss_b)  # views and the keys' order: the stream's
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b)) and torch.equal(rng_a, rng_b)
    assert Prefetch(step, iter([]), rng, device, overlap=True).side is None  # no stream on a CPU


@pytest.mark.slow
def test_compiled_augmentation_makes_the_same_views_and_compiles_once_per_view() -> None:
    """trainer.compile_augment: each view's augmentation compiled (fullgraph: no graph break, so no
    host sync on a GPU), drawing the same parameters from the run's stream, so the views equal the
    eager ones up to float rounding (atol 1e-4 on normalised pixels: a wrong op or draw moves them by
    0.01 or more); asymmetric views (two augmentations) compile once each, and later steps reuse them."""
    from hydra.utils import instantiate

    from ssl_lab.build import build_model, build_step

    cfg = compose_cfg([*FAST, "augment=asymmetric_cifar", "augment.blur_p=0.5", "batch_size=16"])
    model = build_model(cfg, torch.device("cpu"))
    step = build_step(cfg, model, instantiate(cfg.augment), steps_per_epoch=4)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    torch._dynamo.reset()

    def views(compiled: bool, seed: int) -> list[torch.Tensor]:
        step.compile_augment = compiled
        return step.views(images, torch.Generator().manual_seed(seed))

    def same_views(seed: int) -> list[torch.Tensor]:
        eager, compiled = views(False, seed), views(True, seed)
        assert len(compiled) == 2 and len(step.compiled) == 2
        for a, b in zip(eager, compiled, strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        return eager

    first = same_views(0)  # every augmentation compiles at the first batch ...
    assert not torch.equal(first[0], first[1])  # (two views that differ: not one view compared twice)
    with torch._dynamo.config.patch(error_on_recompile=True):  # ... and never again
        for seed in (1, 2):
            same_views(seed)
