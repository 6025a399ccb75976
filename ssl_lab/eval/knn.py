"""Weighted kNN classification on frozen features (Wu et al. 2018, InstDisc; as in MoCo and DINO):
the pretraining run's kNN monitor and `python -m ssl_lab.eval eval=knn`.

On N processes each extracts the features of its 1/N of the bank and of the queries; the bank is
gathered, L2-normalised and in fp16 on GPUs (half the memory: ImageNet's 1.28M x 2048 ResNet-50
features are 5.2 GB instead of 10.5, on each GPU), each process votes for its own queries and the hits
are summed. fp16 keeps 11 bits of a unit vector's entries: the cosine similarities move by ~1e-3,
which changes a neighbour only at near-ties (tests/test_knn.py: the same top-1 as fp32)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import distributed
from ssl_lab.config import PositiveFloat, PositiveInt
from ssl_lab.data.augment import normalize
from ssl_lab.data.datasets import DataSplits
from ssl_lab.eval.common import EvalContext, features, top1_top5, topk, topk_hits, topk_percent


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
    for their label with weight exp(similarity / temperature). A bank in fp16/bf16 is taken as
    L2-normalised already (`half_bank`); the votes are fp32 either way."""
    queries = F.normalize(queries.float(), dim=1)
    bank = F.normalize(bank, dim=1) if bank.dtype == torch.float32 else bank
    k = min(k, bank.shape[0])
    scores = []
    for q in queries.split(chunk_size):
        sim, idx = (q.to(bank.dtype) @ bank.T).topk(k, dim=1)
        sim = sim.float()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    backbone: nn.Module,
    data: DataSplits,
    k: int,
    temperature: float,
    queries: torch.Tensor | None = None,
    **feature_options: Any,
) -> dict[str, float]:
    """top1/top5 (%) of the weighted kNN vote on `backbone`'s features: the labelled train split is the
    bank, the test split the queries. The pretraining run's monitor and eval=knn both compute this,
    on every process of a run (each its share; see the module's docstring); `queries`: this process's
    share of the queries' features, if extracted already; `feature_options` are `features`' (device,
    batch_size, autocast_dtype, ...)."""
    n_bank, n_queries = len(data.memory), len(data.test)
    local = features(
        backbone, data.memory, data.mean, data.std, rows=distributed.shard(n_bank), **feature_options
    )
    bank = distributed.gather_shards(half_bank(local), n_bank)
    del local
    rows = distributed.shard(n_queries)
    if queries is None:
        queries = features(backbone, data.test, data.mean, data.std, rows=rows, **feature_options)
    labels = data.memory.labels.to(bank.device)
    scores = knn_predict(queries, bank, labels, data.num_classes, k, temperature)
    hits = topk_hits(scores, data.test.labels[rows.start : rows.stop], top1_top5(data.num_classes))
    return topk_percent(distributed.total(hits), n_queries)


def half_bank(bank: torch.Tensor) -> torch.Tensor:
    """On GPUs, the bank's features L2-normalised in fp16 (what knn_predict takes as normalised); on
    the CPU, whose fp16 matmul can be slow, as they are (fp32, normalised by knn_predict)."""
    return F.normalize(bank.float(), dim=1).half() if bank.device.type == "cuda" else bank


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
