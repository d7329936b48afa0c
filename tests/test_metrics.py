import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from franca.eval.lib.metrics import auroc, fpr_at_tpr, ood_metrics
from franca.utils.accuracy import topk_accuracy


def brute_topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    hits = 0
    for row, label in zip(logits.tolist(), labels.tolist()):
        # rank of the label = number of strictly larger logits (logits below are distinct)
        hits += sum(v > row[label] for v in row) < k
    return 100.0 * hits / len(labels)


def brute_auroc(pos: list[float], neg: list[float]) -> float:
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def brute_fpr(pos: list[float], neg: list[float], tpr: float) -> float:
    best = 1.0
    for t in sorted(set(pos) | set(neg)):
        if sum(p >= t for p in pos) / len(pos) >= tpr:
            best = min(best, sum(n >= t for n in neg) / len(neg))
    return best


@pytest.mark.parametrize("k", [1, 2, 5])
def test_topk_accuracy_matches_brute_force(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(200, 7, generator=g)
    labels = torch.randint(0, 7, (200,), generator=g)
    assert topk_accuracy(logits, labels, k) == pytest.approx(brute_topk(logits, labels, k))


def test_topk_accuracy_caps_k_and_checks_shapes():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert topk_accuracy(logits, torch.tensor([1, 1]), 1) == 50.0
    assert topk_accuracy(logits, torch.tensor([1, 1]), 5) == 100.0
    with pytest.raises(ValueError, match=r"logits must be \[N, C\] with N = len\(labels\) = 3"):
        topk_accuracy(logits, torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_all_pairs_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 6, (37,), generator=g).double()  # few distinct values: many ties
    neg = torch.randint(-2, 4, (23,), generator=g).double()
    expected = brute_auroc(pos.tolist(), neg.tolist())
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, np.r_[pos.numpy(), neg.numpy()]), abs=1e-12)


def test_auroc_closed_forms():
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auroc(torch.ones(5), torch.ones(9)) == 0.5


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tpr", [0.95, 0.5, 1.0])
def test_fpr_at_tpr_matches_threshold_sweep(seed, tpr):
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randn(41, generator=g) + 1.0).round(decimals=1).double()
    neg = torch.randn(57, generator=g).round(decimals=1).double()
    assert fpr_at_tpr(pos, neg, tpr) == pytest.approx(brute_fpr(pos.tolist(), neg.tolist(), tpr), abs=1e-12)


def test_fpr95_matches_sklearn_roc_operating_point():
    g = torch.Generator().manual_seed(7)
    pos, neg = torch.randn(300, generator=g) + 1.5, torch.randn(200, generator=g)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(300), np.zeros(200)], np.r_[pos.numpy(), neg.numpy()])
    assert fpr_at_tpr(pos, neg) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_ood_metrics_in_percent_for_separable_scores():
    m = ood_metrics(torch.arange(10.0, 20.0), torch.arange(0.0, 10.0))
    assert m == {"auroc": 100.0, "fpr95": 0.0}


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="both in-distribution and out-of-distribution scores, got 0 and 3"):
        auroc(torch.empty(0), torch.ones(3))
    with pytest.raises(ValueError, match="out-of-distribution scores contain NaN"):
        fpr_at_tpr(torch.ones(3), torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match=r"tpr=1.5 must be in \(0, 1\]"):
        fpr_at_tpr(torch.ones(3), torch.ones(3), 1.5)
