"""Weighted kNN classification on frozen features (Wu et al. 2018, InstDisc; as in MoCo and DINO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
