"""Training-health statistics against float64 brute force, across two gloo ranks, and the monitor's warnings."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from franca.loss import DenseTargets, sinkhorn_knopp, sinkhorn_knopp_streaming
from franca.train.health import (
    HealthMonitor,
    format_health,
    head_stats,
    level_stats,
    reduce_stats,
    spread_stats,
)


def brute_entropy_fraction(probs: list[list[float]]) -> float:
    total = sum(-sum(p * math.log(p) for p in row if p > 0) for row in probs)
    return total / len(probs) / math.log(len(probs[0]))


def brute_softmax(row: list[float], temp: float) -> list[float]:
    top = max(row)
    e = [math.exp((v - top) / temp) for v in row]
    return [v / sum(e) for v in e]


def reduce_one(targets, student_logits, temp: float, chunk_size: int) -> dict[str, float]:
    return reduce_stats({"dino_l0": level_stats(targets, student_logits, temp, chunk_size)})


def test_level_statistics_equal_brute_force_for_dense_and_chunked_targets():
    torch.manual_seed(0)
    probs = (torch.randn(37, 50) * 3).softmax(dim=-1)
    probs[3] = 0.0
    probs[3, 7] = 1.0  # a one-hot row: 0 log 0 counts as 0
    student = torch.randn(37, 50)
    rows = probs.double().tolist()
    winners = {max(range(50), key=lambda k: row[k]) for row in rows}
    students = [brute_softmax(row, 0.1) for row in student.double().tolist()]
    for targets, chunk in ((probs, 8), (DenseTargets(probs, chunk_size=8), 5), (probs, 1000)):
        stats = reduce_one(targets, student, 0.1, chunk)
        assert stats["dino_target_entropy_l0"] == pytest.approx(brute_entropy_fraction(rows), rel=1e-5)
        assert stats["dino_student_entropy_l0"] == pytest.approx(brute_entropy_fraction(students), rel=1e-5)
        assert stats["dino_prototypes_used_l0"] == pytest.approx(len(winners) / 37)  # min(rows, K) = 37


def test_streamed_sinkhorn_targets_give_the_statistics_of_the_dense_ones():
    torch.manual_seed(1)
    logits, student = torch.randn(20, 30), torch.randn(20, 30)
    dense = reduce_one(sinkhorn_knopp(logits, 0.05), student, 0.1, 1000)
    streamed = reduce_one(sinkhorn_knopp_streaming(logits, 0.05, chunk_size=6), student, 0.1, 6)
    assert streamed == pytest.approx(dense, rel=1e-5)


def test_uniform_and_one_hot_targets_are_the_two_ends():
    uniform = reduce_one(torch.full((6, 16), 1 / 16), torch.zeros(6, 16), 0.1, 4)
    assert uniform["dino_target_entropy_l0"] == pytest.approx(1.0)
    assert uniform["dino_student_entropy_l0"] == pytest.approx(1.0)
    one_hot = reduce_one(torch.eye(16)[:6], torch.zeros(6, 16), 0.1, 4)
    assert one_hot["dino_target_entropy_l0"] == pytest.approx(0.0, abs=1e-6)
    assert one_hot["dino_prototypes_used_l0"] == 1.0  # 6 rows, 6 distinct winners


def test_a_level_without_rows_is_left_out_and_one_prototype_is_finite():
    stats = reduce_stats(
        {
            "ibot_l0": level_stats(torch.zeros(0, 8), torch.zeros(0, 8), 0.1),
            "ibot_l1": level_stats(torch.ones(3, 1), torch.zeros(3, 1), 0.1),
        }
    )
    assert stats == {"ibot_target_entropy_l1": 0.0, "ibot_student_entropy_l1": 0.0, "ibot_prototypes_used_l1": 1.0}


def test_feature_spread_is_one_minus_the_mean_pairwise_cosine_under_a_root():
    torch.manual_seed(2)
    x = torch.randn(12, 9) + 0.7
    unit = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in x.double().tolist()]
    cosines = [sum(a * b for a, b in zip(u, v)) for u in unit for v in unit]
    spread = reduce_stats({"teacher_cls_spread": spread_stats(x)})["teacher_cls_spread"]
    assert spread == pytest.approx(math.sqrt(1 - sum(cosines) / len(cosines)), rel=1e-5)
    same = reduce_stats({"teacher_cls_spread": spread_stats(torch.ones(5, 3) * 2.5)})["teacher_cls_spread"]
    assert same == pytest.approx(0.0, abs=1e-3)
    opposite = reduce_stats({"teacher_cls_spread": spread_stats(torch.cat([torch.eye(4), -torch.eye(4)]))})
    assert opposite["teacher_cls_spread"] == pytest.approx(1.0, abs=1e-6)


def test_student_entropy_is_averaged_over_the_student_rows():
    """DINO: 2B target rows (global crops) against (2 + L)·B student rows (every crop)."""
    targets, student = torch.full((4, 8), 1 / 8), torch.zeros(12, 8)
    student[4:] = torch.eye(8)[:8] * 100  # 8 of the 12 student rows are one-hot: entropy 0
    stats = reduce_one(targets, student, 1.0, 5)
    assert stats["dino_student_entropy_l0"] == pytest.approx(4 / 12, rel=1e-5)


def test_head_stats_names_every_level():
    stats = reduce_stats(head_stats("dino", [torch.full((4, 8), 1 / 8), torch.eye(4)], [torch.zeros(4, 8)] * 2, 0.1, 2))
    assert set(stats) == {
        f"dino_{k}_l{i}" for k in ("target_entropy", "student_entropy", "prototypes_used") for i in (0, 1)
    }


def _rank_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    probs = (torch.randn(10, 12, generator=generator) * 2).softmax(dim=-1)
    return probs, torch.randn(10, 12, generator=generator), torch.randn(10, 5, generator=generator)


def _two_rank_stats(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        probs, student, features = _rank_inputs()
        rows = slice(0, 0) if rank == 0 else slice(0, 10)  # rank 0 holds no rows (no masked token)
        raw = {"ibot_l0": level_stats(probs[rows], student[rows], 0.1, 3), "teacher_cls_spread": spread_stats(features)}
        torch.save(reduce_stats(raw), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_give_the_statistics_of_the_concatenated_rows(tmp_path):
    out = str(tmp_path / "stats")
    mp.spawn(_two_rank_stats, args=(2, free_port(), out), nprocs=2)
    probs, student, features = _rank_inputs()
    expected = reduce_stats(
        {"ibot_l0": level_stats(probs, student, 0.1), "teacher_cls_spread": spread_stats(torch.cat([features] * 2))}
    )
    for rank in range(2):
        assert torch.load(f"{out}.{rank}") == pytest.approx(expected, rel=1e-6)


def stalled(entropy: float, spread: float = 0.5) -> dict[str, float]:
    return {"dino_target_entropy_l0": entropy, "dino_target_entropy_l1": 0.99, "teacher_cls_spread": spread}


def test_monitor_warns_once_after_patience_and_again_after_recovery():
    monitor = HealthMonitor(entropy_threshold=0.97, min_cls_spread=0.05, patience=20)
    assert monitor.update(stalled(0.98), 0) == [] and monitor.update(stalled(0.99), 10) == []
    (warning,) = monitor.update(stalled(0.99), 20)
    assert "DINO clustering is stalled at uniform targets since iteration 0" in warning
    assert "teacher.teacher_temp" in warning and "every DINO level's" in warning
    assert monitor.update(stalled(0.99), 30) == []  # once per episode
    assert monitor.update(stalled(0.5), 40) == []  # one level learns: healthy, the episode ends
    assert monitor.update(stalled(0.99), 50) == [] and len(monitor.update(stalled(0.99), 70)) == 1


def test_each_head_has_its_own_episode():
    monitor = HealthMonitor(patience=20)
    ibot = {"ibot_target_entropy_l0": 0.99, "ibot_target_entropy_l1": 0.98}
    assert monitor.update({**stalled(0.99), **ibot}, 0) == []
    assert monitor.update({**stalled(0.5), **ibot}, 10) == []  # DINO recovers; iBOT stalls on since 0
    (warning,) = monitor.update({**stalled(0.99), **ibot}, 20)  # DINO stalls again since 20: not yet due
    assert "iBOT clustering is stalled at uniform targets since iteration 0" in warning
    (warning,) = monitor.update({**stalled(0.99), **ibot}, 40)
    assert "DINO clustering is stalled at uniform targets since iteration 20" in warning


def test_monitor_reports_collapse_of_the_cls_features():
    monitor = HealthMonitor(patience=0)
    (warning,) = monitor.update(stalled(0.3, spread=0.01), 5)
    assert "collapsed" in warning and "koleo" in warning
    assert HealthMonitor(patience=0).update(stalled(0.3, spread=0.4), 5) == []


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"entropy_threshold": 97}, "train.health_entropy_threshold=97"),
        ({"min_cls_spread": -1}, "train.health_min_cls_spread=-1"),
        ({"patience": -5}, "train.health_patience=-5"),
    ],
)
def test_monitor_settings_are_validated(kwargs, key):
    with pytest.raises(ValueError, match=key):
        HealthMonitor(**kwargs)


def test_progress_summary_is_compact():
    stats = {**stalled(0.5), "ibot_target_entropy_l0": 0.7}
    assert format_health(stats) == "dino H/logK 0.50-0.99, ibot H/logK 0.70, cls spread 0.50"
