"""Head-free distillation losses: a student's (projected) features against a frozen teacher's on the same crop
(training.md, "Distil"; the comparison is in benchmarks/RESULTS.md, "Distil (issue #24)").

Rows are features [N, D] (CLS tokens, or patch tokens flattened over the batch); each loss is a mean over rows.

- ``cosine``: 1 − cos(s, t), i.e. the squared distance of the L2-normalised features halved (the feature
  distillation of Beyer et al. 2022, arXiv 2106.05237, with teacher and student on the same crop);
- ``smooth_l1``: smooth-L1 (Huber, β) between the student's features and the teacher's standardised per row by a
  LayerNorm without affine parameters (the "whitened" targets of feature distillation, Wei et al. 2022,
  arXiv 2205.14141; the student keeps a free scale through its linear projection);
- ``kl_queue``: the teacher's and the student's softmax similarities to a queue of recent teacher CLS features
  (plus the batch's own), KL(teacher ‖ student): the relational distillation of SEED (Fang et al. 2021,
  arXiv 2101.04731) that lightly-train's distillation uses for image-level features (its documentation, "What's
  under the hood": a queue of teacher representations serves as a pseudo-classifier). It applies to CLS rows; patch
  rows use ``cosine``.

:class:`FeatureCenter` is the collapse guard of every variant: teacher features minus a running mean before they
become targets. A teacher's features can share a common direction (the spread sqrt(1 − ‖mean unit feature‖²) of
``franca.train.health`` says how much: 0.93 for the quickstart teacher's CLS tokens, ‖mean‖ = 0.37); a student that
outputs that direction for every image already scores cos = ‖mean‖ while telling no image apart, and the centred
targets leave only what differs between images. The student's own spread is logged (``student_cls_spread``) and
warned about when it collapses.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from franca.distributed.process_group import all_reduce_if_distributed
from franca.utils.precision import at_least_fp32

FEATURE_LOSSES = ("cosine", "smooth_l1", "kl_queue")


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over rows of 1 − cos(student_i, teacher_i), in fp32."""
    _check_rows(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        cosine = F.cosine_similarity(at_least_fp32(student), at_least_fp32(teacher), dim=-1, eps=1e-8)
        return (1.0 - cosine).mean()


def smooth_l1_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """mean over rows and features of smooth-L1_β(student, LayerNorm(teacher)), the LayerNorm without affine
    parameters (each teacher row standardised to zero mean and unit variance), in fp32."""
    _check_rows(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        target = F.layer_norm(at_least_fp32(teacher), teacher.shape[-1:], eps=1e-6)
        return F.smooth_l1_loss(at_least_fp32(student), target, beta=beta)


def queue_kl_loss(
    student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor, student_temp: float, teacher_temp: float
) -> torch.Tensor:
    """mean over rows of KL(p_t ‖ p_s), p = softmax(unit(x) · unit(keys)ᵀ / τ) over the keys [K, D], in fp32."""
    _check_rows(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        keys = F.normalize(at_least_fp32(keys), dim=-1)
        teacher_logits = F.normalize(at_least_fp32(teacher), dim=-1) @ keys.T / teacher_temp
        student_logits = F.normalize(at_least_fp32(student), dim=-1) @ keys.T / student_temp
        teacher_log_probs = teacher_logits.log_softmax(dim=-1)
        kl = (teacher_log_probs.exp() * (teacher_log_probs - student_logits.log_softmax(dim=-1))).sum(dim=-1)
        return kl.mean()


def _check_rows(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features must both be [N, D]: project "
            "the student to the teacher's width first"
        )


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every rank concatenated in rank order (equal row counts per rank); ``rows`` itself with one
    process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    out = rows.new_empty(dist.get_world_size() * rows.shape[0], *rows.shape[1:])
    dist.all_gather_into_tensor(out, rows.contiguous())
    return out


class FeatureCenter(nn.Module):
    """Running mean of the teacher's features over all ranks, subtracted before they become targets (module
    docstring): c ← m·c + (1 − m)·batch mean, after each step's loss; ``momentum`` 0 disables it (c stays 0)."""

    def __init__(self, dim: int, momentum: float):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"distill.center_momentum={momentum} must lie in [0, 1): 0 turns centring off, e.g. 0.9")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features - self.center.to(features.dtype) if self.momentum else features

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        """Fold the mean of ``features`` [..., D] over the rows of all ranks into the centre (the first batch sets
        it)."""
        if not self.momentum:
            return
        rows = at_least_fp32(features).reshape(-1, features.shape[-1])
        sum_and_count = torch.cat((rows.sum(dim=0), rows.new_tensor([rows.shape[0]])))
        all_reduce_if_distributed(sum_and_count)
        batch_mean = (sum_and_count[:-1] / sum_and_count[-1]).to(self.center.dtype)
        momentum = self.momentum if bool(self.initialised) else 0.0
        self.center.mul_(momentum).add_(batch_mean, alpha=1.0 - momentum)
        self.initialised.fill_(True)


class FeatureQueue(nn.Module):
    """The last ``size`` teacher CLS features of all ranks (first in, first out), a checkpointed buffer, and the keys
    of ``kl_queue``: the current batch's features of all ranks followed by the filled part of the queue (so that the
    loss of each rank is its share of the single-process loss on the whole batch)."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"distill.queue_size={size} must be >= 1 teacher features, e.g. 4096")
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def keys(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([gather_rows(batch), self.features[: int(self.filled)].to(batch.dtype)])

    @torch.no_grad()
    def push(self, batch: torch.Tensor) -> None:
        """Put the newest rows (this step's, all ranks) at the front, dropping the oldest beyond the size."""
        rows = gather_rows(batch.detach()).to(self.features.dtype)[: self.features.shape[0]]
        kept = min(int(self.filled), self.features.shape[0] - rows.shape[0])
        self.features[rows.shape[0] : rows.shape[0] + kept] = self.features[:kept].clone()
        self.features[: rows.shape[0]] = rows
        self.filled.fill_(rows.shape[0] + kept)
