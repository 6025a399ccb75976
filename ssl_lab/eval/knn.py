"""Weighted kNN classification on frozen features (Wu et al. 2018, InstDisc; as in MoCo and DINO):
the pretraining run's kNN monitor and `python -m ssl_lab.eval eval=knn`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lab.eval.common import EvalContext, context_features


@torch.no_grad()
def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores [Q, num_classes] of each query: its k most cosine-similar bank entries vote
    for their label with weight exp(similarity / temperature)."""
    queries, bank = F.normalize(queries, dim=1), F.normalize(bank, dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for q in queries.split(chunk_size):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """Accuracy in percent for each k in topk."""
    pred = scores.topk(max(topk), dim=1).indices
    hit = pred == labels[:, None]
    return [100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in topk]


def evaluate(ctx: EvalContext, k: int = 200, temperature: float = 0.1, batch_size: int = 512) -> dict:
    """eval=knn: the labelled train split is the bank, the test split the queries."""
    bank = context_features(ctx, ctx.data.memory, batch_size)
    queries = context_features(ctx, ctx.data.test, batch_size)
    labels = ctx.data.memory.labels.to(ctx.device)
    scores = knn_predict(queries, bank, labels, ctx.data.num_classes, k, temperature)
    top1, top5 = topk_accuracy(scores, ctx.data.test.labels.to(ctx.device), (1, min(5, ctx.data.num_classes)))
    return {"eval/knn_top1": top1, "eval/knn_top5": top5}
