"""Soft cross-entropy computed chunk by chunk over rows, for [tokens × K] logits with K up to 131,072 (Franca's losses).

The plain DINO and iBOT losses hold the student's fp32 log-softmax and the teacher's fp32 targets whole, for each
Matryoshka level. Here both exist one chunk of rows at a time: targets come from a :class:`TargetRows` (for
Sinkhorn-Knopp, the teacher logits and a few [K] scalings, see ``sinkhorn_knopp_streaming``), and
:class:`SoftCrossEntropy` recomputes each chunk's softmax and targets in backward instead of saving them. The value is
the plain losses' in exact arithmetic.

Every such loss is L = −Σ_r a_r ⟨w_r, log softmax(x_r/τ)⟩ over student rows r, with w_r a sum of target rows and a_r a
row weight. Its gradient needs no log-softmax: ∂L/∂x_r = a_r (softmax(x_r/τ) · Σ_k w_r,k − w_r) / τ.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

# One chunk of a loss: the student rows it covers, their summed targets w [n, K] (fp32) and row weights a [n, 1].
Chunk = tuple[slice, torch.Tensor, torch.Tensor]
ChunkPlan = Callable[[], Iterator[Chunk]]


class TargetRows(ABC):
    """Teacher targets [B, K] served ``chunk_size`` rows at a time, so that they are never held whole in fp32."""

    chunk_size: int

    @property
    @abstractmethod
    def shape(self) -> torch.Size:
        """[B, K] of the targets."""

    @abstractmethod
    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Target rows ``start:stop`` in fp32; each row sums to 1."""


@dataclass(frozen=True)
class DenseTargets(TargetRows):
    """Targets that already exist whole (softmax centering, whose centre moves right after), served by chunks."""

    probs: torch.Tensor
    chunk_size: int

    @property
    def shape(self) -> torch.Size:
        return self.probs.shape

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.probs[start:stop].float()


@dataclass(frozen=True)
class RowRange(TargetRows):
    """Rows ``start:stop`` of other targets, served by the same chunks (one micro-batch's share of targets made for
    an accumulated batch)."""

    parent: TargetRows
    start: int
    stop: int

    @property
    def chunk_size(self) -> int:
        return self.parent.chunk_size

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.stop - self.start, self.parent.shape[1]))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.parent.rows(self.start + start, self.start + stop)


def target_rows(targets: torch.Tensor | TargetRows, start: int, stop: int) -> torch.Tensor | TargetRows:
    """Rows ``start:stop`` of targets held whole (a tensor view) or served by chunks (a :class:`RowRange`)."""
    return targets[start:stop] if isinstance(targets, torch.Tensor) else RowRange(targets, start, stop)


def chunk_bounds(n_rows: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks of at most ``chunk_size`` rows covering ``n_rows``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (compute_precision.loss_chunk_size, e.g. 256)")
    for start in range(0, n_rows, chunk_size):
        yield start, min(start + chunk_size, n_rows)


class SoftCrossEntropy(torch.autograd.Function):
    """L = −Σ over the plan's chunks of Σ_r a_r ⟨w_r, log softmax(x_r/τ)⟩, in fp32 per chunk.

    ``plan()`` yields the chunks; it is called again in backward, which recomputes each chunk's targets and softmax,
    so only the student logits are saved. Rows not covered by the plan get a zero gradient.
    """

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, student_temp: float, plan: ChunkPlan) -> torch.Tensor:
        ctx.save_for_backward(student_logits)
        ctx.student_temp, ctx.plan = student_temp, plan
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            for rows, weights, row_scale in plan():
                log_probs = (student_logits[rows].float() / student_temp).log_softmax(dim=-1)
                total -= (log_probs.mul_(weights).sum(dim=-1, keepdim=True) * row_scale).sum()
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        (student_logits,) = ctx.saved_tensors
        student_temp = ctx.student_temp
        grad = torch.zeros_like(student_logits)
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            for rows, weights, row_scale in ctx.plan():
                probs = (student_logits[rows].float() / student_temp).softmax(dim=-1)
                row_grad = probs.mul_(weights.sum(dim=-1, keepdim=True)).sub_(weights)
                grad[rows].add_(row_grad.mul_(row_scale * (grad_total / student_temp)).to(grad.dtype))
        return grad, None, None


def soft_cross_entropy(student_logits: torch.Tensor, student_temp: float, plan: ChunkPlan) -> torch.Tensor:
    """The chunked loss of ``plan`` (see :class:`SoftCrossEntropy`); a 0-dim fp32 tensor."""
    return SoftCrossEntropy.apply(student_logits, student_temp, plan)
