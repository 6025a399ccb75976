"""DINO (Caron et al., 2021): self-distillation with no labels. A student matches, on every view, the
centred and sharpened output of a momentum teacher on the other global views (facebookresearch/dino,
main_dino.py and vision_transformer.py; solo-learn's CIFAR recipe for the defaults it names)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import MomentumTeacher, MultiCrop


class Prototypes(nn.Linear):
    """DINO's weight-normalised last layer without bias: each output is a row of the weight scaled to
    unit norm, times `scale` when it is learnt (norm_last_layer=false), else times 1. The same function
    and gradients as torch's weight_norm with g fixed at 1 (the official DINOHead's, lightly's
    DINOProjectionHead's), written as F.linear on the normalised weight so that torch.compile traces it
    in one graph (weight_norm's parametrisation hook breaks it). In fp32 with autocast off: at the
    teacher's temperature 0.04 a bf16 cosine would be resolved to ~0.2 in logit units."""

    def __init__(self, in_features: int, out_features: int, norm: bool = True) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = None if norm else nn.Parameter(torch.ones(out_features, 1))  # weight_norm's g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            w = F.normalize(self.weight.float(), dim=1)
            return F.linear(x.float(), w if self.scale is None else self.scale * w)


class DINOHead(nn.Module):
    """The official DINOHead: an MLP (Linear-GELU x2, then Linear to the bottleneck; BN after the hidden
    Linears only with `use_bn`), L2 normalisation, then the prototypes. `mlp` is what fine-tuning may
    start from (its GELUs count the hidden layers)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_prototypes: int = 65536,
        layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim, *[hidden_dim] * (layers - 1), bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            blocks.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                blocks += [nn.BatchNorm1d(d_out), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = nn.Sequential(*blocks)
        for m in self.mlp.modules():  # the official init; the last layer keeps nn.Linear's own
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = Prototypes(bottleneck_dim, num_prototypes, norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x).float(), dim=-1))


def dino_loss(
    teacher_out: Sequence[torch.Tensor],
    student_out: Sequence[torch.Tensor],
    center: torch.Tensor,
    teacher_temp: torch.Tensor | float,
    student_temp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official DINOLoss: the cross entropy between the teacher's centred, sharpened softmax on each
    global view t and the student's log-softmax on each view s != t (views in the same order, the
    global ones first), averaged over those pairs and the batch. Also returns the teacher distribution's
    mean entropy (detached): near 0 when it collapses to one prototype, near log K when uniform."""
    with torch.autocast(student_out[0].device.type, enabled=False):
        t = torch.stack([o.detach().float() for o in teacher_out])  # [T, B, K]
        s = torch.stack([o.float() for o in student_out])  # [S, B, K]
        t_logp = F.log_softmax((t - center) / teacher_temp, dim=-1)
        q = t_logp.exp()
        cross = -torch.einsum("tbk,sbk->ts", q, F.log_softmax(s / student_temp, dim=-1))  # summed over b
        n_t, n_s, batch = t.shape[0], s.shape[0], t.shape[1]
        other = 1 - torch.eye(n_t, n_s, device=cross.device)  # no view is its own target
        loss = (cross * other).sum() / ((n_t * n_s - min(n_t, n_s)) * batch)
        entropy = -(q * t_logp).sum(-1).mean()
    return loss, entropy.detach()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> None:
    """center <- m center + (1 - m) mean of the teacher's outputs over the GLOBAL batch: the sum
    all-reduced, over the global number of rows (main_dino.py; solo-learn PR #59)."""
    rows = teacher_out.shape[0] * distributed.world_size()
    batch_center = distributed.total(teacher_out.float().sum(0, keepdim=True)) / rows
    center.mul_(momentum).add_(batch_center.to(center.device), alpha=1 - momentum)


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
            {"backbone": self.backbone, "head": self.head}, momentum_base, momentum_end
        )
        for module in self.teacher.modules():  # the official teacher is built without stochastic depth
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        self.register_buffer("center", torch.zeros(1, num_prototypes))  # saved: a resume restores it

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """Two global views, then `num_local_crops` local ones of one size (one backbone pass)."""
        return self.crops.views(draw)

    def teacher_temperature(self) -> torch.Tensor:
        """Linear from warmup_teacher_temp to teacher_temp over the first warmup_teacher_temp_epochs
        epochs, reached at the last of them (main_dino.py's np.linspace), then constant; a tensor read
        from the progress, so a compiled step does not recompile."""
        epoch = self.epoch_now().float()
        span = max(self.warmup_teacher_temp_epochs - 1, 1)
        ramp = self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * epoch / span
        return torch.where(epoch < self.warmup_teacher_temp_epochs, ramp, self.teacher_temp)

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
        if self.clip_grad:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norms = torch._foreach_norm(grads)
            scales = [(self.clip_grad / (n + 1e-6)).clamp(max=1.0) for n in norms]
            torch._foreach_mul_(grads, scales)
        if epoch < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update({"backbone": self.backbone, "head": self.head}, step, total_steps)
