"""DINO (Caron et al., 2021): self-distillation with no labels. A student matches, on every view, the
centred and sharpened output of a momentum teacher on the other global views (facebookresearch/dino,
main_dino.py and vision_transformer.py; solo-learn's CIFAR recipe for the defaults it names)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ssl_lab.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import (
    DINOHead,
    MomentumTeacher,
    MultiCrop,
    clip_each_gradient,
    dino_loss,
    update_center,
    warmup_temperature,
)


class DINO(Method):
    name = "dino"
    evaluated = "teacher.backbone"  # DINO's paper and code evaluate the teacher (lightly #1471, DINO #44)
    evaluated_head = "teacher.head.mlp"

    def __init__(
        self,
        backbone: nn.Module,
        num_prototypes: PositiveInt = 65536,
        proj_hidden_dim: PositiveInt = 2048,
        bottleneck_dim: PositiveInt = 256,
        proj_layers: PositiveInt = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        student_temp: PositiveFloat = 0.1,
        teacher_temp: PositiveFloat = 0.07,
        warmup_teacher_temp: PositiveFloat = 0.04,
        warmup_teacher_temp_epochs: NonNegativeInt = 30,
        center_momentum: Probability = 0.9,
        momentum_base: Probability = 0.996,
        momentum_end: Probability = 1.0,
        freeze_last_layer: NonNegativeInt = 1,
        clip_grad: NonNegativeFloat = 3.0,
        num_local_crops: NonNegativeInt = 0,
        local_crop_size: PositiveInt | None = None,
        local_crop_scale: Sequence[float] = (0.05, 0.4),
        global_crop_scale: Sequence[float] | None = None,
        evaluate_student: bool = False,
        concat_views: bool = True,
        name: str = "dino",
    ) -> None:
        super().__init__(backbone, concat_views)
        if evaluate_student:  # lightly's benchmarks evaluate the student's backbone (lightly #1471)
            self.evaluated, self.evaluated_head = "backbone", "head.mlp"
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_teacher_temp_epochs = (
            warmup_teacher_temp,
            warmup_teacher_temp_epochs,
        )
        self.center_momentum, self.freeze_last_layer = center_momentum, freeze_last_layer
        self.clip_grad = clip_grad
        self.crops = MultiCrop(
            backbone,
            num_local_crops,
            local_crop_size,
            local_crop_scale,
            global_crop_scale,
            ("DINO", "0.05-0.4 and 0.4-1"),
        )
        self.head = DINOHead(
            self.num_features, proj_hidden_dim, bottleneck_dim, num_prototypes, proj_layers,
            use_bn_in_head, norm_last_layer,
        )  # fmt: skip
        self.teacher = MomentumTeacher(
            {"backbone": self.backbone, "head": self.head}, momentum_base, momentum_end, drop_path=False
        )
        self.register_buffer("center", torch.zeros(1, num_prototypes))  # saved: a resume restores it

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """Two global views, then `num_local_crops` local ones of one size (one backbone pass)."""
        return self.crops.views(draw)

    def teacher_temperature(self) -> torch.Tensor:
        """Linear from warmup_teacher_temp to teacher_temp over the first warmup_teacher_temp_epochs
        epochs (parts.warmup_temperature: main_dino.py's schedule, read from the progress tensor)."""
        return warmup_temperature(
            self.epoch_now(), self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs
        )

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        student = self.embed_views(views, self.head)  # every view; equal sizes in one pass
        with torch.no_grad():  # the teacher sees the global views only
            teacher = self.per_view(lambda x: self.teacher.head(self.teacher.backbone(x)), views[:2])
        temperature = self.teacher_temperature()
        loss, entropy = dino_loss(teacher, student, self.center, temperature, self.student_temp)
        update_center(self.center, torch.cat(teacher), self.center_momentum)  # after the loss read it
        return {
            "loss": loss,
            "teacher_temp": temperature.detach(),
            "teacher_entropy": entropy,
            "momentum": self.teacher.momentum.clone(),
        }

    def after_backward(self, step: int, epoch: int) -> None:
        """Each student parameter's gradient clipped to norm clip_grad on its own (main_dino.py's
        clip_gradients; 0: off), without a host sync. Then the prototypes stay as initialised for the
        first freeze_last_layer epochs: no gradient, so the optimizer skips them (weight decay
        included), as main_dino.py's cancel_gradients_last_layer."""
        clip_each_gradient(self, self.clip_grad)
        if epoch < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update({"backbone": self.backbone, "head": self.head}, step, total_steps)
