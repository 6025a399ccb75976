"""Parts that methods share: heads, losses and the momentum teacher, each small and tested against
lightly's or a hand-computed value (tests/test_parts.py). Losses are fp32 with autocast off: under bf16
the logits at T=0.1 would be resolved to ~0.05."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

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


class MomentumTeacher(nn.Module):
    """Frozen copies of student modules, e.g. `MomentumTeacher({"backbone": b, "projector": p}, 0.99)`
    (then `teacher.backbone`, `teacher.projector`), moved towards the students after each optimizer
    step: teacher = tau teacher + (1 - tau) student, on the parameters (buffers, such as batch norm's
    statistics, are the teacher's own, as in BYOL's, lightly's and solo-learn's code). `momentum`, the
    last tau, is a buffer: saved with the model, and a method can log it."""

    def __init__(self, students: dict[str, nn.Module], base: float, end: float = 1.0) -> None:
        super().__init__()
        for name, module in students.items():
            self.add_module(name, copy.deepcopy(module))
        self.requires_grad_(False)
        self.base, self.end = base, end
        self.register_buffer("momentum", torch.tensor(float(base)))

    @torch.no_grad()
    def update(self, students: dict[str, nn.Module], step: int, total_steps: int) -> None:
        tau = cosine_momentum(step, total_steps, self.base, self.end)
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
    """Multi-crop views (DINO, SwAV): two global views, then `num_local` local ones of `local_size` px
    (one backbone pass), their settings checked once, at construction. `paper` names the paper and its
    settings in the errors (e.g. "DINO", "0.05-0.4 and 0.4-1")."""

    def __init__(
        self,
        backbone: nn.Module,
        num_local: int,
        local_size: int | None,
        local_scale: Sequence[float],
        global_scale: Sequence[float] | None,
        paper: tuple[str, str],
    ) -> None:
        self.num_local, self.local_size = num_local, local_size
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
        return [draw(**glob), draw(**glob), *(draw(**local) for _ in range(self.num_local))]
