"""MoCo v2 (Chen, Fan, Girshick & He, 2020) and solo-learn's MoCo v2+: a query from the student against
its positive key from a momentum teacher and a queue of past keys as negatives (facebookresearch/moco,
moco/builder.py; solo-learn's mocov2plus.py for the symmetric loss and the momentum schedule)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import PositiveFloat, PositiveInt, Probability
from ssl_lab.methods.base import Method
from ssl_lab.methods.parts import MomentumTeacher, Queue


def moco_queue_xent(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE with a queue (moco/builder.py): for each query, its key is the positive (logit 0) and
    the queue's entries the negatives; q, k unit-normalised, the queue already so, k and the queue
    without gradient. In fp32 with autocast off."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, q @ queue.detach().float().T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


class MoCoV2(Method):
    name = "mocov2"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: PositiveInt = 2048,
        proj_output_dim: PositiveInt = 128,
        temperature: PositiveFloat = 0.2,
        queue_size: PositiveInt = 65536,
        momentum_base: Probability = 0.999,
        momentum_end: Probability = 0.999,
        symmetric: bool = False,
        concat_views: bool = False,
        name: str = "mocov2",
    ) -> None:
        """MoCo v2's defaults (the paper's sec. 2, main_moco.py with --mlp --moco-t 0.2 --aug-plus --cos):
        an MLP head 2048 -> 128 (Linear-ReLU-Linear, no BN), T 0.2, a queue of 65,536 keys, momentum
        0.999 constant, the loss one way (q from view 0, its key from view 1). solo-learn's MoCo v2+
        (its CIFAR recipe): head to 256, queue 32,768, momentum 0.99 -> 0.999 on a cosine, and the
        loss symmetric, each direction with its own queue of that view's keys.

        Batch statistics must not let a query find its key through batch norm (moco #46): the
        official code shuffles the batch across GPUs for the teacher (shuffle BN). Here each view
        goes through the network on its own by default (concat_views=false), and with several processes
        batch norm is over the global batch (trainer.sync_batchnorm), as solo-learn and MoCo v3 do: the
        statistics of 256+ images carry little of any one image."""
        super().__init__(backbone, concat_views)
        self.temperature, self.symmetric = temperature, symmetric
        self.projector = nn.Sequential(
            nn.Linear(self.num_features, proj_hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden_dim, proj_output_dim),
        )  # fmt: skip
        self.teacher = MomentumTeacher(
            {"backbone": self.backbone, "projector": self.projector}, momentum_base, momentum_end
        )
        # queues[0]: view 1's keys (the targets of view 0's queries); queues[1], when symmetric: view 0's
        self.queues = nn.ModuleList(Queue(queue_size, proj_output_dim) for _ in range(1 + symmetric))

    def check_batch(self, batch_size: int) -> None:
        self.queues[0].check_batch(batch_size)  # each step replaces batch_size keys of each queue

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        q0, q1 = self.embed_views(views, self.projector)
        with torch.no_grad():
            k0, k1 = self.per_view(lambda x: self.teacher.projector(self.teacher.backbone(x)), views)
        t = self.temperature
        # copies: the pushes below overwrite the queues, which backward still needs (q's gradient)
        queues = [queue.queue.clone() for queue in self.queues]
        if self.symmetric:  # each direction against the queue of its key's view (solo-learn)
            loss = (moco_queue_xent(q0, k1, queues[0], t) + moco_queue_xent(q1, k0, queues[1], t)) / 2
            pushed = [k1, k0]
        else:
            loss, pushed = moco_queue_xent(q0, k1, queues[0], t), [k1]
        # after the loss read the queues; every process's keys, so all hold the same queues
        for queue, keys in zip(self.queues, pushed):
            queue.push(distributed.gather(F.normalize(keys.float(), dim=1)))
        return {"loss": loss, "momentum": self.teacher.momentum.clone()}

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update({"backbone": self.backbone, "projector": self.projector}, step, total_steps)
