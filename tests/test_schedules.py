"""Schedules (franca.train.schedules) at key iterations, against values computed by hand from the original's rules."""

import math
from pathlib import Path

import numpy as np
import pytest

from franca.train.config import apply_scaling_rules, load_config
from franca.train.schedules import CosineScheduler, ZeroedPrefix, build_schedules
from franca.utils.config_schema import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_small_scheduler_every_iteration_by_hand():
    # freeze 2 zeros, warmup 3 values 0.5 → 1.0 (ends included), cosine over the remaining 5, then final.
    sched = CosineScheduler(1.0, 0.0, total_iters=10, warmup_iters=3, start_warmup_value=0.5, freeze_iters=2)
    expected = [0.0, 0.0, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)] + [0.0, 0.0]
    assert [sched[it] for it in range(12)] == pytest.approx(expected, abs=1e-15)
    assert expected[6] == pytest.approx(0.9045084971874737) and len(sched) == 10


def test_warmup_of_one_iteration_gives_the_start_value_and_no_warmup_starts_at_base():
    assert CosineScheduler(2.0, 1.0, 4, warmup_iters=1, start_warmup_value=0.25)[0] == 0.25
    plain = CosineScheduler(2.0, 1.0, 4)
    assert [plain[it] for it in range(5)] == pytest.approx(
        [2.0, 1.5 + 0.5 * math.cos(math.pi / 4), 1.5, 1.5 - 0.5 * math.cos(math.pi / 4), 1.0]
    )


def test_constant_and_empty_schedules():
    constant = CosineScheduler(0.07, 0.07, 5)
    assert {constant[it] for it in range(7)} == {0.07}
    empty = CosineScheduler(3.0, 0.5, 0)
    assert empty[0] == 0.5 and empty[10**9] == 0.5


def test_numpy_integer_index_and_bad_arguments():
    sched = CosineScheduler(1.0, 0.0, 10, warmup_iters=5)
    assert sched[np.int64(4)] == 1.0
    with pytest.raises(IndexError, match="-1"):
        sched[-1]
    with pytest.raises(TypeError):
        sched[1.5]
    with pytest.raises(ValueError, match=r"freeze_iters \(3\) \+ warmup_iters \(8\) exceed total_iters \(10\)"):
        CosineScheduler(1.0, 0.0, 10, warmup_iters=8, freeze_iters=3)
    with pytest.raises(ValueError, match="warmup_iters=-1"):
        CosineScheduler(1.0, 0.0, 10, warmup_iters=-1)


def test_zeroed_prefix():
    base = CosineScheduler(1.0, 0.0, 6, warmup_iters=3)
    frozen = ZeroedPrefix(base, 2)
    assert [frozen[it] for it in range(8)] == [0.0, 0.0] + [base[it] for it in range(2, 8)]
    assert base[2] == 1.0 and len(frozen) == 6


def _recipe_schedules(recipe: str, world_size: int):
    cfg = apply_scaling_rules(load_config(REPO / "configs" / recipe), world_size)
    return cfg, build_schedules(cfg)


def test_vitb14_in21k_schedules_at_key_iterations():
    # IN21K ViT-B/14 on 64 GPUs x 32: lr = 7.01e-4 * sqrt(2) ≈ 9.91e-4; 625K iterations, 100K warmup; min_lr 1e-6.
    _, s = _recipe_schedules("train/IN21K/vitb14.yaml", 64)
    lr, min_lr = 7.01e-4 * math.sqrt(2.0), 1e-6
    cos_end = 0.5 * (1 + math.cos(math.pi * 524_999 / 525_000))  # last cosine step (n = 525K)
    expected_lr = {
        0: 0.0,
        1250: lr * 1250 / 99_999,
        50_000: lr * 50_000 / 99_999,
        99_999: lr,
        100_000: lr,
        362_500: (lr + min_lr) / 2,
        624_999: min_lr + (lr - min_lr) * cos_end,
        625_000: min_lr,
        10**7: min_lr,
    }
    for it, value in expected_lr.items():
        assert s["lr"][it] == pytest.approx(value, rel=1e-12, abs=1e-18), it

    # Last-layer lr: the lr schedule with the first freeze_last_layer_epochs (1) x 1250 iterations at 0.
    expected_last = {**expected_lr, 1249: 0.0, 1250: lr * 1250 / 99_999}
    for it, value in expected_last.items():
        assert s["last_layer_lr"][it] == pytest.approx(value, rel=1e-12, abs=1e-18), it

    # Weight decay 0.04 → 0.2 and teacher momentum 0.994 → 1.0: half-cosine over 625K, no warmup.
    wd_end = 0.5 * (1 + math.cos(math.pi * 624_999 / 625_000))
    for name, start, end in (("wd", 0.04, 0.2), ("momentum", 0.994, 1.0)):
        expected = {
            0: start,
            156_250: end + (start - end) * 0.5 * (1 + math.cos(math.pi / 4)),
            312_500: (start + end) / 2,
            624_999: end + (start - end) * wd_end,
            625_000: end,
            10**7: end,
        }
        for it, value in expected.items():
            assert s[name][it] == pytest.approx(value, rel=1e-12), (name, it)

    # Teacher temperature: 0.04 → 0.07 linearly over 30 x 1250 = 37 500 iterations (ends included), then 0.07.
    expected_temp = {
        0: 0.04,
        18_750: 0.04 + 0.03 * 18_750 / 37_499,
        37_499: 0.07,
        37_500: 0.07,
        624_999: 0.07,
        10**7: 0.07,
    }
    for it, value in expected_temp.items():
        assert s["teacher_temp"][it] == pytest.approx(value, rel=1e-12), it


def test_vitl14_finetune_schedules_at_key_iterations():
    # Finetune ViT-L/14 on 8 GPUs x 16: lr = 1.51e-5 * sqrt(128 / 1024); epoch = 200 iterations: 20K total,
    # 10K warmup, teacher-temperature warmup 6K, last layer frozen for 200.
    _, s = _recipe_schedules("finetune/vitl14_finetune.yaml", 8)
    lr, min_lr = 1.51e-5 * math.sqrt(0.125), 1e-6
    assert s["lr"][5_000] == pytest.approx(lr * 5_000 / 9_999, rel=1e-12)
    assert s["lr"][9_999] == pytest.approx(lr, rel=1e-12)
    assert s["lr"][15_000] == pytest.approx((lr + min_lr) / 2, rel=1e-12)
    assert s["lr"][20_000] == min_lr
    assert s["last_layer_lr"][199] == 0.0
    assert s["last_layer_lr"][200] == pytest.approx(lr * 200 / 9_999, rel=1e-12)
    assert s["teacher_temp"][3_000] == pytest.approx(0.04 + 0.03 * 3_000 / 5_999, rel=1e-12)
    assert s["teacher_temp"][6_000] == 0.07
    assert s["momentum"][10_000] == pytest.approx(0.997, rel=1e-12)
    assert s["wd"][10_000] == pytest.approx(0.12, rel=1e-12)


def test_build_schedules_needs_the_scaled_lr_and_a_short_enough_warmup():
    with pytest.raises(ConfigError, match="apply_scaling_rules"):
        build_schedules(load_config())
    cfg = apply_scaling_rules(load_config(None, ["optim.epochs=5", "optim.warmup_epochs=6"]), 1)
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs=6 exceeds optim\.epochs=5"):
        build_schedules(cfg)
