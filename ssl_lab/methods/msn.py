"""MSN (Assran et al., 2022): masked siamese networks. A view with a random part of its patches dropped,
and small focal views, are each matched to learnt prototypes; their soft assignment is trained towards
the sharpened assignment of another, unmasked view by a momentum target network, with Sinkhorn-Knopp
balancing and the mean-entropy maximisation (me-max) term. facebookresearch/msn: src/msn_train.py,
src/losses.py, src/deit.py and configs/pretrain/msn_vits16.yaml."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability
from ssl_lab.errors import UserError
from ssl_lab.methods.base import Method
from ssl_lab.methods.mae import random_masking
from ssl_lab.methods.parts import MomentumTeacher, MultiCrop, check_vit, sinkhorn, vit_tokens


def msn_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """deit.py's `fc` with use_bn: Linear-BN-GELU twice, then a Linear, every Linear with a bias,
    weights truncated-normal (std 0.02) and biases 0 (msn_train.py's init_model)."""
    head = nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, out_dim),
    )  # fmt: skip
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


def msn_loss(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float = 0.1,
    sharpen: float = 0.25,
    sinkhorn_iterations: int = 3,
    me_max_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """losses.py's init_msn_loss: the anchors' soft assignments p = softmax(cos(anchor, prototypes) / T)
    ([A*B, K], A anchor views of the B images, view-major), the targets' sharpened ones
    softmax(cos(target, prototypes) / (T * sharpen)) (p^(1/sharpen), renormalised) balanced by
    `sinkhorn_iterations` of Sinkhorn-Knopp over the global batch (0: none) and repeated for each anchor
    view; the cross entropy H(target, p) averaged over the anchors, plus `me_max_weight` x
    (sum m log m + log K), m the mean assignment over the anchors of the global batch.

    Returns the loss, the me-max term and the number of prototypes the targets of the global batch use
    (their argmax's distinct values, the official log's `np`), all in fp32 with autocast off."""
    with torch.autocast(anchors.device.type, enabled=False):
        protos = F.normalize(prototypes.float(), dim=1)
        logits = F.normalize(anchors.float(), dim=1) @ protos.T / temperature
        log_p = F.log_softmax(logits, dim=1)
        with torch.no_grad():
            t_logits = F.normalize(targets.float(), dim=1) @ protos.T / (temperature * sharpen)
            if sinkhorn_iterations:  # Sinkhorn-Knopp from the sharpened softmax: exp of its log
                t = sinkhorn(F.log_softmax(t_logits, dim=1), 1.0, sinkhorn_iterations)
            else:
                t = F.softmax(t_logits, dim=1)
            t = t.repeat(anchors.shape[0] // targets.shape[0], 1)
        cross = -(t * log_p).sum(dim=1).mean()
        # the mean assignment over every process's anchors, with gradients to each (the official
        # AllReduce passes the gradient through unscaled, so under DDP's averaging its me-max term
        # weighs 1 / world size; here it weighs the same on 1 and N processes)
        mean_p = distributed.gather_with_grad(log_p.exp().mean(dim=0, keepdim=True)).mean(dim=0)
        me_max = (mean_p * mean_p.clamp_min(1e-12).log()).sum() + math.log(mean_p.shape[0])
        hit = torch.zeros(t.shape[1], device=t.device).index_fill_(0, t.argmax(dim=1), 1.0)
        used = (distributed.total(hit) > 0).sum()
        return cross + me_max_weight * me_max, me_max.detach(), used


class MSN(Method):
    name = "msn"
    evaluated = "teacher.backbone"  # logistic_eval.py reads the target encoder
    evaluated_head = "teacher.projector"

    def __init__(
        self,
        backbone: nn.Module,
        num_prototypes: PositiveInt = 1024,
        proj_hidden_dim: PositiveInt = 2048,
        proj_output_dim: PositiveInt = 256,
        temperature: PositiveFloat = 0.1,
        sharpen_temperature: PositiveFloat = 0.25,
        sinkhorn_iterations: NonNegativeInt = 3,
        me_max_weight: NonNegativeFloat = 1.0,
        mask_ratio: Probability = 0.15,
        momentum_base: Probability = 0.996,
        momentum_end: Probability = 0.9992,
        clip_grad: NonNegativeFloat = 3.0,
        num_local_crops: NonNegativeInt = 0,
        local_crop_size: PositiveInt | None = None,
        local_crop_scale: Sequence[float] = (0.05, 0.3),
        global_crop_scale: Sequence[float] | None = None,
        name: str = "msn",
    ) -> None:
        """msn_vits16.yaml's defaults: 1024 prototypes of 256 dimensions, a 2048-wide projector,
        temperature 0.1, targets sharpened at 0.25 and balanced by 3 Sinkhorn-Knopp iterations, me-max
        weight 1, 15 % of the anchor view's patches dropped, a target network at momentum linear from
        0.996 to 0.9992 (msn_train.py's 0.996 -> 1 over 1.25x the steps, of which training runs the
        first 0.8), gradients clipped to 3 over the encoder and projector; focal views (multi-crop): 10 at 96 px, scale
        0.05-0.3, the random views 0.3-1."""
        check_vit(backbone, "msn")  # the anchor view drops patch tokens
        super().__init__(backbone, concat_views=True)
        self.num_patches = backbone.patch_embed.num_patches
        self.keep = int(self.num_patches * (1 - mask_ratio))  # deit.py's T_H
        if not 1 <= self.keep <= self.num_patches:
            raise UserError(
                f"method.mask_ratio={mask_ratio} keeps {self.keep} of the {self.num_patches} patches of the "
                "anchor view: it must keep at least one (MSN: 0.15 for ViT-S/16)"
            )
        self.temperature, self.sharpen, self.iterations = (
            temperature,
            sharpen_temperature,
            sinkhorn_iterations,
        )
        self.me_max_weight, self.clip_grad = me_max_weight, clip_grad
        self.crops = MultiCrop(backbone, num_local_crops, local_crop_size, local_crop_scale, global_crop_scale,
                               ("MSN", "0.05-0.3 and 0.3-1"))  # fmt: skip
        self.projector = msn_projector(self.num_features, proj_hidden_dim, proj_output_dim)
        bound = proj_output_dim**-0.5  # msn_train.py: uniform in +-1/sqrt(output_dim)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, proj_output_dim).uniform_(-bound, bound))
        self.teacher = MomentumTeacher(self.students(), momentum_base, momentum_end, linear=True)

    def students(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "projector": self.projector}

    def check_batch(self, batch_size: int) -> None:
        if self.iterations and batch_size < 2:
            raise UserError(
                f"method.sinkhorn_iterations={self.iterations}: Sinkhorn-Knopp balances assignments over a "
                f"batch, batch_size={batch_size} has one image; raise batch_size or set method.sinkhorn_iterations=0"
            )

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """The target view, the anchor view, the focal views, then the noise that picks the patches
        the anchor view keeps (per sample: the official code drops the same patches for a whole batch)."""
        return [*self.crops.views(draw), draw.noise(self.num_patches)]

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        target_view, anchor_view, *focal, noise = views
        if noise.shape[1] != self.num_patches:
            raise UserError(
                f"method=msn: the anchor view is {anchor_view.shape[-1]} px but the ViT was built for "
                f"{self.num_patches} patches; set backbone.image_size to the augmentation's size"
            )
        keep, _, _ = random_masking(noise, self.keep)
        anchors = [self.projector(vit_tokens(self.backbone, anchor_view, keep=keep).pooled)]
        anchors += self.embed_views(focal, self.projector) if focal else []  # focal views: unmasked
        with torch.no_grad():
            target = self.teacher.projector(self.teacher.backbone(target_view))
        loss, me_max, used = msn_loss(
            torch.cat(anchors), target, self.prototypes, self.temperature, self.sharpen, self.iterations,
            self.me_max_weight,
        )  # fmt: skip
        return {
            "loss": loss,
            "me_max": me_max,
            "prototypes_used": used,
            "momentum": self.teacher.momentum.clone(),
        }

    def param_groups(self) -> list[dict[str, Any]]:
        """The prototypes in a group of their own without weight decay (msn_train.py), the rest in one."""
        rest = [(n, p) for n, p in self.named_parameters() if p.requires_grad and n != "prototypes"]
        return [
            {"params": rest},
            {"name": "prototypes", "params": [("prototypes", self.prototypes)], "no_decay": True},
        ]

    def after_backward(self, step: int, epoch: int) -> None:
        """The encoder's gradients (the ViT and its projector, deit.py's `fc`) clipped to clip_grad by
        their norm together (msn_train.py; 0: off), the prototypes' not."""
        if self.clip_grad:
            params = [p for m in self.students().values() for p in m.parameters()]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad, foreach=True)

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update(self.students(), step, total_steps)
