"""Softmax centering of teacher logits (DINO's ``centering: centering``), one centre per Matryoshka level.

The original keeps a single [1, K] centre that cannot be subtracted from the smaller levels (broken with MRL,
valeoai/Franca ``franca/loss/mrl_dino_loss.py``; docs/deviations.md); here level l has its own centre [1, K_l]. Targets
use the current centres; call ``update`` afterwards with the same teacher logits, as DINOv2 does.
"""

import torch
from torch import nn

from franca.distributed.process_group import all_reduce_if_distributed
from franca.utils.precision import at_least_fp32


class SoftmaxCentering(nn.Module):
    """Targets softmax((t − c_l)/τ_t) per level; c_l ← m·c_l + (1 − m)·mean of the teacher logits over all ranks."""

    def __init__(self, out_dims: list[int], center_momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum={center_momentum} must lie in [0, 1] (DINO uses 0.9)")
        self.out_dims = list(out_dims)
        self.center_momentum = center_momentum
        for level, n_prototypes in enumerate(self.out_dims):
            self.register_buffer(f"center_{level}", torch.zeros(1, n_prototypes))

    @property
    def centers(self) -> list[torch.Tensor]:
        return [getattr(self, f"center_{level}") for level in range(len(self.out_dims))]

    def _check_levels(self, teacher_logits_levels: list[torch.Tensor]) -> None:
        widths = [logits.shape[-1] for logits in teacher_logits_levels]
        if widths != self.out_dims:
            raise ValueError(
                f"SoftmaxCentering was built for prototype counts {self.out_dims} but got logits with last dims "
                f"{widths}; build it with the head's out_dims"
            )

    @torch.no_grad()
    def targets(self, teacher_logits_levels: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        """Centred, sharpened teacher probabilities, one tensor per level (fp32)."""
        self._check_levels(teacher_logits_levels)
        return [
            ((at_least_fp32(logits) - center) / teacher_temp).softmax(dim=-1)
            for logits, center in zip(teacher_logits_levels, self.centers, strict=True)
        ]

    @torch.no_grad()
    def update(self, teacher_logits_levels: list[torch.Tensor]) -> None:
        """EMA-update each centre with the mean teacher logit over the rows of all ranks (uneven batches allowed)."""
        self._check_levels(teacher_logits_levels)
        for logits, center in zip(teacher_logits_levels, self.centers, strict=True):
            rows = at_least_fp32(logits).reshape(-1, logits.shape[-1])
            sum_and_count = torch.cat((rows.sum(dim=0), rows.new_tensor([rows.shape[0]])))
            all_reduce_if_distributed(sum_and_count)
            batch_mean = sum_and_count[:-1] / sum_and_count[-1]
            center.mul_(self.center_momentum).add_(batch_mean.to(center.dtype), alpha=1.0 - self.center_momentum)
