"""Weighted kNN: a hand-computed vote, a brute-force reference, and chunking."""

import pytest
import torch
import torch.nn.functional as F

from ssl_lab.eval.common import topk_accuracy
from ssl_lab.eval.knn import knn_predict


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
