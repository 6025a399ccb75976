"""Weighted kNN classification on frozen features (Wu et al. 2018, InstDisc; as in MoCo and DINO):
the pretraining run's kNN monitor and `python -m ssl_lab.eval eval=knn`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab.config import PositiveFloat, PositiveInt
from ssl_lab.data.augment import normalize
from ssl_lab.data.datasets import DataSplits
from ssl_lab.eval.common import EvalContext, features, topk


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


def knn_accuracy(
    backbone: nn.Module, data: DataSplits, k: int, temperature: float, **feature_options: Any
) -> dict[str, float]:
    """top1/top5 (%) of the weighted kNN vote on `backbone`'s features: the labelled train split is the
    bank, the test split the queries. The pretraining run's monitor and eval=knn both compute this;
    `feature_options` are `features`' (device, batch_size, autocast_dtype, ...)."""
    bank = features(backbone, data.memory, data.mean, data.std, **feature_options)
    queries = features(backbone, data.test, data.mean, data.std, **feature_options)
    scores = knn_predict(queries, bank, data.memory.labels.to(bank.device), data.num_classes, k, temperature)
    return topk(scores, data.test.labels)


def evaluate(
    ctx: EvalContext, k: PositiveInt = 200, temperature: PositiveFloat = 0.1, batch_size: PositiveInt = 512
) -> dict:
    """eval=knn."""
    result = knn_accuracy(ctx.backbone, ctx.data, k, temperature, **ctx.feature_options(batch_size))
    return {"eval/knn_top1": result["top1"], "eval/knn_top5": result["top5"]}


PIXEL_BUDGET = 2**30  # bytes of float32 pixels for the bank: CIFAR's 45,000 images take 0.55 GiB


@torch.no_grad()
def pixel_knn_accuracy(
    data: DataSplits, k: int, temperature: float, device: torch.device | str = "cpu"
) -> dict[str, float] | None:
    """The same weighted kNN on raw pixels (standardised with the data set's mean/std, flattened): the
    floor a learned representation has to beat, beside the network at random init. None when the images
    are decoded from files, or when the bank's pixels would not fit PIXEL_BUDGET."""
    bank, queries = data.memory, data.test
    if bank.images is None or queries.images is None or bank.images[0].numel() * 4 * len(bank) > PIXEL_BUDGET:
        return None

    def pixels(images: torch.Tensor) -> torch.Tensor:  # the eval transform, flattened
        return torch.cat(
            [normalize(x.to(device), data.mean, data.std).flatten(1) for x in images.split(4096)]
        )

    scores = knn_predict(
        pixels(queries.images), pixels(bank.images), bank.labels.to(device), data.num_classes, k, temperature
    )
    return topk(scores, queries.labels)
