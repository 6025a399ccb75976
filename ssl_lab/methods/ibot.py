"""iBOT (Zhou et al., 2022): image BERT pre-training with an online tokenizer. DINO's self-distillation of
the [CLS] token across views, plus masked image modelling as self-distillation of the patch tokens: the
student sees each global view with random blocks of patches replaced by a mask token and predicts, at
the masked patches, the momentum teacher's centred and sharpened softmax of the unmasked view
(bytedance/ibot: main_ibot.py's iBOTLoss, models/head.py's iBOTHead, loader.py's block masks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability
from ssl_lab.errors import UserError
from ssl_lab.methods.base import Method
from ssl_lab.methods.masks import VIEW_NOISE, view_mask
from ssl_lab.methods.parts import (
    DINOHead,
    MomentumTeacher,
    MultiCrop,
    Prototypes,
    check_vit,
    clip_each_gradient,
    dino_loss,
    update_center,
    vit_tokens,
    warmup_temperature,
)


class IBOTHead(DINOHead):
    """DINO's head with a second set of prototypes for the patch tokens (`patch_prototypes`), or the
    [CLS] ones for both when shared (iBOTHead's last_layer2): `forward(cls [B, D], patches [B, N, D],
    shared)` gives ([B, K], [B, N, K2])."""

    def __init__(self, in_dim: int, patch_prototypes: int, shared: bool, **kwargs) -> None:
        super().__init__(in_dim, **kwargs)
        self.patch_layer = (
            None
            if shared
            else Prototypes(self.last_layer.in_features, patch_prototypes, self.last_layer.scale is None)
        )

    def forward(self, cls: torch.Tensor, patches: torch.Tensor | None = None, shared: bool = False):
        if patches is None:
            return super().forward(cls)
        n = cls.shape[0]
        z = F.normalize(self.mlp(torch.cat([cls.unsqueeze(1), patches], dim=1)).float(), dim=-1)
        patch_layer = self.last_layer if shared or self.patch_layer is None else self.patch_layer
        return self.last_layer(z[:, 0]), patch_layer(z[:, 1:].reshape(-1, z.shape[-1])).view(
            n, patches.shape[1], -1
        )


def ibot_patch_loss(
    teacher: torch.Tensor,
    student: torch.Tensor,
    mask: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: torch.Tensor | float,
    student_temp: float,
) -> torch.Tensor:
    """iBOTLoss's patch term for one global view: per patch, the cross entropy between the teacher's
    centred, sharpened softmax (of the unmasked view) and the student's log-softmax (of the masked view),
    averaged over each image's masked patches, then over the images (an unmasked image counts 0). fp32,
    autocast off. teacher, student: [B, N, K]; mask: [B, N] (True: masked)."""
    with torch.autocast(student.device.type, enabled=False):
        q = F.softmax((teacher.detach().float() - center) / teacher_temp, dim=-1)
    return masked_patch_loss(q, student, mask, student_temp)


def masked_patch_loss(
    targets: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """The cross entropy between the teacher's target distribution at each patch (`targets` [B, N, K]:
    iBOT's centred softmax, DINOv2's Sinkhorn-Knopp assignments) and the student's log-softmax, averaged
    over each image's masked patches (mask [B, N], True: masked), then over the images."""
    with torch.autocast(student.device.type, enabled=False):
        cross = -(targets.detach().float() * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1)
        weights = mask.float()
        per_image = (cross * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
        return per_image.mean()


def ibot_loss(
    teacher_cls: torch.Tensor,
    student_cls: list[torch.Tensor],
    teacher_patches: torch.Tensor,
    student_patches: torch.Tensor,
    masks: torch.Tensor,
    centers: tuple[torch.Tensor, torch.Tensor],
    temps: tuple[torch.Tensor | float, torch.Tensor | float],
    student_temp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """iBOTLoss.forward on the two global views: the [CLS] term over every (teacher view, other student
    view) pair (DINO's loss: teacher_cls [2B, K], student_cls the global then local views' [B, K]), the
    patch term over each global view with itself (ibot_patch_loss: [2B, N, K2] and masks [2B, N]),
    averaged over the two. Returns (cls term, patch term, the teacher's [CLS] entropy)."""
    cls_loss, entropy = dino_loss(teacher_cls.chunk(2), student_cls, centers[0], temps[0], student_temp)
    terms = zip(teacher_patches.chunk(2), student_patches.chunk(2), masks.chunk(2))
    patch_loss = sum(ibot_patch_loss(t, s, m, centers[1], temps[1], student_temp) for t, s, m in terms) / 2
    return cls_loss, patch_loss, entropy


@torch.no_grad()
def update_patch_center(center: torch.Tensor, teacher_patches: torch.Tensor, momentum: float) -> None:
    """center2 <- m center2 + (1 - m) mean over the global batch of each image's mean patch output
    (iBOTLoss.update_center: every patch of the teacher's views, masked or not)."""
    update_center(center, teacher_patches.float().mean(1), momentum)


class IBOT(Method):
    name = "ibot"
    evaluated = "teacher.backbone"  # iBOT evaluates the teacher, as DINO
    evaluated_head = "teacher.head.mlp"

    def __init__(
        self,
        backbone: nn.Module,
        num_prototypes: PositiveInt = 8192,
        patch_prototypes: PositiveInt = 8192,
        shared_head: bool = True,
        shared_head_teacher: bool = True,
        proj_hidden_dim: PositiveInt = 2048,
        bottleneck_dim: PositiveInt = 256,
        proj_layers: PositiveInt = 3,
        norm_last_layer: bool = False,
        student_temp: PositiveFloat = 0.1,
        teacher_temp: PositiveFloat = 0.07,
        warmup_teacher_temp: PositiveFloat = 0.04,
        teacher_patch_temp: PositiveFloat = 0.07,
        warmup_teacher_patch_temp: PositiveFloat = 0.04,
        warmup_teacher_temp_epochs: NonNegativeInt = 30,
        center_momentum: Probability = 0.9,
        patch_center_momentum: Probability = 0.9,
        cls_loss_weight: NonNegativeFloat = 1.0,
        patch_loss_weight: NonNegativeFloat = 1.0,
        mask_probability: Probability = 0.5,
        mask_ratio: Sequence[float] = (0.1, 0.5),
        mask_min_patches: PositiveInt | None = None,
        mask_aspect: Sequence[float] = (0.3, 1 / 0.3),
        momentum_base: Probability = 0.996,
        momentum_end: Probability = 1.0,
        freeze_last_layer: NonNegativeInt = 1,
        clip_grad: NonNegativeFloat = 3.0,
        num_local_crops: NonNegativeInt = 0,
        local_crop_size: PositiveInt | None = None,
        local_crop_scale: Sequence[float] = (0.05, 0.4),
        global_crop_scale: Sequence[float] | None = None,
        name: str = "ibot",
    ) -> None:
        check_vit(backbone, "ibot")
        super().__init__(backbone, concat_views=True)
        self.student_temp, self.clip_grad, self.freeze_last_layer = student_temp, clip_grad, freeze_last_layer
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_patch_temp, teacher_patch_temp)
        self.warmup_epochs = warmup_teacher_temp_epochs
        self.center_momentum, self.patch_center_momentum = center_momentum, patch_center_momentum
        self.weights = (cls_loss_weight, patch_loss_weight)
        self.shared_head, self.shared_head_teacher = shared_head, shared_head_teacher
        if not shared_head and shared_head_teacher and patch_prototypes != num_prototypes:
            raise UserError(
                f"method.shared_head_teacher=true reads the teacher's patches through its {num_prototypes} "
                f"[CLS] prototypes, but the student's own patch prototypes are {patch_prototypes}: set "
                "method.patch_prototypes=method.num_prototypes (iBOT: 8192 both) or shared_head_teacher=false"
            )
        patch_dim = patch_prototypes if not (shared_head or shared_head_teacher) else num_prototypes
        grid = tuple(backbone.patch_embed.grid_size)
        self.grid, self.num_patches = grid, grid[0] * grid[1]
        self.mask_probability, self.mask_ratio = (
            mask_probability,
            (float(mask_ratio[0]), float(mask_ratio[1])),
        )
        # iBOT's (BEiT's) smallest block: (min(H, W) // 3)^2 patches (16 at 14 x 14); DINOv2's: 4
        self.mask_min_patches = mask_min_patches or max((min(grid) // 3) ** 2, 1)
        self.mask_aspect = (float(mask_aspect[0]), float(mask_aspect[1]))
        self.crops = MultiCrop(backbone, num_local_crops, local_crop_size, local_crop_scale, global_crop_scale,
                               ("iBOT", "0.05-0.25 and 0.25-1"))  # fmt: skip
        self.mask_token = nn.Parameter(torch.zeros(1, self.num_features))  # iBOT's masked_embed
        self.head = IBOTHead(
            self.num_features, patch_prototypes, shared_head, hidden_dim=proj_hidden_dim,
            bottleneck_dim=bottleneck_dim, num_prototypes=num_prototypes, layers=proj_layers,
            norm_last_layer=norm_last_layer,
        )  # fmt: skip
        self.teacher = MomentumTeacher(
            {"backbone": self.backbone, "head": self.head}, momentum_base, momentum_end, drop_path=False
        )
        self.register_buffer("center", torch.zeros(1, num_prototypes))
        self.register_buffer("patch_center", torch.zeros(1, 1, patch_dim))

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """The global and local views, then the noise of the two global views' masks: per view, 2
        values (masked or not, how much) and BLOCK_CANDIDATES rectangles of 4."""
        return [*self.crops.views(draw), draw.noise(2, VIEW_NOISE)]

    def masks(self, noise: torch.Tensor) -> torch.Tensor:
        """[B, N] masks of one global view from its noise [B, VIEW_NOISE]."""
        return view_mask(
            noise, self.grid, self.mask_probability, self.mask_ratio, self.mask_min_patches, self.mask_aspect
        )

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        *images, noise = views
        glob, local = torch.cat(images[:2]), images[2:]
        mask = torch.cat([self.masks(noise[:, 0]), self.masks(noise[:, 1])])  # [2B, N]
        s = vit_tokens(self.backbone, glob, mask=mask, mask_token=self.mask_token)
        s_cls, s_patch = self.head(s.pooled, s.patches, self.shared_head)
        student = [*s_cls.chunk(2), *self.per_view(lambda x: self.head(self.backbone(x)), local)]
        with torch.no_grad():
            t = vit_tokens(self.teacher.backbone, glob)
            t_cls, t_patch = self.teacher.head(t.pooled, t.patches, self.shared_head_teacher)
        epoch = self.epoch_now()
        temp = warmup_temperature(epoch, self.temps[0], self.temps[1], self.warmup_epochs)
        patch_temp = warmup_temperature(epoch, self.temps[2], self.temps[3], self.warmup_epochs)
        cls_loss, patch_loss, entropy = ibot_loss(
            t_cls, student, t_patch, s_patch, mask, (self.center, self.patch_center), (temp, patch_temp),
            self.student_temp,
        )  # fmt: skip
        update_center(self.center, t_cls, self.center_momentum)  # after the losses read them
        update_patch_center(self.patch_center, t_patch, self.patch_center_momentum)
        loss = self.weights[0] * cls_loss + self.weights[1] * patch_loss
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "patch_loss": patch_loss.detach(),
            "masked": mask.float().mean().detach(),
            "teacher_temp": temp.detach(),
            "teacher_entropy": entropy,
            "momentum": self.teacher.momentum.clone(),
        }

    def after_backward(self, step: int, epoch: int) -> None:
        """As DINO: each parameter's gradient clipped on its own (clip_grad; 0: off), then both sets of
        prototypes frozen for the first freeze_last_layer epochs (cancel_gradients_last_layer)."""
        clip_each_gradient(self, self.clip_grad)
        if epoch < self.freeze_last_layer:
            for layer in (self.head.last_layer, self.head.patch_layer):
                for p in layer.parameters() if layer is not None else ():
                    p.grad = None

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update({"backbone": self.backbone, "head": self.head}, step, total_steps)
