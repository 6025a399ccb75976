"""DINOv2 (Oquab et al., 2023), at the recipe level: DINO's [CLS] self-distillation and iBOT's masked
patch one, each against a momentum teacher whose outputs are made into balanced assignments by
Sinkhorn-Knopp, an untied head for the patches, the KoLeo regulariser on the student's [CLS] features,
multi-crop with the global crops masked, stochastic depth and layer-wise lr decay; register tokens are a
backbone option (backbone.kwargs.reg_tokens). facebookresearch/dinov2: train/ssl_meta_arch.py,
loss/{dino_clstoken,ibot_patch,koleo}_loss.py, configs/ssl_default_config.yaml and train/vitl14.yaml."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability
from ssl_lab.errors import UserError
from ssl_lab.methods.base import Method
from ssl_lab.methods.ibot import masked_patch_loss
from ssl_lab.methods.masks import VIEW_NOISE, view_mask
from ssl_lab.methods.parts import (
    DINOHead,
    MomentumTeacher,
    MultiCrop,
    check_vit,
    cross_view_loss,
    koleo_loss,
    sinkhorn,
    vit_tokens,
    warmup_temperature,
)


def layer_id(name: str, depth: int) -> int:
    """A ViT parameter's layer for layer-wise lr decay (dinov2/layers's get_vit_lr_decay_rate): 0 for
    the embeddings and tokens, i + 1 for block i, depth + 1 for the rest (the final norm)."""
    if name.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


class DINOv2(Method):
    name = "dinov2"
    evaluated = "teacher.backbone"  # DINOv2 evaluates (and releases) the teacher
    evaluated_head = "teacher.head.mlp"

    def __init__(
        self,
        backbone: nn.Module,
        num_prototypes: PositiveInt = 65536,
        patch_prototypes: PositiveInt = 65536,
        separate_head: bool = True,
        proj_hidden_dim: PositiveInt = 2048,
        bottleneck_dim: PositiveInt = 256,
        proj_layers: PositiveInt = 3,
        student_temp: PositiveFloat = 0.1,
        teacher_temp: PositiveFloat = 0.07,
        warmup_teacher_temp: PositiveFloat = 0.04,
        warmup_teacher_temp_epochs: NonNegativeInt = 30,
        sinkhorn_iterations: PositiveInt = 3,
        dino_loss_weight: NonNegativeFloat = 1.0,
        ibot_loss_weight: NonNegativeFloat = 1.0,
        koleo_loss_weight: NonNegativeFloat = 0.1,
        mask_probability: Probability = 0.5,
        mask_ratio: Sequence[float] = (0.1, 0.5),
        mask_min_patches: PositiveInt = 4,
        mask_aspect: Sequence[float] = (0.3, 1 / 0.3),
        layer_decay: Probability = 0.9,
        patch_embed_lr_scale: PositiveFloat = 0.2,
        momentum_base: Probability = 0.992,
        momentum_end: Probability = 1.0,
        freeze_last_layer: NonNegativeInt = 1,
        clip_grad: NonNegativeFloat = 3.0,
        num_local_crops: NonNegativeInt = 0,
        local_crop_size: PositiveInt | None = None,
        local_crop_scale: Sequence[float] = (0.05, 0.32),
        global_crop_scale: Sequence[float] | None = None,
        name: str = "dinov2",
    ) -> None:
        check_vit(backbone, "dinov2")
        super().__init__(backbone, concat_views=True)
        self.student_temp, self.clip_grad, self.freeze_last_layer = student_temp, clip_grad, freeze_last_layer
        self.temps, self.warmup_epochs = (warmup_teacher_temp, teacher_temp), warmup_teacher_temp_epochs
        self.iterations = sinkhorn_iterations
        self.weights = (dino_loss_weight, ibot_loss_weight, koleo_loss_weight)
        self.layer_decay, self.patch_embed_lr_scale = layer_decay, patch_embed_lr_scale
        self.grid = tuple(backbone.patch_embed.grid_size)
        # the patches each image sends through the heads: as many as a mask can cover (the largest
        # target), masked ones first; DINOv2 sends exactly the masked ones, a number known on the host
        # from its data loader, which here would be a sync
        self.budget = max(1, int(float(mask_ratio[1]) * self.grid[0] * self.grid[1]))
        self.mask_settings = (
            mask_probability, (float(mask_ratio[0]), float(mask_ratio[1])), mask_min_patches,
            (float(mask_aspect[0]), float(mask_aspect[1])),
        )  # fmt: skip
        self.crops = MultiCrop(backbone, num_local_crops, local_crop_size, local_crop_scale, global_crop_scale,
                               ("DINOv2", "0.05-0.32 and 0.32-1"))  # fmt: skip
        self.mask_token = nn.Parameter(torch.zeros(1, self.num_features))  # dinov2's mask_token: zeros
        # the prototypes' norm learnt (dinov2's weight_norm leaves weight_g trainable)
        head = dict(
            hidden_dim=proj_hidden_dim,
            bottleneck_dim=bottleneck_dim,
            layers=proj_layers,
            norm_last_layer=False,
        )
        self.head = DINOHead(self.num_features, num_prototypes=num_prototypes, **head)
        # untied (ibot.separate_head, the released ViT-L/14's): a head of its own for the patches
        self.patch_head = (
            DINOHead(self.num_features, num_prototypes=patch_prototypes, **head) if separate_head else None
        )
        self.teacher = MomentumTeacher(self.students(), momentum_base, momentum_end, drop_path=False)

    def students(self) -> dict[str, nn.Module]:
        students = {"backbone": self.backbone, "head": self.head}
        return students | ({"patch_head": self.patch_head} if self.patch_head is not None else {})

    def check_batch(self, batch_size: int) -> None:
        if self.weights[2] and batch_size < 2:
            raise UserError(
                f"method.koleo_loss_weight={self.weights[2]}: KoLeo needs at least 2 images a batch to find a "
                f"nearest neighbour, got batch_size={batch_size}; raise batch_size or set method.koleo_loss_weight=0"
            )

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """The global and local views, then the noise of the two global views' block masks."""
        return [*self.crops.views(draw), draw.noise(2, VIEW_NOISE)]

    def heads(
        self, owner: nn.Module, cls: torch.Tensor, patches: torch.Tensor, chosen: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`owner`'s (the student's or the teacher's) [CLS] outputs, and its outputs of the `chosen`
        patches [B, budget]: through the patch head when untied, through the [CLS] head otherwise."""
        patch_head = owner.patch_head if self.patch_head is not None else owner.head
        picked = torch.gather(patches, 1, chosen.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        n, k = picked.shape[:2]
        return owner.head(cls), patch_head(picked.reshape(n * k, -1)).view(n, k, -1)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        *images, noise = views
        glob, local = torch.cat(images[:2]), images[2:]
        full_mask = torch.cat(
            [view_mask(noise[:, i], self.grid, *self.mask_settings) for i in (0, 1)]
        )  # [2B, N]
        mask = full_mask
        chosen = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, : self.budget]  # masked first
        mask = torch.gather(mask, 1, chosen)  # [2B, budget]: which of the chosen patches are masked
        s = vit_tokens(self.backbone, glob, mask=full_mask, mask_token=self.mask_token)
        s_cls, s_patch = self.heads(self, s.pooled, s.patches, chosen)
        student = [*s_cls.chunk(2), *self.per_view(lambda x: self.head(self.backbone(x)), local)]
        temp = warmup_temperature(self.epoch_now(), *self.temps, self.warmup_epochs)
        with torch.no_grad():
            t = vit_tokens(self.teacher.backbone, glob)
            t_cls, t_patch = self.heads(self.teacher, t.pooled, t.patches, chosen)
            # Sinkhorn-Knopp over the global batch: the [CLS] outputs of both views, and the masked
            # patches of both (the unmasked ones weigh 0: DINOv2 selects the masked ones)
            targets = sinkhorn(t_cls, temp, self.iterations).view(2, -1, t_cls.shape[-1])
            patch_rows = t_patch.reshape(-1, t_patch.shape[-1])
            patch_targets = sinkhorn(patch_rows, temp, self.iterations, weight=mask.flatten().float())
        # the mean over the (teacher, other student view) pairs; ssl_meta_arch.py divides the sum by
        # 2 + max(2 x local crops, 1): without local crops, 2/3 of the mean (followed here)
        pairs = 2 + 2 * len(local)
        dino = cross_view_loss(targets, student, self.student_temp) * pairs / (2 + max(2 * len(local), 1))
        ibot = masked_patch_loss(patch_targets.view_as(t_patch), s_patch, mask, self.student_temp)
        # KoLeo on each global view's student [CLS] features apart (never two crops of one image), summed
        koleo, nearest = zip(*(koleo_loss(x) for x in s.pooled.chunk(2)))
        koleo = sum(koleo)
        loss = self.weights[0] * dino + self.weights[1] * ibot + self.weights[2] * koleo
        with torch.no_grad():
            q = F.softmax(t_cls.float() / temp, dim=-1)  # the teacher's own softmax, before Sinkhorn-Knopp
            entropy = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
        return {
            "loss": loss,
            "dino_loss": dino.detach(),
            "ibot_loss": ibot.detach(),
            "koleo_loss": koleo.detach(),
            "koleo_min_distance": torch.minimum(*nearest),
            "masked": full_mask.float().mean().detach(),
            "teacher_temp": temp.detach(),
            "teacher_entropy": entropy,
            "momentum": self.teacher.momentum.clone(),
        }

    def param_groups(self) -> list[dict[str, Any]]:
        """Layer-wise lr decay (optim.layerwise_decay): the backbone's layer l of depth + 1 at lr x
        decay^(depth + 1 - l), the patch embedding's also x patch_embed_lr_scale (0.2); the heads and
        the mask token at the full lr (dinov2's get_params_groups; the mask token is the backbone's
        there, at layer 0: here it is the method's)."""
        depth = len(self.backbone.blocks)
        groups: dict[float, list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            scale = 1.0
            if name.startswith("backbone."):
                inner = name.removeprefix("backbone.")
                scale = self.layer_decay ** (depth + 1 - layer_id(inner, depth))
                scale *= self.patch_embed_lr_scale if inner.startswith("patch_embed") else 1.0
            groups.setdefault(scale, []).append((name, p))
        return [{"name": f"lr x {s:.4g}", "params": params, "lr_scale": s} for s, params in groups.items()]

    def after_backward(self, step: int, epoch: int) -> None:
        """Gradients clipped to clip_grad by their norm over each of the backbone and the heads
        (dinov2's per-module clip_grad_norm_; 0: off), then the prototypes frozen for the first
        freeze_last_layer epochs."""
        if self.clip_grad:
            for module in self.students().values():
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.clip_grad, foreach=True)
        if epoch < self.freeze_last_layer:
            for head in (self.head, self.patch_head):
                for p in head.last_layer.parameters() if head is not None else ():
                    p.grad = None

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update(self.students(), step, total_steps)
