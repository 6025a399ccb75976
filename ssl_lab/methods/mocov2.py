"""MoCo v2 (Chen, Fan, Girshick & He, 2020) and solo-learn's MoCo v2+: a query from the student against
its positive key from a momentum teacher and a queue of past keys as negatives (facebookresearch/moco,
moco/builder.py; solo-learn's mocov2plus.py for the symmetric loss and the momentum schedule)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import PositiveFloat, PositiveInt, Probability
from ssl_lab.errors import UserError
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
        shared_queue: bool = False,
        shuffle_keys: bool = False,
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
        statistics of 256+ images carry little of any one image.

        lightly's CIFAR-10 benchmark (its MoCo row): `shuffle_keys` runs the teacher on its view in a
        random order of the batch, put back after (its `batch_shuffle`, within each process: the
        order comes from the run's random stream, `draw.noise`); with a backbone whose batch norm is
        over splits of the batch (backbone.bn_splits), a key's statistics then come from other images
        than its query's. `shared_queue` (with `symmetric`): one queue, which the second direction
        reads after the first direction's keys were pushed (lightly's NTXentLoss with a memory bank,
        called once per direction)."""
        if shared_queue and not symmetric:
            raise UserError(
                "method.shared_queue=true shares the queue between the two directions of the symmetric "
                "loss; set method.symmetric=true too (one way, there is one queue already)"
            )
        super().__init__(backbone, concat_views)
        self.temperature, self.symmetric, self.shuffle_keys = temperature, symmetric, shuffle_keys
        self.shared_queue = shared_queue and symmetric
        self.projector = nn.Sequential(
            nn.Linear(self.num_features, proj_hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden_dim, proj_output_dim),
        )  # fmt: skip
        self.teacher = MomentumTeacher(
            {"backbone": self.backbone, "projector": self.projector}, momentum_base, momentum_end
        )
        # queues[0]: view 1's keys (the targets of view 0's queries); queues[1], when symmetric: view 0's
        self.queues = nn.ModuleList(
            Queue(queue_size, proj_output_dim) for _ in range(1 + (symmetric and not self.shared_queue))
        )

    def check_batch(self, batch_size: int) -> None:
        self.queues[0].check_batch(batch_size)  # each step replaces batch_size keys of each queue

    def views(self, draw) -> list[torch.Tensor]:
        """The two views, and with `shuffle_keys` the noise that orders the teacher's batch in each
        direction (drawn with the views: the same on any number of processes, continued on resume)."""
        return [draw(), draw(), draw.noise(2)] if self.shuffle_keys else [draw(), draw()]

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        # (query view, key view) of each direction; one way: q0 against k1 only, so neither q1 nor k0
        # is computed (they would cost half a step again and go unread)
        directions = [(0, 1), (1, 0)] if self.symmetric else [(0, 1)]
        queries = self.embed_views([views[q] for q, _ in directions], self.projector)
        with torch.no_grad():
            if self.shuffle_keys:  # each key view in its own order: one pass each
                keys = [self.key(views[k], views[2][:, d]) for d, (_, k) in enumerate(directions)]
            else:  # together when concat_views, as the queries
                keys = self.per_view(lambda x: self.key(x, None), [views[k] for _, k in directions])
        t, loss = self.temperature, 0.0
        pushes = []
        for d, (q, k) in enumerate(zip(queries, keys)):
            queue = self.queues[0 if self.shared_queue else d]
            # a copy: the push below overwrites the queue, which backward still needs (q's gradient)
            loss = loss + moco_queue_xent(q, k, queue.queue.clone(), t)
            # after the loss read it; every process's keys, so all hold the same queues
            pushed = distributed.gather(F.normalize(k.float(), dim=1))
            if self.shared_queue:  # the next direction reads the queue with these keys in it
                queue.push(pushed)
            else:
                pushes.append((queue, pushed))
        for queue, pushed in pushes:
            queue.push(pushed)
        return {"loss": loss / len(directions), "momentum": self.teacher.momentum.clone()}

    def key(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The teacher's projection of `x`; with `noise`, computed on the batch in the order of the
        noise and put back (lightly's batch_shuffle / batch_unshuffle)."""
        teacher = lambda x: self.teacher.projector(self.teacher.backbone(x))  # noqa: E731
        if noise is None:
            return teacher(x)
        order = noise.argsort()
        return teacher(x[order])[order.argsort()]

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update({"backbone": self.backbone, "projector": self.projector}, step, total_steps)
