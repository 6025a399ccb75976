"""Parts that methods share: heads, losses, the momentum teacher and a ViT's tokens with masking, each
small and tested against lightly's or a hand-computed value (tests/test_parts.py). Losses are fp32 with autocast off: under bf16
the logits at T=0.1 would be resolved to ~0.05."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.errors import UserError

# ---------------------------------------------------------------------------- heads


def mlp(
    dims: list[int], last_bn: bool = False, last_affine: bool = True, last_bias: bool = True
) -> nn.Sequential:
    """Linear-BN-ReLU blocks through `dims`; the last Linear has no ReLU (and BN only if `last_bn`,
    without its learnable scale and shift if not `last_affine`: MoCo v3's and SimSiam's projectors).
    Linears followed by BN have no bias, as in lightly's heads; nor has the last one if not
    `last_bias` (MoCo v3's predictor without its last BN)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(d_in, d_out, bias=last and not last_bn and last_bias))
        if not last or last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=not last or last_affine))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------- losses


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float, gather: bool = False) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy. Row i of z0 and row i of z1 are positives;
    every other of the 2N embeddings is a negative (the same loss as lightly's NTXentLoss).

    With `gather`, the negatives come from every process: embeddings are gathered with their
    gradients, and each local row's positive sits at its rank's offset in the gathered batch."""
    # In fp32 with autocast off: under bf16 the logits at T=0.1 would be resolved to ~0.05.
    with torch.autocast(z0.device.type, enabled=False):
        z0, z1 = F.normalize(z0.float(), dim=1), F.normalize(z1.float(), dim=1)
        n = z0.shape[0]
        all0, all1 = (
            (distributed.gather_with_grad(z0), distributed.gather_with_grad(z1)) if gather else (z0, z1)
        )
        total = all0.shape[0]
        rows = torch.arange(n, device=z0.device) + (distributed.rank() * n if gather else 0)
        logits = torch.cat([z0, z1]) @ torch.cat([all0, all1]).T / temperature  # [2n, 2N]
        own = torch.cat([rows, rows + total])  # a view is not its own negative: masked by comparison,
        # not by indexed assignment (whose Python-scalar value is copied to the GPU and syncs the host)
        own_column = torch.arange(2 * total, device=z0.device) == own[:, None]
        logits = logits.masked_fill(own_column, float("-inf"))
        return F.cross_entropy(logits, torch.cat([rows + total, rows]))


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-cos(p, z) averaged over the batch, `z` detached (the stop-gradient of BYOL and SimSiam);
    lightly's NegativeCosineSimilarity on (p, z.detach()). BYOL's loss 2 - 2 cos is 2 + 2 x this."""
    with torch.autocast(p.device.type, enabled=False):
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def off_diagonal_squares(c: torch.Tensor) -> torch.Tensor:
    """The sum of the squares of a square matrix's off-diagonal entries, without a boolean mask (a mask's
    indexing syncs the host on a GPU): Barlow Twins' and VICReg's redundancy terms."""
    return c.pow(2).sum() - torch.diagonal(c).pow(2).sum()


# ---------------------------------------------------------------------------- self-distillation
# DINO's head and loss, shared by the methods that distil a momentum teacher's softmax over prototypes
# (DINO, iBOT; facebookresearch/dino main_dino.py and vision_transformer.py).


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
        t_logp = F.log_softmax((t - center) / teacher_temp, dim=-1)
        q = t_logp.exp()
        entropy = -(q * t_logp).sum(-1).mean()
    return cross_view_loss(q, student_out, student_temp), entropy.detach()


def cross_view_loss(
    targets: torch.Tensor, student_out: Sequence[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """The cross entropy between each teacher view's target distribution (`targets` [T, B, K]: DINO's
    centred softmax, DINOv2's Sinkhorn-Knopp assignments) and the student's log-softmax on each view
    s != t (views in the same order, the global ones first), averaged over those pairs and the batch."""
    with torch.autocast(student_out[0].device.type, enabled=False):
        s = torch.stack([o.float() for o in student_out])  # [S, B, K]
        cross = -torch.einsum(
            "tbk,sbk->ts", targets.detach().float(), F.log_softmax(s / student_temp, dim=-1)
        )
        n_t, n_s, batch = targets.shape[0], s.shape[0], targets.shape[1]
        other = 1 - torch.eye(n_t, n_s, device=cross.device)  # no view is its own target
        return (cross * other).sum() / ((n_t * n_s - min(n_t, n_s)) * batch)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """The KoLeo regulariser (Sablayrolles et al. 2019; dinov2/loss/koleo_loss.py, lightly's KoLeoLoss):
    -mean log(distance of each l2-normalised row to its nearest other row + eps), the neighbours sought
    among the rows of every process (gathered with their gradients), so that it is the same on 1 and N
    processes (DINOv2's is per GPU, so its value depends on their number). fp32, autocast off. Also returns
    the smallest nearest-neighbour distance (detached): near 0, two rows coincide (a duplicate image, or
    a batch too small), -log(eps) caps the loss and its gradient explodes (dinov2 #314, #492)."""
    with torch.autocast(x.device.type, enabled=False):
        z = F.normalize(x.float(), dim=-1, eps=eps)
        everyone = distributed.gather_with_grad(z)
        n = z.shape[0]
        rows = torch.arange(n, device=z.device) + distributed.rank() * n
        dots = z @ everyone.T
        dots = dots.masked_fill(torch.arange(everyone.shape[0], device=z.device) == rows[:, None], -2.0)
        nearest = everyone[dots.argmax(dim=1)]
        distances = F.pairwise_distance(z, nearest, p=2, eps=eps)
        return -(distances + eps).log().mean(), distances.min().detach()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> None:
    """center <- m center + (1 - m) mean of the teacher's outputs over the GLOBAL batch: the sum
    all-reduced, over the global number of rows (main_dino.py; solo-learn PR #59)."""
    rows = teacher_out.shape[0] * distributed.world_size()
    batch_center = distributed.total(teacher_out.float().sum(0, keepdim=True)) / rows
    center.mul_(momentum).add_(batch_center.to(center.device), alpha=1 - momentum)


def clip_each_gradient(module: nn.Module, max_norm: float) -> None:
    """Each parameter's gradient clipped to `max_norm` on its own (main_dino.py's clip_gradients; 0:
    off), without a host sync."""
    if not max_norm:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    weight: torch.Tensor | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """main_swav.py's distributed_sinkhorn on scores [..., N, K] (N embeddings' cosines to K prototypes;
    leading dimensions: several views at once): soft assignments, each row summing to 1, each prototype
    getting an equal share of all rows. The sums over rows are all-reduced, so the rows of every process
    make one problem (lightly #1006); each row's own normalisation is local. Only the first `rows` rows'
    assignments are returned (all by default): the batch's, not the queue's.

    `weight` [N], 1 or 0: which rows take part. A row of weight 0 (a queue not yet filled) adds nothing
    to the prototypes' sums: every weighted row gets what it would without the others, and no 0/0.

    The same iterations as the official code, kept as scalings of exp(scores / eps), Q = diag(c) P
    diag(r) (c per row, r per prototype), so each iteration reads P twice (two matrix-vector products)
    instead of rewriting it: with a queue of 3840 rows and 3000 prototypes P is 46 MB a view."""
    with torch.autocast(scores.device.type, enabled=False):
        p = (scores.float() / epsilon).exp_()  # [..., N, K]: the paper's Q, transposed
        w = p.new_ones(p.shape[-2]) if weight is None else weight.to(p.dtype)
        k, tiny = p.shape[-1], torch.finfo(p.dtype).tiny
        # one all-reduce: each prototype's mass over the weighted rows of all processes, and their number
        first = distributed.total(torch.cat([(w @ p).reshape(-1), w.sum().reshape(1)]))
        mass, b = first[:-1].reshape(*p.shape[:-2], k), first[-1]
        r = mass.sum(-1, keepdim=True) / mass / k  # Q / sum(Q), then each prototype 1/K of the mass
        for _ in range(iterations - 1):
            c = w / ((p @ r.unsqueeze(-1)).squeeze(-1).clamp_min(tiny) * b)  # each row: 1/B
            r = 1 / (distributed.total((c.unsqueeze(-2) @ p).squeeze(-2)) * k)  # each prototype: 1/K
        p = p if rows is None else p[..., :rows, :]
        q = p * r.unsqueeze(-2)  # the last rows' normalisation, times B: each row sums to 1
        return q / q.sum(-1, keepdim=True).clamp_min(tiny)


def warmup_temperature(epoch: torch.Tensor, start: float, end: float, epochs: int) -> torch.Tensor:
    """A teacher temperature linear from `start` to `end` over the first `epochs` epochs, reached at the
    last of them (main_dino.py's np.linspace), then constant; `epoch` a tensor (the progress), so a
    compiled step does not recompile."""
    epoch = epoch.float()
    ramp = start + (end - start) * epoch / max(epochs - 1, 1)
    return torch.where(epoch < epochs, ramp, torch.full_like(ramp, end))


# ---------------------------------------------------------------------------- queues


def check_queue_fits(queue_size: int, batch_size: int, optional: bool = False) -> None:
    """A UserError if the keys of one step (the global batch) do not fit in a queue of `queue_size`:
    they would overwrite each other. `optional`: the method runs without a queue at size 0."""
    if batch_size > queue_size:
        raise UserError(
            f"method.queue_size={queue_size} is smaller than batch_size={batch_size}, which each step adds "
            f"to it: set method.queue_size to at least {batch_size}"
            + (", or 0 for no queue" if optional else "")
        )


class Queue(nn.Module):
    """A FIFO queue of `size` embeddings (NNCLR's support set, MoCo's negatives); buffers, so it travels
    in checkpoints. Random unit vectors until filled, as in lightly, solo-learn and MoCo's code. Every
    process pushes the keys of every process (gathered), so all hold the same queue whatever their
    number."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def check_batch(self, batch_size: int) -> None:
        """Called from the method's check_batch, before the run writes anything."""
        check_queue_fits(len(self.queue), batch_size)

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> None:
        """Overwrite the oldest entries with z's rows, on the device: no host sync."""
        size, n = self.queue.shape[0], z.shape[0]
        idx = (self.ptr + torch.arange(n, device=z.device)) % size
        self.queue[idx] = z.detach().to(self.queue.dtype)
        self.ptr.copy_((self.ptr + n) % size)


# ---------------------------------------------------------------------------- momentum teacher


def cosine_momentum(step: int, total_steps: int, base: float, end: float = 1.0) -> float:
    """BYOL's schedule (its eq. before sec. 3.2): tau = end - (end - base) (cos(pi k / K) + 1) / 2 at
    optimizer step k of K, from `base` at the first step to `end` at the last; lightly's
    `cosine_schedule`. K is the run's real number of optimizer steps (solo-learn's users saw tau reach
    1.0 within a few epochs when it was not: solo-learn #248)."""
    if total_steps <= 1:
        return end
    return end - (end - base) * (math.cos(math.pi * step / (total_steps - 1)) + 1) / 2


def linear_momentum(step: int, total_steps: int, base: float, end: float = 1.0) -> float:
    """tau linear from `base` at the first optimizer step to `end` at the last (MSN's and I-JEPA's
    momentum_scheduler)."""
    if total_steps <= 1:
        return end
    return base + (end - base) * step / (total_steps - 1)


class MomentumTeacher(nn.Module):
    """Frozen copies of student modules, e.g. `MomentumTeacher({"backbone": b, "projector": p}, 0.99)`
    (then `teacher.backbone`, `teacher.projector`), moved towards the students after each optimizer
    step: teacher = tau teacher + (1 - tau) student, on the parameters (buffers, such as batch norm's
    statistics, are the teacher's own, as in BYOL's, lightly's and solo-learn's code). `momentum`, the
    last tau, is a buffer: saved with the model, and a method can log it."""

    def __init__(
        self,
        students: dict[str, nn.Module],
        base: float,
        end: float = 1.0,
        drop_path: bool = True,
        linear: bool = False,
    ) -> None:
        """`drop_path=False`: the copies without stochastic depth (timm's DropPath), as DINO, iBOT and
        DINOv2 build their teachers. `linear`: tau linear from `base` to `end` (MSN, I-JEPA) instead of
        BYOL's cosine."""
        super().__init__()
        for name, module in students.items():
            self.add_module(name, copy.deepcopy(module))
        self.requires_grad_(False)
        for module in self.modules() if not drop_path else ():
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        self.base, self.end = base, end
        self.schedule = linear_momentum if linear else cosine_momentum
        self.register_buffer("momentum", torch.tensor(float(base)))

    @torch.no_grad()
    def update(self, students: dict[str, nn.Module], step: int, total_steps: int) -> None:
        tau = self.schedule(step, total_steps, self.base, self.end)
        teacher = [p for name in students for p in self.get_submodule(name).parameters()]
        student = [p.detach() for module in students.values() for p in module.parameters()]
        torch._foreach_mul_(teacher, tau)
        torch._foreach_add_(teacher, student, alpha=1 - tau)
        self.momentum.fill_(tau)


# ---------------------------------------------------------------------------- multi-crop


def crop_scale(key: str, value: Sequence[float] | None) -> tuple[float, float] | None:
    if value is None:
        return None
    if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
        raise UserError(f"method.{key}={list(value)} must be [min, max] with 0 < min <= max <= 1")
    return float(value[0]), float(value[1])


class MultiCrop:
    """Multi-crop views (DINO, SwAV): `num_global` global views (two), then `num_local` local ones of
    `local_size` px (one backbone pass), their settings checked once, at construction. `paper` names the
    paper and its settings in the errors (e.g. "DINO", "0.05-0.4 and 0.4-1")."""

    def __init__(
        self,
        backbone: nn.Module,
        num_local: int,
        local_size: int | None,
        local_scale: Sequence[float],
        global_scale: Sequence[float] | None,
        paper: tuple[str, str],
        num_global: int = 2,
    ) -> None:
        self.num_global, self.num_local, self.local_size = num_global, num_local, local_size
        self.local_scale = crop_scale("local_crop_scale", local_scale)
        self.global_scale = crop_scale("global_crop_scale", global_scale)
        if num_local:
            self.check(backbone, *paper)

    def check(self, backbone: nn.Module, name: str, scales: str) -> None:
        if self.local_size is None:
            raise UserError(
                f"method.num_local_crops={self.num_local} needs method.local_crop_size, the local "
                f"crops' side in pixels ({name}: 96 for 224 px images; e.g. 16 for 32 px)"
            )
        local, glob = self.local_scale, self.global_scale
        if glob is not None and (local[0] > glob[0] or local[1] > glob[1]):
            raise UserError(
                f"method.local_crop_scale={list(local)} lies above method.global_crop_scale={list(glob)}: "
                f"local crops are the smaller ones ({name}: {scales})"
            )
        if getattr(backbone, "dynamic_img_size", None) is False:  # a timm ViT with a fixed input grid
            raise UserError(
                f"method.num_local_crops={self.num_local}: this backbone takes one image size only; "
                "use backbone.kwargs.dynamic_img_size=true (timm interpolates the position embedding)"
            )

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        glob = {} if self.global_scale is None else {"crop_scale": self.global_scale}
        local = {"size": self.local_size, "crop_scale": self.local_scale}
        return [
            *(draw(**glob) for _ in range(self.num_global)),
            *(draw(**local) for _ in range(self.num_local)),
        ]


# ---------------------------------------------------------------------------- a ViT's tokens


class Tokens(NamedTuple):
    """A timm ViT's output tokens, named: `cls` [B, D] (None without a class token), `registers`
    [B, R, D] (timm's reg_tokens: 0 unless the backbone has them), `patches` [B, N, D] (the kept ones
    when patches were dropped, in the order kept), `pooled` [B, D] (the backbone's own pooling, what
    evaluation reads), and `sequence` [B, prefix + N, D], all of them as the blocks gave them, after
    the final norm."""

    cls: torch.Tensor | None
    registers: torch.Tensor
    patches: torch.Tensor
    pooled: torch.Tensor
    sequence: torch.Tensor


def check_vit(backbone: nn.Module, method: str) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise UserError(
            f"method={method} needs a ViT backbone (it works on patch tokens), got {type(backbone).__name__}: "
            "use backbone=vit_tiny, backbone=vit_small or a timm vit_* model"
        )


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """An additive attention mask [B, 1, 1, L] from `valid` [B, L] (False: a padding token no query may
    attend to): 0 or -inf, in fp32, which timm's Block (from timm 1.0.16) adds to the attention scores
    on its fused (scaled_dot_product_attention) and plain paths alike; a boolean mask would be added as
    0/1 by timm's plain path before 1.0.26. Every row must keep a valid token."""
    zero = torch.zeros((), device=valid.device)
    return torch.where(valid, zero, torch.full_like(zero, float("-inf")))[:, None, None, :]


def vit_tokens(
    vit: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> Tokens:
    """timm's VisionTransformer.forward_features with the patches masked, as the masked-image methods
    need: `mask` [B, N] (True: masked) puts `mask_token` [1, D] in the masked patches' places before
    the position embedding is added (iBOT, DINOv2, SimMIM; lightly's MaskedVisionTransformerTIMM
    with `mask`); `keep` [B, K] indices of the patches to keep, the others dropped after it (MAE,
    I-JEPA's context). The prefix tokens ([CLS], registers) are always kept.

    `valid` [B, K] (with `keep`; True: a real token): images keeping different numbers of patches in
    one fixed-shape batch, the padding slots hidden from every token's attention (`key_padding_mask`),
    so each image's real tokens come out as if encoded alone (I-JEPA's context blocks)."""
    x = vit.patch_embed(images)  # [B, N, D], or [B, H, W, D] with dynamic_img_size
    if mask is not None:
        if mask_token is None:
            raise ValueError("vit_tokens: a mask needs a mask_token")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        x = torch.where(mask.unsqueeze(-1), mask_token.to(flat.dtype).view(1, 1, -1), flat).view(x.shape)
    x = vit._pos_embed(x)  # the prefix tokens, then every patch, position embedding added
    prefix = vit.num_prefix_tokens
    if keep is not None:
        kept = torch.gather(x[:, prefix:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], kept], dim=1)
    x = vit.norm_pre(vit.patch_drop(x))
    if valid is None:
        x = vit.blocks(x)
    else:
        prefix_valid = torch.ones(x.shape[0], prefix, dtype=torch.bool, device=x.device)
        attn_mask = key_padding_mask(torch.cat([prefix_valid, valid], dim=1))
        for block in vit.blocks:
            x = block(x, attn_mask=attn_mask)
    x = vit.norm(x)
    cls = 1 if vit.cls_token is not None else 0
    return Tokens(
        x[:, 0] if cls else None, x[:, cls:prefix], x[:, prefix:], vit.forward_head(x, pre_logits=True), x
    )
