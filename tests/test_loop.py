"""The loop asks the method for its views and its post-step update: a method with more than two views
of different sizes (multi-crop) and a momentum teacher (BYOL, MoCo v3, DINO) trains through the
unchanged runner, defined in this file alone."""

import copy
from pathlib import Path

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
