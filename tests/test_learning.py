"""Learning on real photos: a tiny Franca run on the shipped Fashion-MNIST subset leaves the uniform targets and beats
the random-init k-NN floor (docs/training_dynamics.md); distilling its teacher into a student from random init, with
and without its heads, beats the student's floor (training.md, "Distil"); the adapt recipe moves its backbone to
handwritten digits and beats the frozen backbone there (training.md, "Adapt a backbone to your images").

Before the fix (DINOv2's std-0.02 head init, the teacher temperature warm-up 0.04 → 0.07, the teacher momentum
0.99 → 1.0) the same run ends with every DINO level's target and student entropy at 1.00 log K, and the
training-health monitor says so. No timing is asserted; the runs take about half a minute each on two cores, and the
tiny run is trained once per session (tests/conftest.py, ``learned_run``).
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import LEARNING, bundled_knn_sets, cls_knn

from franca.data.augmentations import make_classification_eval_transform
from franca.data.loaders import make_dataset
from franca.distill import __main__ as distill
from franca.hub import franca_from_checkpoint, load_backbone
from franca.train import train as trainer
from franca.train.config import load_config
from franca.train.health import level_values
from franca.train.ssl_meta_arch import build_backbone

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "train" / "adapt.yaml"
# Measured (2026-12-02, torch 2.14.1, 2 cores): the fix ends with DINO targets at 0.15-0.43 log K, students at
# 0.74-0.87, dino_local 9.71 against the uniform 11.55 and k-NN 67.2% against a 56.4% floor. KoLeo alone
# (dino.loss_weight=0 ibot.loss_weight=0) reaches 60.3%; with the pre-fix settings (PRE_FIX, 160 iterations) every
# DINO level sits at 1.00 for both, dino_local at 11.545 and k-NN at 58.3%.
PRE_FIX = [
    "dino.head_init=trunc_normal",
    "teacher.warmup_teacher_temp=0.04",
    "teacher.teacher_temp=0.07",
    "teacher.momentum_teacher=0.99",
    "teacher.final_momentum_teacher=1.0",
]
TARGET_ENTROPY_MAX = 0.6  # every DINO and iBOT level, as a fraction of log K (1 = uniform)
STUDENT_ENTROPY_MAX = 0.95  # every DINO level: the student's predictions differ between images
LOCAL_LOSS_MAX = 0.9  # dino_local as a fraction of its uniform value: the student predicts the targets
KNN_MARGIN = 7.0  # percentage points of CLS k-NN over the same ViT at random initialisation (KoLeo alone: +3.9)


def uniform_dino_local_loss() -> float:
    """(2L / (2 + 2L)) · Σ_l log K_l: the local-crop DINO loss of uniform predictions, L = 2 local crops, levels
    d = 64/16 … 64 with K_l = 128 · d / 64 prototypes."""
    prototypes = [128 * d // 64 for d in (4, 8, 16, 32, 64)]
    return 4 / 6 * sum(math.log(k) for k in prototypes)


@pytest.mark.slow
def test_tiny_franca_run_learns_to_cluster_real_photos(learned_run):
    out = learned_run

    last = json.loads((out / "training_metrics.json").read_text().splitlines()[-1])
    for head in ("dino", "ibot"):
        entropies = level_values(last, head, "target_entropy")
        assert len(entropies) == 5 and max(entropies) < TARGET_ENTROPY_MAX, (head, entropies)
    students = level_values(last, "dino", "student_entropy")
    assert max(students) < STUDENT_ENTROPY_MAX, students
    assert last["dino_local_crops_loss"] < LOCAL_LOSS_MAX * uniform_dino_local_loss()

    cfg = load_config(str(out / "config.yaml"), [])
    bank, test = bundled_knn_sets()
    torch.manual_seed(cfg.train.seed)
    floor = cls_knn(build_backbone(cfg, drop_path=False), bank, test)
    teacher = out / "eval" / "training_320" / "teacher_checkpoint.pth"  # the final one (training_0 is the start)
    learned = cls_knn(load_backbone(teacher), bank, test)
    assert learned > floor + KNN_MARGIN, (learned, floor)


@pytest.mark.slow
def test_pre_fix_settings_stall_at_uniform_targets_and_the_monitor_warns(tmp_path, capsys):
    config = tmp_path / "learning.yaml"
    config.write_text(LEARNING)
    out = tmp_path / "stalled"
    trainer.main(
        ["--config-file", str(config), "--output-dir", str(out), *PRE_FIX, "optim.epochs=4", "train.health_patience=60"]
    )
    last = json.loads((out / "training_metrics.json").read_text().splitlines()[-1])
    assert min(level_values(last, "dino", "target_entropy")) > 0.97
    assert min(level_values(last, "dino", "student_entropy")) > 0.97
    assert last["dino_local_crops_loss"] > 0.99 * uniform_dino_local_loss()
    printed = capsys.readouterr().out
    assert printed.count("the DINO clustering is stalled at uniform targets") == 1
    assert "every DINO level's teacher-target entropy is above 0.97" in printed
    assert "teacher.teacher_temp" in printed


# The learning test's distillation: the learned run's teacher (tests/conftest.py ``learned_run``: 64-d, 2 blocks,
# 67.1% CLS k-NN on the shipped subset) into a student of its shape from random init (56.4%), 160 iterations of 32.
# Measured (2026-12-07, torch 2.14.1, 2 cores) at base_lr 0.01: heads 64.3% (+7.9), features with the default
# kl_queue 66.5% (+10.1), with cosine 65.2% (+8.8); at base_lr 0.004 heads gained only +4.0 in the same iterations.
LEARNING_DISTILL_RUN = """
train: {batch_size_per_gpu: 32, dataset_path: "FashionMNIST:root=bundled:split=train", OFFICIAL_EPOCH_LENGTH: 40,
        num_workers: 0, log_period: 20, seed: 0}
student: {arch: vit_tiny, embed_dim: 64, depth: 2, num_heads: 2, patch_size: 4, drop_path_rate: 0.0, block_chunks: 0,
          layerscale: 0.1, ffn_layer: swiglufused}
teacher: {warmup_teacher_temp: 0.01, teacher_temp: 0.01, warmup_teacher_temp_epochs: 1}
optim: {epochs: 4, warmup_epochs: 1, base_lr: 0.01, weight_decay_end: 0.2, layerwise_decay: 1.0,
        freeze_last_layer_epochs: 0}
crops: {global_crops_size: 16, local_crops_size: 8, local_crops_number: 2, batched_photometric: "true"}
evaluation: {eval_period_iterations: 0}
compute_precision: {dtype: fp32, compile: "false", chunked_losses: "false"}
"""
DISTILL_KNN_MARGIN = 4.0  # percentage points over the student at initialisation (about half the measured gains)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["heads", "features"])
def test_distillation_learns_on_the_shipped_subset(learned_run, mode, tmp_path):
    config = tmp_path / "distill.yaml"
    config.write_text(LEARNING_DISTILL_RUN)
    teacher = learned_run / "eval" / "training_320" / "teacher_checkpoint.pth"
    out = tmp_path / "run"
    distill.main(
        ["--config-file", str(config), "--output-dir", str(out), f"teacher.weights={teacher}", f"distill.mode={mode}"]
    )
    bank, test = bundled_knn_sets()
    floor = cls_knn(franca_from_checkpoint(out / "eval" / "training_0" / "teacher_checkpoint.pth"), bank, test)
    learned = cls_knn(franca_from_checkpoint(out / "eval" / "training_160" / "teacher_checkpoint.pth"), bank, test)
    assert learned > floor + DISTILL_KNN_MARGIN, (mode, learned, floor)


# The two-stage recipe (configs/train/adapt.yaml: its stage lengths scaled from 30 + 50 of 300 iterations to 16 + 27 of
# 160, its lr multiplier as it is) on a real target that ships with scikit-learn: the learned run's teacher
# (tests/conftest.py ``learned_run``, Fashion-MNIST; its own heads start the heads) adapted to the handwritten digits
# at 16 px (benchmarks/adapt.py's split: 1,258 train / 539 test images). Measured: see ADAPT_KNN_MARGIN.
STAGE_ONE_ITERATIONS = 16
LEARNING_ADAPT = [
    "dino.head_n_prototypes=128",
    "dino.head_bottleneck_dim=32",
    "dino.head_hidden_dim=128",
    "ibot.head_n_prototypes=128",
    "ibot.head_bottleneck_dim=32",
    "ibot.head_hidden_dim=128",
    "train.batch_size_per_gpu=32",
    "train.OFFICIAL_EPOCH_LENGTH=40",
    "train.num_workers=0",
    "train.log_period=10",
    "optim.epochs=4",
    f"train.freeze_backbone_iterations={STAGE_ONE_ITERATIONS}",
    "optim.backbone_warmup_iterations=27",
    "crops.local_crops_number=2",
    "compute_precision.dtype=fp32",
    "compute_precision.compile=false",
    "compute_precision.chunked_losses=false",
]
# Percentage points of digits k-NN over the frozen source. Measured (2026-12-07, torch 2.14.1, 2 cores): frozen 49.2%,
# adapted 54.2% (+5.0; 96.7% of the source k-NN kept); stages of 40 + 20 iterations with the backbone at 0.1 x the lr
# (the former recipe's) gave +0.4 (benchmarks/RESULTS.md, "Adapt").
ADAPT_KNN_MARGIN = 2.0
# Every DINO / iBOT level's target entropy at the end of stage 1, as a fraction of log K: the pretrained features give
# sharp, image-dependent targets (measured ≤ 0.70; they are already 0.26-0.53 at iteration 0, since Sinkhorn-Knopp at
# teacher_temp 0.01 sharpens even fresh heads' scores), so this catches heads collapsing to uniform, not a fall.
STAGE_ONE_TARGET_ENTROPY_MAX = 0.9


@pytest.mark.slow
def test_two_stages_adapt_a_learned_backbone_to_handwritten_digits(learned_run, tmp_path):
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from adapt import write_target

    source = learned_run / "eval" / "training_320" / "teacher_checkpoint.pth"
    digits = write_target("digits", 16, tmp_path / "digits")
    out = tmp_path / "adapted"
    argv = ["--config-file", str(RECIPE), "--output-dir", str(out), f"student.pretrained_weights={source}"]
    trainer.main([*argv, f"train.dataset_path=ImageFolder:root={digits / 'train'}", *LEARNING_ADAPT])

    records = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    stage_one = [r for r in records if 0 <= r["iteration"] < STAGE_ONE_ITERATIONS]
    assert all(r["drift_cls_cos"] == 1.0 for r in stage_one)  # the backbone waits while the heads learn
    for head in ("dino", "ibot"):
        entropies = level_values(stage_one[-1], head, "target_entropy")
        assert max(entropies) < STAGE_ONE_TARGET_ENTROPY_MAX, (head, entropies)
    assert records[-1]["drift_cls_cos"] < 1.0  # then the backbone moved

    transform = make_classification_eval_transform(resize_size=16, crop_size=16)
    bank = make_dataset(f"ImageFolder:root={digits / 'train'}", transform=transform)
    test = make_dataset(f"ImageFolder:root={digits / 'test'}", transform=transform)
    frozen = cls_knn(franca_from_checkpoint(source), bank, test)
    adapted = cls_knn(franca_from_checkpoint(out / "eval" / "training_160" / "teacher_checkpoint.pth"), bank, test)
    assert adapted > frozen + ADAPT_KNN_MARGIN, (adapted, frozen)
