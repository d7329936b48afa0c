"""Training health: is the clustering learning, stalled at uniform targets, or collapsing? (docs/training_dynamics.md)

DINO-family runs fail quietly: the DINO / iBOT losses settle at Σ_l log K_l (every target uniform) while KoLeo and the
total loss still move, or every image gets the same feature. Neither dinov2, dinov3 nor lightly report it. Here, on the
iterations that are logged, the meta-architecture measures from tensors it already holds (no extra forward, no host
sync until the log line is written):

- per head (``dino``, ``ibot``) and Matryoshka level l: the teacher targets' mean entropy as a fraction of log K_l
  (1 = uniform targets, nothing to learn), the student's prediction entropy likewise, and the distinct prototypes that
  are the arg-max of some sample's target, as a fraction of min(samples, K_l);
- ``teacher_cls_spread`` = sqrt(1 − ‖mean_b x̂_b‖²) of the teacher's L2-normalised CLS features x̂: 0 when every image
  has the same feature (collapse), 1 when they spread evenly over the sphere. Distillation (whose teacher is fixed)
  adds ``student_cls_spread``, the same statistic of the student's CLS features: every ``*_cls_spread`` entry is
  reduced and watched alike.

Each is taken over the rows of all ranks (:func:`reduce_stats`), as if one process held the global batch.
:class:`HealthMonitor` reads them at each log line and prints one warning, naming the symptom and the knobs, when a
head's targets stay above ``train.health_entropy_threshold`` · log K at every level (a full stall), or a spread stays
below ``train.health_min_cls_spread``, for ``train.health_patience`` iterations. A partial stall (targets at 0.9 log K)
does not warn; it shows as DINO / iBOT losses close to their uniform values.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from franca.distributed.process_group import all_reduce_if_distributed
from franca.loss.chunked import TargetRows, chunk_bounds

DEFAULT_CHUNK_ROWS = 1024
SPREAD_SUFFIX = "_cls_spread"
# What to turn when a model's CLS features collapse, by the model whose spread it is.
COLLAPSE_KNOBS = {
    "teacher": "raise dino.koleo_loss_weight, lower optim.base_lr, raise teacher.momentum_teacher",
    "student": "raise dino.koleo_loss_weight, lower optim.base_lr, keep distill.center_momentum above 0",
}


@dataclass
class LevelStats:
    """One Matryoshka level's raw statistics on this rank, reduced over ranks by :func:`reduce_stats`."""

    target_entropy_sum: torch.Tensor  # Σ over rows of the target entropy (nats)
    student_entropy_sum: torch.Tensor  # Σ over the student's rows of its prediction entropy (nats)
    n_rows: torch.Tensor  # target rows on this rank (0 is allowed: a rank without masked tokens)
    n_student_rows: torch.Tensor  # student rows on this rank (DINO: every crop's CLS; iBOT: the masked tokens)
    won: torch.Tensor  # [K] bool: prototypes that are the arg-max of at least one target row


@dataclass
class SpreadStats:
    """Σ of the L2-normalised teacher CLS features [D] and their count, on this rank."""

    unit_sum: torch.Tensor
    n_rows: torch.Tensor


def _entropy_sum(logits_or_probs: torch.Tensor, from_logits: bool) -> torch.Tensor:
    """Σ over rows of the entropy of each row's distribution, in fp32: H = logsumexp(z) − Σ softmax(z)·z from logits,
    −Σ p log p from probabilities (0 log 0 = 0)."""
    x = logits_or_probs.float()
    if from_logits:
        return (x.logsumexp(dim=-1) - (x.softmax(dim=-1) * x).sum(dim=-1)).sum()
    return -(x * x.clamp_min(1e-30).log()).sum()


def _target_chunks(targets: torch.Tensor | TargetRows, chunk_size: int):
    for start, stop in chunk_bounds(targets.shape[0], chunk_size):
        yield targets.rows(start, stop) if isinstance(targets, TargetRows) else targets[start:stop]


@torch.no_grad()
def level_stats(
    targets: torch.Tensor | TargetRows,
    student_logits: torch.Tensor,
    student_temp: float,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
) -> LevelStats:
    """Raw statistics of one level: targets [B, K] (a tensor, or :class:`TargetRows` of the chunked path) and the
    student logits [M, K]; both read ``chunk_size`` rows at a time, so no fp32 [rows × K] tensor is made whole."""
    device = student_logits.device
    target_entropy = torch.zeros((), device=device)
    won = torch.zeros(targets.shape[1], dtype=torch.bool, device=device)
    for rows in _target_chunks(targets, chunk_size):
        target_entropy += _entropy_sum(rows, from_logits=False)
        won[rows.argmax(dim=-1)] = True
    student_entropy = torch.zeros((), device=device)
    for start, stop in chunk_bounds(student_logits.shape[0], chunk_size):
        student_entropy += _entropy_sum(student_logits[start:stop].detach() / student_temp, from_logits=True)
    n_rows = torch.tensor(float(targets.shape[0]), device=device)
    n_student_rows = torch.tensor(float(student_logits.shape[0]), device=device)
    return LevelStats(target_entropy, student_entropy, n_rows, n_student_rows, won)


@torch.no_grad()
def spread_stats(features: torch.Tensor) -> SpreadStats:
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return SpreadStats(unit.sum(dim=0), torch.tensor(float(unit.shape[0]), device=unit.device))


def head_stats(
    name: str, targets: list, student_logits: list[torch.Tensor], student_temp: float, chunk_size: int
) -> dict[str, LevelStats]:
    """``{f"{name}_l{level}": LevelStats}`` for each level of one head."""
    return {
        f"{name}_l{level}": level_stats(target, student, student_temp, chunk_size)
        for level, (target, student) in enumerate(zip(targets, student_logits, strict=True))
    }


def reduce_stats(raw: dict[str, LevelStats | SpreadStats]) -> dict[str, float]:
    """The logged statistics over the rows of all ranks (a collective: every rank calls it with the same keys).

    Per level ``{head}_l{i}``: ``{head}_target_entropy_l{i}`` and ``{head}_student_entropy_l{i}`` (mean entropy /
    log K), and ``{head}_prototypes_used_l{i}`` = distinct arg-max prototypes of the targets / min(rows, K), i.e. 1
    when every row could have had its own prototype and did; ``teacher_cls_spread`` = sqrt(1 − ‖mean of the unit
    CLS features‖²): 0 when every image has the same feature, 1 when they spread evenly over the sphere. A level with
    no rows on any rank is left out. One SUM all-reduce for the counts and sums, one MAX all-reduce for the
    prototype masks.
    """
    levels = {k: v for k, v in raw.items() if isinstance(v, LevelStats)}
    spreads = {k: v for k, v in raw.items() if isinstance(v, SpreadStats)}
    sums = [
        t for v in levels.values() for t in (v.target_entropy_sum, v.student_entropy_sum, v.n_rows, v.n_student_rows)
    ]
    for spread in spreads.values():
        sums += [*spread.unit_sum, spread.n_rows]
    if not sums:
        return {}
    summed = all_reduce_if_distributed(torch.stack(sums).double()).tolist()
    won_counts = _won_counts([v.won for v in levels.values()])
    result = {}
    for index, (key, stats) in enumerate(levels.items()):
        target_sum, student_sum, n_rows, n_student_rows = summed[4 * index : 4 * index + 4]
        if n_rows == 0 or n_student_rows == 0:
            continue
        head, level = key.rsplit("_l", 1)
        n_prototypes = stats.won.numel()
        log_k = math.log(n_prototypes) if n_prototypes > 1 else 1.0
        result[f"{head}_target_entropy_l{level}"] = target_sum / n_rows / log_k
        result[f"{head}_student_entropy_l{level}"] = student_sum / n_student_rows / log_k
        result[f"{head}_prototypes_used_l{level}"] = won_counts[index] / min(n_rows, n_prototypes)
    start = 4 * len(levels)
    for key, spread in spreads.items():
        *unit_sum, n_rows = summed[start : start + spread.unit_sum.numel() + 1]
        start += spread.unit_sum.numel() + 1
        mean_norm_sq = sum(v * v for v in unit_sum) / n_rows**2 if n_rows else 1.0
        result[key] = math.sqrt(max(0.0, 1.0 - mean_norm_sq))
    return result


def _won_counts(masks: list[torch.Tensor]) -> list[int]:
    """Per level, the prototypes won on at least one rank (the union of the ranks' [K] masks)."""
    if not masks:
        return []
    won = all_reduce_if_distributed(torch.cat(masks).to(torch.uint8), dist.ReduceOp.MAX)
    return torch.stack([part.sum() for part in won.split([m.numel() for m in masks])]).tolist()


def level_values(stats: dict[str, float], name: str, kind: str) -> list[float]:
    """The per-level values of one statistic (e.g. ``dino``, ``target_entropy``), level 0 first."""
    prefix = f"{name}_{kind}_l"
    keys = sorted((k for k in stats if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :]))
    return [stats[k] for k in keys]


def format_health(stats: dict[str, float]) -> str:
    """Compact progress-line summary: the range of the target entropies per head over the levels (fraction of
    log K; 1 = uniform targets) and the teacher CLS spread."""
    parts = []
    for name in ("dino", "ibot"):
        values = level_values(stats, name, "target_entropy")
        if len(values) > 1:
            parts.append(f"{name} H/logK {min(values):.2f}-{max(values):.2f}")
        elif values:
            parts.append(f"{name} H/logK {values[0]:.2f}")
    for key in sorted(k for k in stats if k.endswith(SPREAD_SUFFIX)):
        who = key.removesuffix(SPREAD_SUFFIX)
        parts.append(f"{'' if who == 'teacher' else who + ' '}cls spread {stats[key]:.2f}")
    return ", ".join(parts)


@dataclass
class HealthMonitor:
    """Warns once per episode when a head's clustering stalls at uniform targets or a model's CLS features collapse
    (``teacher_cls_spread``, and ``student_cls_spread`` in distillation).

    ``update`` takes the statistics of each logged iteration (:func:`reduce_stats`); a condition must hold at every
    log line for ``patience`` iterations before its warning is printed, and may warn again after it has cleared. Each
    head (``dino``, ``ibot``) and each spread statistic have their own episode. The state is not checkpointed: after a
    resume an ongoing episode counts from the first logged iteration of the resumed run.
    """

    entropy_threshold: float = 0.97
    min_cls_spread: float = 0.05
    patience: int = 100
    _since: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _warned: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self):
        if not 0.0 < self.entropy_threshold <= 1.0:
            raise ValueError(
                f"train.health_entropy_threshold={self.entropy_threshold} must be a fraction of log K in (0, 1], "
                "e.g. 0.97"
            )
        if not 0.0 <= self.min_cls_spread < 1.0:
            raise ValueError(f"train.health_min_cls_spread={self.min_cls_spread} must lie in [0, 1), e.g. 0.05")
        if self.patience < 0:
            raise ValueError(f"train.health_patience={self.patience} must be >= 0 iterations, e.g. 100")

    def update(self, stats: dict[str, float], iteration: int) -> list[str]:
        """Warnings to print for the logged ``iteration`` (an empty list when healthy or not yet past patience)."""
        warnings = []
        for head in ("dino", "ibot"):
            entropies = level_values(stats, head, "target_entropy")
            stalled = bool(entropies) and min(entropies) > self.entropy_threshold
            if self._due(head, stalled, iteration):
                warnings.append(self._stall_message(head, entropies, self._since[head], iteration))
        for key in sorted(k for k in stats if k.endswith(SPREAD_SUFFIX)):
            who = key.removesuffix(SPREAD_SUFFIX)
            episode = "collapse" if who == "teacher" else f"{who} collapse"
            if self._due(episode, stats[key] < self.min_cls_spread, iteration):
                warnings.append(self._collapse_message(who, stats[key], self._since[episode], iteration))
        return warnings

    def _due(self, episode: str, active: bool, iteration: int) -> bool:
        """Track one episode; True once, when it has lasted ``patience`` iterations."""
        if not active:
            self._since.pop(episode, None)
            self._warned.discard(episode)
            return False
        since = self._since.setdefault(episode, iteration)
        if episode in self._warned or iteration - since < self.patience:
            return False
        self._warned.add(episode)
        return True

    def _stall_message(self, head: str, entropies: list[float], since: int, iteration: int) -> str:
        name = "DINO" if head == "dino" else "iBOT"
        return (
            f"training health: the {name} clustering is stalled at uniform targets since iteration {since} (to "
            f"{iteration}): every {name} level's teacher-target entropy is above {self.entropy_threshold:.2f} log K "
            f"(lowest {min(entropies):.3f}), so its loss sits at the uniform value Σ log K and teaches nothing. "
            "Knobs, in order (docs/training_dynamics.md): a sharper teacher (teacher.warmup_teacher_temp and "
            "teacher.teacher_temp, e.g. 0.01 for a small model), dino.head_init=fan_in, a faster teacher for a short "
            "run (teacher.momentum_teacher, e.g. 0.9), gentler crops (crops.global_crops_scale, "
            "crops.local_crops_scale)"
        )

    def _collapse_message(self, who: str, spread: float, since: int, iteration: int) -> str:
        return (
            f"training health: the {who}'s CLS features have collapsed since iteration {since} (to {iteration}): "
            f"their spread sqrt(1 - |mean unit feature|^2) is {spread:.3f} < {self.min_cls_spread}. Knobs "
            f"(docs/training_dynamics.md): {COLLAPSE_KNOBS.get(who, COLLAPSE_KNOBS['teacher'])}"
        )
