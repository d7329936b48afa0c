"""Training health: is the clustering learning, stalled at uniform targets, or collapsing? (docs/training_dynamics.md)

DINO-family runs fail quietly: the DINO / iBOT losses settle at Σ_l log K_l (every target uniform) while KoLeo and the
total loss still move, or every image gets the same feature. Neither dinov2, dinov3 nor lightly report it. Here, on the
iterations that are logged, the meta-architecture measures from tensors it already holds (no extra forward, no host
sync until the log line is written):

- per head (``dino``, ``ibot``) and Matryoshka level l: the teacher targets' mean entropy as a fraction of log K_l
  (1 = uniform targets, nothing to learn), the student's prediction entropy likewise, and the fraction of the K_l
  prototypes that are the arg-max of at least one sample's target on this rank;
- ``teacher_cls_spread`` = sqrt(1 − ‖mean_b x̂_b‖²) of the teacher's L2-normalised CLS features x̂: 0 when every image
  has the same feature (collapse), 1 when they spread evenly over the sphere.

:class:`HealthMonitor` reads those numbers at each log line and prints one warning, naming the symptom and the knobs,
when a head's targets stay above ``train.health_entropy_threshold`` · log K at every level, or the spread stays below
``train.health_min_cls_spread``, for ``train.health_patience`` iterations.
"""

import math
from dataclasses import dataclass

import torch

from franca.loss.chunked import TargetRows, chunk_bounds


def _entropy_sum(probs: torch.Tensor) -> torch.Tensor:
    """Σ over rows of −Σ_k p log p, in fp32 (0 log 0 = 0)."""
    probs = probs.float()
    return -(probs * probs.clamp_min(1e-30).log()).sum()


@torch.no_grad()
def target_stats(targets: torch.Tensor | TargetRows) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean entropy / log K, fraction of prototypes that are some row's arg-max) of targets [B, K].

    Targets given as :class:`TargetRows` are read chunk by chunk, so no fp32 [B, K] tensor is made whole.
    """
    n_rows, n_prototypes = targets.shape
    if isinstance(targets, TargetRows):
        chunks = (targets.rows(start, stop) for start, stop in chunk_bounds(n_rows, targets.chunk_size))
        device = targets.rows(0, 0).device
    else:
        chunks, device = iter([targets]), targets.device
    entropy = torch.zeros((), device=device)
    won = torch.zeros(n_prototypes, dtype=torch.bool, device=device)
    for rows in chunks:
        entropy += _entropy_sum(rows)
        won[rows.argmax(dim=-1)] = True
    return entropy / max(n_rows, 1) / math.log(n_prototypes), won.float().mean()


@torch.no_grad()
def prediction_entropy(student_logits: torch.Tensor, student_temp: float, chunk_size: int = 4096) -> torch.Tensor:
    """Mean entropy of softmax(logits / τ_s) over rows, as a fraction of log K (fp32, chunk by chunk)."""
    n_rows, n_prototypes = student_logits.shape
    total = torch.zeros((), device=student_logits.device)
    for start, stop in chunk_bounds(n_rows, chunk_size):
        total += _entropy_sum((student_logits[start:stop].float() / student_temp).softmax(dim=-1))
    return total / max(n_rows, 1) / math.log(n_prototypes)


@torch.no_grad()
def feature_spread(features: torch.Tensor) -> torch.Tensor:
    """sqrt(1 − ‖mean x̂‖²) of the L2-normalised rows x̂ of [B, D]: 0 = all rows alike, 1 = spread over the sphere."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return (1 - unit.mean(dim=0).square().sum()).clamp_min(0).sqrt()


def head_stats(
    name: str, targets: list, student_logits: list[torch.Tensor], student_temp: float
) -> dict[str, torch.Tensor]:
    """``{name}_target_entropy_l{i}``, ``{name}_student_entropy_l{i}``, ``{name}_prototypes_used_l{i}`` per level."""
    stats = {}
    for level, (target, student) in enumerate(zip(targets, student_logits, strict=True)):
        entropy, used = target_stats(target)
        stats[f"{name}_target_entropy_l{level}"] = entropy
        stats[f"{name}_student_entropy_l{level}"] = prediction_entropy(student.detach(), student_temp)
        stats[f"{name}_prototypes_used_l{level}"] = used
    return stats


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
    if "teacher_cls_spread" in stats:
        parts.append(f"cls spread {stats['teacher_cls_spread']:.2f}")
    return ", ".join(parts)


@dataclass
class HealthMonitor:
    """Warns once per episode when the clustering stalls at uniform targets or the teacher's CLS features collapse.

    ``update`` takes the (rank-averaged) statistics of each logged iteration; a condition must hold at every log line
    for ``patience`` iterations before its warning is printed; it may warn again after it has cleared.
    """

    entropy_threshold: float = 0.97
    min_cls_spread: float = 0.05
    patience: int = 100
    _stalled_since: int | None = None
    _collapsed_since: int | None = None
    _warned_stall: bool = False
    _warned_collapse: bool = False

    def update(self, stats: dict[str, float], iteration: int) -> list[str]:
        """Warnings to print for the logged ``iteration`` (an empty list when healthy or not yet past patience)."""
        warnings = []
        stalled_heads = {
            head: entropies
            for head in ("dino", "ibot")
            if (entropies := level_values(stats, head, "target_entropy")) and min(entropies) > self.entropy_threshold
        }
        self._stalled_since, self._warned_stall, message = self._track(
            bool(stalled_heads), self._stalled_since, self._warned_stall, iteration, self._stall_message(stalled_heads)
        )
        warnings += message
        spread = stats.get("teacher_cls_spread")
        collapsed = spread is not None and spread < self.min_cls_spread
        self._collapsed_since, self._warned_collapse, message = self._track(
            collapsed, self._collapsed_since, self._warned_collapse, iteration, self._collapse_message(spread)
        )
        return warnings + message

    def _track(self, active: bool, since: int | None, warned: bool, iteration: int, message: str):
        if not active:
            return None, False, []
        since = iteration if since is None else since
        if not warned and iteration - since >= self.patience:
            return since, True, [message.format(since=since, iteration=iteration)]
        return since, warned, []

    def _stall_message(self, stalled_heads: dict[str, list[float]]) -> str:
        names = " and ".join(head.upper() if head == "dino" else "iBOT" for head in stalled_heads)
        lowest = min((min(v) for v in stalled_heads.values()), default=float("nan"))
        return (
            "training health: the clustering is stalled at uniform targets since iteration {since} (to {iteration}): "
            f"every {names} level's teacher-target entropy is above {self.entropy_threshold:.2f} log K "
            f"(lowest {lowest:.3f}), so those losses sit at their uniform value Σ log K and teach nothing. "
            "Knobs, in order (docs/training_dynamics.md): a sharper teacher (teacher.warmup_teacher_temp and "
            "teacher.teacher_temp, e.g. 0.01 for a small model), dino.head_init=fan_in, a faster teacher for a short "
            "run (teacher.momentum_teacher, e.g. 0.95), gentler crops (crops.global_crops_scale, "
            "crops.local_crops_scale)"
        )

    def _collapse_message(self, spread: float | None) -> str:
        return (
            "training health: the teacher's CLS features have collapsed since iteration {since} (to {iteration}): "
            f"their spread sqrt(1 - |mean unit feature|^2) is {spread if spread is not None else float('nan'):.3f} < "
            f"{self.min_cls_spread}. Knobs (docs/training_dynamics.md): raise dino.koleo_loss_weight, lower "
            "optim.base_lr, raise teacher.momentum_teacher"
        )
