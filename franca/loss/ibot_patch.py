"""iBOT masked-patch loss over Matryoshka levels (valeoai/Franca ``franca/loss/mrl_ibot_patch_loss.py``,
``MRLiBOTPatchLoss``).

L = Σ_l w_l · (−Σ_m masks_weight_m Σ_k T_l[m, k] log softmax(S_l[m]/τ_s)_k) / n_global_images, where m runs over the
masked patch tokens of this rank only and masks_weight_m = 1 / (number of masked tokens in the image of m). The
original's ``/(2B) × 2 × ½`` is this with n_global_images = 2B, the global crops on the rank, masked or not.

The inputs hold the real masked tokens only. The original applies the teacher head to a zero-padded buffer and lets
the padding rows into its Sinkhorn-Knopp (original ``SSLMetaArch.forward_backward``); here the targets come from
Sinkhorn-Knopp of each level on the real rows, so padding cannot shift them.
"""

from collections.abc import Iterator

import torch
from torch import nn

from franca.loss.chunked import Chunk, TargetRows, chunk_bounds, soft_cross_entropy
from franca.loss.dino_clstoken import level_weights_for
from franca.utils.precision import at_least_fp32


class IBOTPatchLoss(nn.Module):
    def __init__(self, student_temp: float = 0.1, level_weights: list[float] | None = None):
        super().__init__()
        self.student_temp = student_temp
        self.level_weights = None if level_weights is None else list(level_weights)

    def forward(
        self,
        student_levels: list[torch.Tensor],
        teacher_levels: list[torch.Tensor] | list[TargetRows],
        masks_weight: torch.Tensor,
        n_global_images: int,
    ) -> torch.Tensor:
        """Weighted cross-entropy of the masked tokens, summed over levels; every level is [M, K_l].

        Teacher levels are target tensors, or :class:`TargetRows` for the chunked path.
        """
        weights = level_weights_for(self.level_weights, student_levels, teacher_levels)
        if n_global_images < 1:
            raise ValueError(f"n_global_images={n_global_images} must be the number of global crops on this rank")
        n_masked = masks_weight.shape[0] if masks_weight.ndim == 1 else -1
        for level, (student, teacher) in enumerate(zip(student_levels, teacher_levels, strict=True)):
            if student.ndim != 2 or student.shape != teacher.shape or student.shape[0] != n_masked:
                raise ValueError(
                    f"level {level}: student {tuple(student.shape)}, teacher {tuple(teacher.shape)} and masks_weight "
                    f"{tuple(masks_weight.shape)} must be [M, K], [M, K] and [M] over the M real masked tokens "
                    "(no padding rows)"
                )
        with torch.autocast(device_type=masks_weight.device.type, enabled=False):
            token_weights = at_least_fp32(masks_weight)
            total = 0.0
            for weight, student, teacher in zip(weights, student_levels, teacher_levels, strict=True):
                total = total + weight * self._weighted_token_loss(student, teacher, token_weights)
            return total / n_global_images

    def _weighted_token_loss(
        self, student: torch.Tensor, teacher: torch.Tensor | TargetRows, token_weights: torch.Tensor
    ) -> torch.Tensor:
        """Σ_m masks_weight_m · CE(T[m], S[m]) of one level; chunk by chunk when the targets are ``TargetRows``."""
        if isinstance(teacher, TargetRows):
            return chunked_token_cross_entropy(student, teacher, token_weights, self.student_temp)
        log_probs = (at_least_fp32(student) / self.student_temp).log_softmax(dim=-1)
        token_losses = -(at_least_fp32(teacher) * log_probs).sum(dim=-1)
        return (token_weights * token_losses).sum()


def chunked_token_cross_entropy(
    student_logits: torch.Tensor, targets: TargetRows, token_weights: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Σ_m token_weights_m · CE(T[m], S[m]), targets and student softmax made ``targets.chunk_size`` rows at a time."""
    token_weights = token_weights.float().unsqueeze(-1)

    def plan() -> Iterator[Chunk]:
        for start, stop in chunk_bounds(targets.shape[0], targets.chunk_size):
            yield slice(start, stop), targets.rows(start, stop), token_weights[start:stop]

    return soft_cross_entropy(student_logits, student_temp, plan)
