"""Training-health statistics against float64 brute force, and the monitor's warnings."""

import math

import pytest
import torch

from franca.loss import DenseTargets
from franca.train.health import (
    HealthMonitor,
    feature_spread,
    format_health,
    head_stats,
    prediction_entropy,
    target_stats,
)


def brute_entropy_fraction(probs: torch.Tensor) -> float:
    rows = probs.double().tolist()
    total = sum(-sum(p * math.log(p) for p in row if p > 0) for row in rows)
    return total / len(rows) / math.log(len(rows[0]))


def test_target_stats_equal_brute_force_dense_and_chunked():
    torch.manual_seed(0)
    probs = (torch.randn(37, 50) * 3).softmax(dim=-1)
    probs[3] = 0.0
    probs[3, 7] = 1.0  # a one-hot row: 0 log 0 counts as 0
    expected_used = len({max(range(50), key=lambda k: row[k]) for row in probs.tolist()}) / 50
    for targets in (probs, DenseTargets(probs, chunk_size=8)):
        entropy, used = target_stats(targets)
        assert float(entropy) == pytest.approx(brute_entropy_fraction(probs), rel=1e-5)
        assert float(used) == pytest.approx(expected_used)


def test_uniform_and_one_hot_targets_are_the_two_ends():
    uniform = torch.full((6, 16), 1 / 16)
    assert float(target_stats(uniform)[0]) == pytest.approx(1.0, abs=1e-6)
    one_hot = torch.eye(16)[:6]
    entropy, used = target_stats(one_hot)
    assert float(entropy) == pytest.approx(0.0, abs=1e-6) and float(used) == pytest.approx(6 / 16)


def test_prediction_entropy_is_the_entropy_of_the_tempered_softmax():
    torch.manual_seed(1)
    logits = torch.randn(23, 40)
    expected = brute_entropy_fraction((logits.double() / 0.1).softmax(dim=-1))
    assert float(prediction_entropy(logits, 0.1, chunk_size=5)) == pytest.approx(expected, rel=1e-5)


def test_feature_spread_is_one_minus_the_mean_pairwise_cosine_under_a_root():
    torch.manual_seed(2)
    x = torch.randn(12, 9) + 0.7
    unit = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in x.double().tolist()]
    cosines = [sum(a * b for a, b in zip(u, v)) for u in unit for v in unit]
    assert float(feature_spread(x)) == pytest.approx(math.sqrt(1 - sum(cosines) / len(cosines)), rel=1e-5)
    assert float(feature_spread(torch.ones(5, 3) * 2.5)) == pytest.approx(0.0, abs=1e-3)
    assert float(feature_spread(torch.cat([torch.eye(4), -torch.eye(4)]))) == pytest.approx(1.0, abs=1e-6)


def test_head_stats_names_every_level():
    targets = [torch.full((4, 8), 1 / 8), torch.eye(4)]
    logits = [torch.zeros(4, 8), torch.zeros(4, 4)]
    stats = head_stats("dino", targets, logits, 0.1)
    assert set(stats) == {
        f"dino_{k}_l{i}" for k in ("target_entropy", "student_entropy", "prototypes_used") for i in (0, 1)
    }
    assert (
        float(stats["dino_target_entropy_l0"]) == pytest.approx(1.0) and float(stats["dino_target_entropy_l1"]) < 1e-6
    )
    assert float(stats["dino_student_entropy_l1"]) == pytest.approx(1.0)


def stalled(entropy: float, spread: float = 0.5) -> dict[str, float]:
    return {"dino_target_entropy_l0": entropy, "dino_target_entropy_l1": 0.99, "teacher_cls_spread": spread}


def test_monitor_warns_once_after_patience_and_again_after_recovery():
    monitor = HealthMonitor(entropy_threshold=0.97, min_cls_spread=0.05, patience=20)
    assert monitor.update(stalled(0.98), 0) == [] and monitor.update(stalled(0.99), 10) == []
    (warning,) = monitor.update(stalled(0.99), 20)
    assert "stalled at uniform targets since iteration 0" in warning and "teacher.teacher_temp" in warning
    assert "every DINO level's" in warning
    assert monitor.update(stalled(0.99), 30) == []  # once per episode
    assert monitor.update(stalled(0.5), 40) == []  # one level learns: healthy, the episode ends
    ibot_only = {**stalled(0.5), "ibot_target_entropy_l0": 0.99, "ibot_target_entropy_l1": 0.98}
    assert HealthMonitor(patience=0).update(ibot_only, 0)[0].count("every iBOT level's") == 1
    assert monitor.update(stalled(0.99), 50) == [] and len(monitor.update(stalled(0.99), 70)) == 1


def test_monitor_reports_collapse_of_the_cls_features():
    monitor = HealthMonitor(patience=0)
    (warning,) = monitor.update(stalled(0.3, spread=0.01), 5)
    assert "collapsed" in warning and "koleo" in warning
    assert HealthMonitor(patience=0).update(stalled(0.3, spread=0.4), 5) == []


def test_progress_summary_is_compact():
    stats = {**stalled(0.5), "ibot_target_entropy_l0": 0.7}
    assert format_health(stats) == "dino H/logK 0.50-0.99, ibot H/logK 0.70, cls spread 0.50"
