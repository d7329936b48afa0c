"""Sinkhorn-Knopp teacher targets (valeoai/Franca ``sinkhorn_knopp_teacher`` of ``MRLDINOLoss`` and
``MRLiBOTPatchLoss``), exact in value and safe for any logit scale.

The original builds Q = exp(t/τ)ᵀ [K, B] and repeats three times: divide each prototype row by its (all-reduced)
sum and by K, then each sample column by its sum and by the global sample count, finally multiplying that count
back. The scale factors K, the sample count and the iBOT variant's initial division by the global sum all cancel
exactly (the next normalisation removes any constant), so they are left out here: no sample count is communicated.

Two changes keep fp32 finite without changing the value in exact arithmetic:
- a per-prototype maximum (all-reduced with MAX) is subtracted before exponentiating; it scales a prototype row by a
  constant, which the first prototype normalisation absorbs. Then every prototype mass lies in [1, B_total].
- Q is kept as log Q. The per-sample normalisation is a ``logsumexp`` (no underflow of a sample whose logits are far
  below everyone else's), and the per-prototype normalisation needs only the plain sum of exp(log Q): after a sample
  normalisation every entry is ≤ 1 and every prototype mass is ≥ 1/K, so that sum neither overflows nor vanishes.
Communication per call: one MAX all-reduce of [K] and one SUM all-reduce of [K] per iteration, when
``torch.distributed`` is initialised. Ranks may hold different numbers of samples, zero included.

``sinkhorn_knopp_streaming`` computes the same targets for [B, K] logits that should never exist whole in fp32 (K up
to 131,072 prototypes): it keeps only [K] scalings and makes target rows chunk by chunk on demand (``SinkhornTargets``).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from franca.distributed.process_group import all_reduce_if_distributed
from franca.loss.chunked import TargetRows, chunk_bounds
from franca.utils.precision import at_least_fp32


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets [B, K] from logits [B, K] (samples × prototypes); each row (sample) sums to 1.

    Equal in exact arithmetic to the original's loop (``sinkhorn_knopp_teacher``) on the samples of all ranks together;
    computed in fp32 (float64 inputs in float64), with autocast disabled.
    """
    _check_arguments("sinkhorn_knopp", logits, temperature, n_iterations)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        scores = at_least_fp32(logits) / temperature
        n_samples, n_prototypes = scores.shape
        if n_samples:
            prototype_max = scores.amax(dim=0)
        else:
            prototype_max = scores.new_full((n_prototypes,), float("-inf"))
        all_reduce_if_distributed(prototype_max, dist.ReduceOp.MAX)
        log_q = scores - prototype_max
        for _ in range(n_iterations):
            prototype_mass = all_reduce_if_distributed(log_q.exp().sum(dim=0))
            log_q = log_q - prototype_mass.log()
            log_q = log_q - log_q.logsumexp(dim=1, keepdim=True)
        return log_q.exp()


def _check_arguments(name: str, logits: torch.Tensor, temperature: float, n_iterations: int) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} expects logits of shape [samples, prototypes], got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"{name} temperature={temperature} must be > 0 (teacher_temp, e.g. 0.04-0.07)")
    if n_iterations < 1:
        raise ValueError(f"{name} n_iterations={n_iterations} must be >= 1 (the original uses 3)")


@dataclass(frozen=True)
class SinkhornTargets(TargetRows):
    """Sinkhorn-Knopp targets kept as the teacher logits and two [K] vectors; rows are made on demand.

    Row b of the targets is softmax_k(s[b, k] − m_k + c_k) with s = logits/τ: m the all-reduced per-prototype maximum
    and c the accumulated per-prototype log-scaling (−Σ_i log of the prototype masses). The per-sample scaling r_b
    of the original's loop is the softmax's own normaliser −logsumexp_k(s[b, k] − m_k + c_k).
    """

    logits: torch.Tensor
    temperature: float
    prototype_max: torch.Tensor
    log_prototype_scale: torch.Tensor
    chunk_size: int

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    def rows(self, start: int, stop: int) -> torch.Tensor:
        with torch.autocast(device_type=self.logits.device.type, enabled=False):
            scores = _centred_scores(self.logits[start:stop], self.temperature, self.prototype_max)
            return scores.add_(self.log_prototype_scale).softmax(dim=-1)


def _centred_scores(logits: torch.Tensor, temperature: float, prototype_max: torch.Tensor) -> torch.Tensor:
    """logits/τ − m in fp32: the first step of ``sinkhorn_knopp`` on a chunk of rows."""
    return at_least_fp32(logits) / temperature - prototype_max


def _streamed_prototype_max(logits: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
    """Per-prototype max of logits/τ over the rows of all ranks ([K] fp32; −inf where there are no rows at all).

    Per chunk the max is taken in the input dtype and divided afterwards: rounding is monotone, so it is the max of
    the fp32 quotients exactly.
    """
    prototype_max = torch.full((logits.shape[1],), float("-inf"), device=logits.device)
    for start, stop in chunk_bounds(logits.shape[0], chunk_size):
        prototype_max = torch.maximum(prototype_max, logits[start:stop].amax(dim=0).float() / temperature)
    return all_reduce_if_distributed(prototype_max, dist.ReduceOp.MAX)


def _streamed_prototype_mass(
    logits: torch.Tensor,
    temperature: float,
    prototype_max: torch.Tensor,
    log_prototype_scale: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Σ_b Q[b, k] over the rows of all ranks, Q the current iterate ([K] fp32).

    Before the first prototype normalisation (``log_prototype_scale`` None) Q = exp(s − m); afterwards every
    iteration has ended with the sample normalisation, so Q's rows are softmax(s − m + c).
    """
    mass = torch.zeros(logits.shape[1], device=logits.device)
    for start, stop in chunk_bounds(logits.shape[0], chunk_size):
        scores = _centred_scores(logits[start:stop], temperature, prototype_max)
        q = scores.exp_() if log_prototype_scale is None else scores.add_(log_prototype_scale).softmax(dim=-1)
        mass += q.sum(dim=0)
    return all_reduce_if_distributed(mass)


@torch.no_grad()
def sinkhorn_knopp_streaming(
    logits: torch.Tensor, temperature: float, n_iterations: int = 3, chunk_size: int = 256
) -> SinkhornTargets:
    """``sinkhorn_knopp`` without any fp32 [B, K] tensor: passes over ``chunk_size`` rows at a time, in fp32 per chunk.

    Equal to ``sinkhorn_knopp`` in exact arithmetic, with the same communication (one MAX all-reduce of [K], one SUM
    all-reduce of [K] per iteration; ranks with zero rows take part). The per-sample normalisation of iteration i
    only depends on the prototype scaling c of that iteration, so the loop keeps c alone:
    c ← −log Σ_b exp(s − m), then n − 1 times c ← c − log Σ_b softmax(s − m + c); the targets are
    softmax(s − m + c), made per chunk by :meth:`SinkhornTargets.rows`. ``logits`` must stay unchanged while the
    targets are in use.
    """
    _check_arguments("sinkhorn_knopp_streaming", logits, temperature, n_iterations)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        prototype_max = _streamed_prototype_max(logits, temperature, chunk_size)
        log_scale = None
        for _ in range(n_iterations):
            mass = _streamed_prototype_mass(logits, temperature, prototype_max, log_scale, chunk_size)
            log_scale = -mass.log() if log_scale is None else log_scale - mass.log()
    return SinkhornTargets(logits, temperature, prototype_max, log_scale, chunk_size)
