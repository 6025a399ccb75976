"""Weighted kNN: a hand-computed vote, a brute-force reference, and chunking."""

import pytest
import torch
import torch.nn.functional as F

from ssl_lab.data.datasets import DataSplits, ImageSet
from ssl_lab.eval.common import topk_accuracy
from ssl_lab.eval.knn import knn_accuracy, knn_predict


def test_weighted_vote_by_hand() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.1]])
    scores = knn_predict(query, bank, labels, num_classes=2, k=2, temperature=0.5)
    q = F.normalize(query, dim=1)[0]
    s0, s1 = (q @ bank[0]).item(), (q @ bank[1]).item()  # the two nearest; bank[2] is out
    torch.testing.assert_close(
        scores, torch.tensor([[torch.tensor(s0 / 0.5).exp(), torch.tensor(s1 / 0.5).exp()]])
    )


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_matches_brute_force(chunk_size: int) -> None:
    torch.manual_seed(0)
    bank, labels, queries = torch.randn(300, 16), torch.randint(0, 5, (300,)), torch.randn(50, 16)
    scores = knn_predict(queries, bank, labels, num_classes=5, k=20, temperature=0.1, chunk_size=chunk_size)
    sim = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    for i in range(50):
        top = sim[i].argsort(descending=True)[:20]
        expected = torch.zeros(5)
        for j in top:
            expected[labels[j]] += (sim[i, j] / 0.1).exp()
        torch.testing.assert_close(scores[i], expected, rtol=1e-4, atol=1e-4)


def test_topk_accuracy() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    top1, top2 = topk_accuracy(scores, labels, (1, 2))
    assert top1 == pytest.approx(100 / 3) and top2 == pytest.approx(200 / 3)


def clustered(n: int, centres: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, len(centres), (n,), generator=generator)
    return centres[labels] + 1.2 * torch.randn(n, centres.shape[1], generator=generator), labels


def test_a_half_precision_bank_leaves_the_top1_unchanged() -> None:
    """The monitor's bank is kept in fp16 on GPUs (half the memory): on features where the kNN is
    neither trivial nor hopeless (~80 % top-1), the predictions are those of the fp32 bank."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 128, generator=g) * 0.3
    bank, bank_labels = clustered(5000, centres, g)
    queries, labels = clustered(1000, centres, g)
    full = knn_predict(queries, bank, bank_labels, num_classes=10, k=200, temperature=0.1)
    half = knn_predict(
        queries, F.normalize(bank, dim=1).half(), bank_labels, num_classes=10, k=200, temperature=0.1
    )
    top1_full, top1_half = topk_accuracy(full, labels)[0], topk_accuracy(half, labels)[0]
    assert 50 < top1_full < 95
    assert abs(top1_half - top1_full) <= 0.2  # at most 2 of 1000 near-ties
    assert (full.argmax(1) == half.argmax(1)).float().mean() >= 0.995


class TinyNet(torch.nn.Module):
    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.conv(x).mean((2, 3))


def tiny_splits() -> DataSplits:
    g = torch.Generator().manual_seed(1)

    def images(n: int) -> ImageSet:  # odd sizes: the shards are uneven
        return ImageSet(images=torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                        labels=torch.randint(0, 3, (n,), generator=g))  # fmt: skip

    bank = images(101)
    return DataSplits(
        train=bank, memory=bank, test=images(37), num_classes=3, mean=(0.5,) * 3, std=(0.2,) * 3
    )


def _knn_on(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    net = TinyNet()
    out[rank] = knn_accuracy(net, tiny_splits(), k=10, temperature=0.1, device=torch.device("cpu"))
    out[f"seen{rank}"] = net.seen
    dist.destroy_process_group()


def test_every_process_extracts_its_share_and_the_kNN_is_the_same() -> None:
    """On N processes each extracts 1/N of the bank and the queries (rank 0 alone took them all, past
    the collective timeout on ImageNet), the bank is gathered and the hits summed: the same top-1."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = knn_accuracy(TinyNet(), tiny_splits(), k=10, temperature=0.1, device=torch.device("cpu"))
    out = mp.Manager().dict()
    mp.spawn(_knn_on, args=(port, out), nprocs=2, join=True)
    assert out[0] == out[1]
    assert (out["seen0"], out["seen1"]) == (51 + 19, 50 + 18)  # 101 bank and 37 query images, shared
    assert out[0]["top1"] == pytest.approx(one["top1"]) and out[0]["top5"] == pytest.approx(one["top5"])
    assert 0 < one["top1"] < 100
