"""MoCo v3 (Chen, Xie & He, 2021, "An Empirical Study of Training Self-Supervised Vision Transformers"):
the student's predictions of one view against the momentum teacher's keys of the other view, an N-way
InfoNCE over the global batch with no queue; the teacher is an EMA of the student's backbone and
projector. Read against facebookresearch/moco-v3 (moco/builder.py, main_moco.py) and solo-learn's
solo/methods/mocov3.py, which agree on all of what follows.

The loss is the sum of the two directions, not their mean, as both codes (and the paper's Algorithm 1):
the learning rates of their recipes are set for it. The teacher moves after each optimizer step, as
solo-learn's; the official code moves it at the start of the next forward, which gives the same
teachers with the momentum schedule one step later."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import PositiveFloat, PositiveInt, Probability
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import MomentumTeacher, mlp


def moco_xent(q: torch.Tensor, k: torch.Tensor, temperature: float, gather: bool = False) -> torch.Tensor:
    """The official `contrastive_loss(q, k)`: cross entropy of each query q_i against every key of the
    global batch, its own k_i the target, times 2T (the paper's Algorithm 1: it keeps the gradient's size
    about the same whatever T). Keys carry no gradient; with `gather` they come from every process (a
    gather without gradient, as the official concat_all_gather) and each local row's target sits at its
    rank's offset.

    Not lightly's NTXentLoss(memory_bank_size=0), which lightly's maintainers suggest for MoCo v3
    (lightly #1190; lightly has no MoCo v3 example): that is SimCLR's 2N-way loss, with the same-view
    pairs q_i.q_j and k_i.k_j as extra negatives and the keys as anchors too. This one is N-way: only
    the keys are candidates. It equals, row by row, lightly's MoCo InfoNCE, NTXentLoss with a memory
    bank holding the other keys (tests/test_mocov3.py)."""
    # fp32 with autocast off, as nt_xent: bf16 logits at T=0.2 are resolved to ~0.03.
    with torch.autocast(q.device.type, enabled=False):
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
        n = q.shape[0]
        keys = distributed.gather(k) if gather else k
        rows = torch.arange(n, device=q.device) + (distributed.rank() * n if gather else 0)
        return F.cross_entropy(q @ keys.T / temperature, rows) * (2 * temperature)


class MoCoV3(Method):
    name = "mocov3"

    def __init__(
        self,
        backbone: nn.Module,
        temperature: PositiveFloat = 0.2,
        momentum: Probability = 0.99,
        momentum_end: Probability = 1.0,
        proj_hidden_dim: PositiveInt = 4096,
        proj_output_dim: PositiveInt = 256,
        proj_layers: PositiveInt = 2,
        pred_hidden_dim: PositiveInt = 4096,
        pred_last_bn: bool | None = None,
        freeze_patch_embed: bool = False,
        gather_distributed: bool = True,
        concat_views: bool = False,
        name: str = "mocov3",
    ) -> None:
        super().__init__(backbone, concat_views)
        self.temperature, self.gather = temperature, gather_distributed
        # The official heads (moco/builder.py, _build_mlp): no Linear has a bias; BN after every Linear
        # of the projector, the last one without affine; 2 layers for ResNets, 3 for ViTs.
        dims = [self.num_features, *[proj_hidden_dim] * (proj_layers - 1), proj_output_dim]
        self.projector = mlp(dims, last_bn=True, last_affine=False)
        # The predictor, 2 layers: the official ViT one ends in the projector's affine-free BN, the
        # ResNet one in a bare Linear (null: as the official code, with the 3-layer ViT projector).
        last_bn = proj_layers > 2 if pred_last_bn is None else pred_last_bn
        self.predictor = mlp(
            [proj_output_dim, pred_hidden_dim, proj_output_dim], last_bn, last_affine=False, last_bias=False
        )  # the official predictor's last Linear has no bias, with or without its BN
        if freeze_patch_embed:  # the paper's random patch projection (--stop-grad-conv1), ViTs only
            patch_embed = getattr(backbone, "patch_embed", None)
            if patch_embed is None:
                raise ValueError(f"freeze_patch_embed: {type(backbone).__name__} has no patch_embed")
            patch_embed.requires_grad_(False)
        # The teacher: backbone and projector, EMA per optimizer step, cosine from `momentum` to
        # momentum_end (the paper's 0.99 to 1, main_moco.py --moco-m-cos; equal: a fixed momentum).
        self.teacher = MomentumTeacher(
            {"backbone": self.backbone, "projector": self.projector}, momentum, momentum_end
        )

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        q1, q2 = self.per_view(lambda x: self.predictor(self.projector(self.backbone(x))), views)
        with torch.no_grad():
            k1, k2 = self.per_view(lambda x: self.teacher.projector(self.teacher.backbone(x)), views)
        t, g = self.temperature, self.gather
        # Summed, as the official code and solo-learn: the lr recipes are tuned on the sum.
        loss = moco_xent(q1, k2, t, g) + moco_xent(q2, k1, t, g)
        # the momentum of the teacher that made these keys; a copy: the buffer changes after the step
        return {"loss": loss, "momentum": self.teacher.momentum.clone()}

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update({"backbone": self.backbone, "projector": self.projector}, step, total_steps)
