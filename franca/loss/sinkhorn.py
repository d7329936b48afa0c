"""Sinkhorn-Knopp teacher targets (reference §3.3), exact in value and safe for any logit scale.

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
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_if_distributed(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` in place across ranks when torch.distributed is initialised; return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets [B, K] from logits [B, K] (samples × prototypes); each row (sample) sums to 1.

    Equal in exact arithmetic to the original's loop (§3.3) on the samples of all ranks together; computed in fp32
    whatever the input dtype, with autocast disabled.
    """
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects logits of shape [samples, prototypes], got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"sinkhorn_knopp temperature={temperature} must be > 0 (teacher_temp, e.g. 0.04-0.07)")
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp n_iterations={n_iterations} must be >= 1 (the original uses 3)")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        scores = logits.float() / temperature
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


def sinkhorn_knopp_levels(
    logits_levels: list[torch.Tensor], temperature: float, n_iterations: int = 3
) -> list[torch.Tensor]:
    """Sinkhorn-Knopp targets for each Matryoshka level independently (§3.3: DINO and iBOT alike)."""
    return [sinkhorn_knopp(logits, temperature, n_iterations) for logits in logits_levels]
