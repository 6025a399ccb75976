"""SwAV (Caron et al., 2020): swapping assignments between views. Each view's projection, on the unit
sphere, is scored against prototypes; Sinkhorn-Knopp turns each global view's scores into soft
assignments that share the batch equally among the prototypes, and every other view predicts them
(facebookresearch/swav, main_swav.py and src/resnet50.py; solo-learn's solo/methods/swav.py and its CIFAR
recipe for the defaults it names)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import NonNegativeInt, PositiveFloat, PositiveInt
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import MultiCrop, check_queue_fits, mlp, sinkhorn


def swav_loss(
    scores: Sequence[torch.Tensor],
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    num_global: int = 2,
    queue_scores: torch.Tensor | None = None,
    queue_weight: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """SwAV's loss (main_swav.py; lightly's SwaVLoss): for each of the first `num_global` views i, the
    Sinkhorn assignments q_i of its scores (with `queue_scores[i]`, the scores of view i's past
    embeddings, as more rows of the problem, weighted by `queue_weight`), without gradient, are the
    targets of every other view v's softmax(scores_v / T): the cross entropy averaged over the batch,
    over v != i, then over i. `scores`: each view's cosines to the prototypes [n, K], global views
    first. In fp32 with autocast off: at T 0.1 and eps 0.05 bf16 scores would be resolved to ~0.04 and
    0.02 in logit units."""
    with torch.autocast(scores[0].device.type, enabled=False):
        s = torch.stack([x.float() for x in scores])  # [V, n, K]
        n_views, n = s.shape[0], s.shape[1]
        with torch.no_grad():
            problem, weight = s[:num_global].detach(), None
            if queue_scores is not None:
                problem = torch.cat([problem, queue_scores.detach().float()], dim=1)
                weight = torch.cat([s.new_ones(n), s.new_ones(queue_scores.shape[1]) * queue_weight])
            q = sinkhorn(problem, epsilon, iterations, weight, rows=n)  # this batch's rows
        cross = -torch.einsum("gnk,vnk->gv", q, F.log_softmax(s / temperature, dim=-1)) / n
        other = 1 - torch.eye(num_global, n_views, device=s.device)  # no view predicts its own code
        return (cross * other).sum() / (num_global * (n_views - 1))


class SwAV(Method):
    name = "swav"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: PositiveInt = 2048,
        proj_output_dim: PositiveInt = 128,
        num_prototypes: PositiveInt = 3000,
        temperature: PositiveFloat = 0.1,
        sinkhorn_epsilon: PositiveFloat = 0.05,
        sinkhorn_iterations: PositiveInt = 3,
        queue_size: NonNegativeInt = 3840,
        epoch_queue_starts: NonNegativeInt = 15,
        freeze_prototypes_epochs: NonNegativeInt = 1,
        num_local_crops: NonNegativeInt = 0,
        local_crop_size: PositiveInt | None = None,
        local_crop_scale: Sequence[float] = (0.05, 0.14),
        global_crop_scale: Sequence[float] | None = None,
        prototypes_bias: bool = False,
        concat_views: bool = True,
        name: str = "swav",
    ) -> None:
        """The official defaults (main_swav.py, src/resnet50.py): projector Linear 2048-BN-ReLU-Linear
        128, L2 normalisation, 3000 prototypes (a Linear without bias, its rows unit vectors), T 0.1,
        Sinkhorn eps 0.05 with 3 iterations. The queue as its batch-256 scripts and README set it
        (3840 past embeddings of each global view, from epoch 15; main_swav.py's default is none, for
        its batch of 4096); the prototypes frozen for 1 epoch (freeze_prototypes_niters 313 at batch
        4096, 5005 at 256: one ImageNet epoch). solo-learn's CIFAR recipe: queue from epoch 50,
        prototypes frozen 2 epochs, no multi-crop.

        The queue: every process pushes every process's embeddings (gathered), so all hold the same
        queue and a resume on another number of processes finds it whole. In Sinkhorn each process
        brings its own share of it (`distributed.shard`), beside its own batch: the sums over rows are
        all-reduced, so every queued embedding counts once, and the assignments are those of one
        process on the global batch and the whole queue (the official queue is per GPU,
        queue_length / world each, which counts the same way). It fills from `epoch_queue_starts`
        and joins Sinkhorn once full (main_swav.py), both read from tensors: no recompile, no sync."""
        super().__init__(backbone, concat_views)
        self.temperature, self.epsilon, self.iterations = temperature, sinkhorn_epsilon, sinkhorn_iterations
        self.queue_size, self.epoch_queue_starts = queue_size, epoch_queue_starts
        self.freeze_prototypes_epochs = freeze_prototypes_epochs
        self.crops = MultiCrop(
            backbone,
            num_local_crops,
            local_crop_size,
            local_crop_scale,
            global_crop_scale,
            ("SwAV", "0.05-0.14 and 0.14-1"),
        )
        self.projector = mlp([self.num_features, proj_hidden_dim, proj_output_dim])
        # a Linear without bias (main_swav.py); lightly's SwaVPrototypes have one (prototypes_bias),
        # added to the scores and not normalised
        self.prototypes = nn.Linear(proj_output_dim, num_prototypes, bias=prototypes_bias)
        self.normalize_prototypes()
        if queue_size:  # past embeddings of each global view; zeros until filled (main_swav.py)
            self.register_buffer("queue", torch.zeros(2, queue_size, proj_output_dim))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            # the rows pushed so far, at most queue_size: the queue joins Sinkhorn when it reaches it
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def check_batch(self, batch_size: int) -> None:
        if self.queue_size:
            check_queue_fits(self.queue_size, batch_size, optional=True)

    def views(self, draw: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """Two global views, then `num_local_crops` local ones of one size (one backbone pass)."""
        return self.crops.views(draw)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        projected = self.embed_views(views, self.projector)
        with torch.autocast(views[0].device.type, enabled=False):  # fp32 scores (see swav_loss)
            z = [F.normalize(p.float(), dim=1) for p in projected]
            prototypes = self.prototypes.weight.float()
            bias = None if self.prototypes.bias is None else self.prototypes.bias.float()
            scores = [F.linear(x, prototypes, bias) for x in z]
            if not self.queue_size:
                return {"loss": swav_loss(scores, self.temperature, self.epsilon, self.iterations)}
            share = distributed.shard(self.queue_size)  # this process's rows of the shared queue
            with torch.no_grad():
                queue_scores = F.linear(
                    self.queue[:, share.start : share.stop],
                    prototypes.detach(),
                    None if bias is None else bias.detach(),
                )
            used = self.queue_filled >= self.queue_size
            loss = swav_loss(scores, self.temperature, self.epsilon, self.iterations, 2, queue_scores, used)
        self.push(torch.stack(z[:2]))  # after the scores read the queue
        return {"loss": loss, "queue_used": used.float()}

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> None:
        """The global views' embeddings [2, n, d] of every process into the queue, oldest rows first,
        from epoch `epoch_queue_starts`; before it, the same rows are written back unchanged."""
        keys = distributed.gather(z.detach().transpose(0, 1)).transpose(0, 1)  # [2, n x world, d]
        n = keys.shape[1]
        started = self.epoch_now() >= self.epoch_queue_starts
        rows = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue_size
        self.queue[:, rows] = torch.where(started, keys.to(self.queue.dtype), self.queue[:, rows])
        self.queue_ptr.copy_((self.queue_ptr + n * started) % self.queue_size)
        self.queue_filled.copy_((self.queue_filled + n * started).clamp(max=self.queue_size))

    def after_backward(self, step: int, epoch: int) -> None:
        """The prototypes stay as initialised for the first freeze_prototypes_epochs epochs: no gradient,
        so the optimizer skips them, weight decay included (main_swav.py's freeze_prototypes_niters)."""
        if epoch < self.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None

    def after_step(self, step: int, total_steps: int) -> None:
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Each prototype a unit vector: at init and after every optimizer step, so every forward sees
        them so (main_swav.py normalises them before each step's forward)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))
