"""DINO cross-entropy between teacher targets and student CLS logits over crop pairs (valeoai/Franca
``franca/loss/mrl_dino_loss.py``, ``MRLDINOLoss``).

CE(t, s) = −Σ_k t_k log softmax(s/τ_s)_k. For one level, the loss sums over (student crop, teacher crop) pairs the
batch mean of CE; the original sums the Matryoshka levels with equal weight. The meta-architecture divides the
local and global parts by the number of pairs, 2 + 2L for 2 global and L local crops (18 with L = 8), so each level
contributes the mean over its pairs.
"""

from collections.abc import Iterator

import torch
from torch import nn

from franca.loss.chunked import Chunk, TargetRows, chunk_bounds, soft_cross_entropy
from franca.utils.precision import at_least_fp32


def _check_crop_major(name: str, shape: torch.Size, n_crops: int) -> int:
    if len(shape) != 2 or n_crops < 1 or shape[0] % n_crops:
        raise ValueError(
            f"{name} must be [n_crops·B, K] with rows grouped crop by crop; got shape {tuple(shape)} "
            f"for n_crops={n_crops}"
        )
    return shape[0] // n_crops


def _check_crop_pairs(student_shape: torch.Size, teacher_shape: torch.Size, n_student: int, n_teacher: int) -> int:
    """The images per crop B, after checking both row layouts are crop-major [crops·B, K] with the same B and K."""
    batch_size = _check_crop_major("student_logits", student_shape, n_student)
    teacher_batch_size = _check_crop_major("teacher_probs", teacher_shape, n_teacher)
    if batch_size != teacher_batch_size or student_shape[1] != teacher_shape[1]:
        raise ValueError(
            f"student_logits {tuple(student_shape)} ({n_student} crops) and teacher_probs "
            f"{tuple(teacher_shape)} ({n_teacher} crops) must share the images per crop and the "
            "number of prototypes"
        )
    return batch_size


def dino_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_temp: float,
    n_student_crops: int,
    n_teacher_crops: int,
    skip_same_view: bool = False,
) -> torch.Tensor:
    """Σ over crop pairs (s, t) of mean_b CE(T[t, b], S[s, b]) for one level; crop-major rows [crops·B, K].

    ``skip_same_view`` leaves out the pairs s == t (global student crops against the teacher's view of the same
    crop). The student log-softmax is computed in fp32.
    """
    batch_size = _check_crop_pairs(student_logits.shape, teacher_probs.shape, n_student_crops, n_teacher_crops)
    n_prototypes = student_logits.shape[1]
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student_log_probs = (at_least_fp32(student_logits) / student_temp).log_softmax(dim=-1)
        student_log_probs = student_log_probs.reshape(n_student_crops, batch_size * n_prototypes)
        teacher = at_least_fp32(teacher_probs).reshape(n_teacher_crops, batch_size * n_prototypes)
        # Σ_{s,t} ⟨T_t, log P_s⟩ = ⟨Σ_t T_t, Σ_s log P_s⟩: elementwise in fp32 (no TF32 matmul), O(B·K) memory.
        cross_sum = (teacher.sum(dim=0) * student_log_probs.sum(dim=0)).sum()
        if skip_same_view:
            n_shared = min(n_student_crops, n_teacher_crops)
            cross_sum = cross_sum - (teacher[:n_shared] * student_log_probs[:n_shared]).sum()
        return -cross_sum / batch_size


def chunked_dino_cross_entropy(
    student_logits: torch.Tensor,
    targets: TargetRows,
    student_temp: float,
    n_student_crops: int,
    n_teacher_crops: int,
    skip_same_view: bool = False,
) -> torch.Tensor:
    """``dino_cross_entropy`` with targets served by chunks of images and the student softmax made per chunk.

    Each chunk takes the same images of every crop: its teacher rows are summed once over the teacher crops (less
    the same view where skipped) and are the targets of every student crop's rows of those images.
    """
    batch_size = _check_crop_pairs(student_logits.shape, targets.shape, n_student_crops, n_teacher_crops)
    n_shared = min(n_student_crops, n_teacher_crops) if skip_same_view else 0

    def plan() -> Iterator[Chunk]:
        for start, stop in chunk_bounds(batch_size, targets.chunk_size):
            teacher = [targets.rows(t * batch_size + start, t * batch_size + stop) for t in range(n_teacher_crops)]
            row_scale = teacher[0].new_full((stop - start, 1), 1.0 / batch_size)
            all_views = _sum(teacher) if n_student_crops > n_shared else None
            for s in range(n_student_crops):
                other_views = teacher[:s] + teacher[s + 1 :] if s < n_shared else None
                if other_views == []:
                    continue  # its only teacher crop is its own view: no pair, as in the plain loss
                weights = _sum(other_views) if other_views else all_views
                yield slice(s * batch_size + start, s * batch_size + stop), weights, row_scale

    return soft_cross_entropy(student_logits, student_temp, plan)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ of a non-empty list; a single tensor is returned as it is (no copy)."""
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total


class DINOLoss(nn.Module):
    """Σ_l w_l · dino_cross_entropy(level l); w_l = 1 for every level by default, as the original.

    A teacher level given as :class:`TargetRows` (the chunked path) goes through ``chunked_dino_cross_entropy``.
    """

    def __init__(self, student_temp: float = 0.1, level_weights: list[float] | None = None):
        super().__init__()
        self.student_temp = student_temp
        self.level_weights = None if level_weights is None else list(level_weights)

    def forward(
        self,
        student_levels: list[torch.Tensor],
        teacher_levels: list[torch.Tensor] | list[TargetRows],
        n_student_crops: int,
        n_teacher_crops: int,
        skip_same_view: bool = False,
    ) -> torch.Tensor:
        weights = level_weights_for(self.level_weights, student_levels, teacher_levels)
        return sum(
            weight * _level_loss(t)(s, t, self.student_temp, n_student_crops, n_teacher_crops, skip_same_view)
            for weight, s, t in zip(weights, student_levels, teacher_levels, strict=True)
        )


def _level_loss(teacher: torch.Tensor | TargetRows):
    return chunked_dino_cross_entropy if isinstance(teacher, TargetRows) else dino_cross_entropy


def level_weights_for(
    level_weights: list[float] | None, student_levels: list[torch.Tensor], teacher_levels: list[torch.Tensor]
) -> list[float]:
    """The per-level weights (1 each when unset), after checking both lists have the same number of levels."""
    if len(student_levels) != len(teacher_levels) or not student_levels:
        raise ValueError(
            f"got {len(student_levels)} student and {len(teacher_levels)} teacher levels; pass one tensor per "
            "Matryoshka level for both (at least one)"
        )
    if level_weights is None:
        return [1.0] * len(student_levels)
    if len(level_weights) != len(student_levels):
        raise ValueError(
            f"level_weights={level_weights} has {len(level_weights)} entries for {len(student_levels)} levels; "
            "give one weight per level or leave it unset"
        )
    return level_weights
