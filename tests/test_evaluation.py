"""kNN classification against a naive loop."""

import math

import pytest
import torch

from scan_zoo.core.metrics import knn_classify, topk_accuracy


def naive_knn(train, labels, test, num_classes, k, t):
    out = []
    for x in test:
        sims = [float(torch.dot(x / x.norm(), y / y.norm())) for y in train]
        order = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(labels[j])] += math.exp(sims[j] / t)
        out.append(votes)
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(4))
def test_knn_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    train, test = torch.randn(40, 6, generator=g), torch.randn(9, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    got = knn_classify(train, labels, test, 4, k=7, temperature=0.07, chunk=4)
    want = naive_knn(train, labels, test, 4, 7, 0.07)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(200 / 3)  # rows 0 and 1 hit within two; row 2's label is ranked last
