"""The config of ``python -m franca.distill``: the training config's keys plus ``teacher.weights`` and the ``distill``
section (``franca/configs/distill_default_config.yaml``), validated like the training config.

The training config's types, choices, ranges and constraints apply, with three differences: ``student.arch`` also
takes ``timm:<name>`` (checked here, since the training schema lists the ViT names only); the constraints on the
student's shape apply to ViT students only; and the student's head sizes are not checked against ``dino.*`` /
``ibot.*`` because a distilled student's heads copy the teacher's shape (``franca.layers.head_spec``).
"""

import os
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

from franca.loss.feature_distill import FEATURE_LOSSES
from franca.models.config import ARCHITECTURES
from franca.models.timm_backbone import TIMM_PREFIX, is_timm_arch
from franca.train import config as training
from franca.utils.config_schema import ConfigSchema

DISTILL_DEFAULT_FILE = Path(__file__).parents[1] / "configs" / "distill_default_config.yaml"
DISTILL_MODES = ("auto", "heads", "features")

CHOICES = {
    **{key: values for key, values in training.CHOICES.items() if key != "student.arch"},
    "distill.mode": DISTILL_MODES,
    "distill.feature_loss": FEATURE_LOSSES,
}
DISTILL_SCHEMA = ConfigSchema(
    (training.DEFAULT_CONFIG_FILE, DISTILL_DEFAULT_FILE),
    CHOICES,
    training.TRAINING_SCHEMA.list_item_types,
    training.TRAINING_SCHEMA.pairs,
    label="distill config",
    example="teacher.weights=runs/quickstart/eval/training_300/teacher_checkpoint.pth",
)
VALUE_RULES = {
    **training.VALUE_RULES,
    "distill.cls_loss_weight": training.at_least(0, "it weights the head-free CLS term, e.g. 1"),
    "distill.patch_loss_weight": training.at_least(0, "it weights the head-free patch term, e.g. 1; 0 = CLS only"),
    "distill.center_momentum": training.within(0, 1, "e.g. 0.9; 0 turns the centring off", high_open=True),
    "distill.smooth_l1_beta": training.above(0, "the smooth-L1 threshold, e.g. 1.0"),
    "distill.queue_size": training.at_least(1, "teacher features kept for kl_queue, e.g. 4096"),
    "distill.queue_teacher_temp": training.above(0, "the teacher's softmax temperature of kl_queue, e.g. 0.05"),
    "distill.queue_student_temp": training.above(0, "the student's softmax temperature of kl_queue, e.g. 0.1"),
}


def _teacher_given(cfg: DictConfig) -> list[str]:
    if cfg.teacher.weights:
        return []
    return [
        "teacher.weights is empty: give the teacher to distil, e.g. teacher.weights=franca_vitb14:IN21K or "
        "teacher.weights=runs/quickstart/eval/training_300/teacher_checkpoint.pth"
    ]


def _student_arch_known(cfg: DictConfig) -> list[str]:
    arch = cfg.student.arch
    if arch in ARCHITECTURES or (is_timm_arch(arch) and arch != TIMM_PREFIX):
        return []
    return [f"student.arch={arch!r} is unknown; use one of {sorted(ARCHITECTURES)} or {TIMM_PREFIX}<timm model name>"]


def _timm_student_settings(cfg: DictConfig) -> list[str]:
    """A timm student is stored with its own keys (no ViT block chunks) and starts from random weights."""
    if not is_timm_arch(cfg.student.arch):
        return []
    problems = []
    if cfg.student.block_chunks:
        problems.append(
            f"student.block_chunks={cfg.student.block_chunks} names the ViT blocks of the export; a timm student "
            f"({cfg.student.arch}) has none: set student.block_chunks=0"
        )
    if cfg.student.pretrained_weights:
        problems.append(
            f"student.pretrained_weights={cfg.student.pretrained_weights!r} reads franca ViT weights; a timm student "
            "starts from random weights: set student.pretrained_weights=''"
        )
    return problems


def _for_vit_students(constraint: training.Constraint) -> training.Constraint:
    """``constraint`` on ViT students; nothing to check for a timm student (or an unknown arch, reported alone)."""

    def check(cfg: DictConfig) -> list[str]:
        return constraint(cfg) if cfg.student.arch in ARCHITECTURES else []

    return check


CONSTRAINTS = (
    _teacher_given,
    _student_arch_known,
    _timm_student_settings,
    training._crops_fit_the_patch,
    _for_vit_students(training._width_splits_into_heads),
    _for_vit_students(training._block_chunks_fit_the_depth),
    training._koleo_has_neighbours,
    training._freeze_within_the_run,
    training._stages_within_the_run,
    training._knn_datasets_paired,
    training._initial_weights_consistent,
)


DISTILL_CONFIG = training.CommandConfig(DISTILL_SCHEMA, VALUE_RULES, CONSTRAINTS)


def load_distill_config(config_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Distill config: training defaults ← distill defaults ← ``config_file`` ← ``overrides``, validated."""
    return DISTILL_CONFIG.load(config_file, overrides)
