"""Per-iteration schedules of lr, weight decay, teacher momentum and teacher temperature
(valeoai/Franca ``franca/train/train.py`` with ``CosineScheduler`` of ``franca/utils/``).

All lengths are counted in iterations; an "epoch" is ``train.OFFICIAL_EPOCH_LENGTH`` iterations, independent of the
dataset size.
"""

import math
import operator

from omegaconf import DictConfig

from franca.utils.config_schema import ConfigError


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer number of iterations")
    return value


class CosineScheduler:
    """Zeros for ``freeze_iters``, a linear warmup, then a half-cosine to ``final_value`` (the original's
    ``CosineScheduler``).

    Iterations ``[0, freeze_iters)`` give 0. The next ``warmup_iters`` go linearly from ``start_warmup_value`` to
    ``base_value``, both ends included (as the original). The ``n`` remaining iterations ``i = 0 … n−1`` give
    ``final + ½ (base − final) (1 + cos(π i / n))``. Any iteration ``≥ total_iters`` gives ``final_value``.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ):
        self.total_iters = _check_count("total_iters", total_iters)
        self.warmup_iters = _check_count("warmup_iters", warmup_iters)
        self.freeze_iters = _check_count("freeze_iters", freeze_iters)
        if freeze_iters + warmup_iters > total_iters:
            raise ValueError(
                f"freeze_iters ({freeze_iters}) + warmup_iters ({warmup_iters}) exceed total_iters ({total_iters}); "
                "shorten the warmup or lengthen the schedule"
            )
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.start_warmup_value = float(start_warmup_value)

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, iteration: int) -> float:
        it = operator.index(iteration)
        if it < 0:
            raise IndexError(f"iteration {it} is negative; schedules are indexed from 0")
        if it >= self.total_iters:
            return self.final_value
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            if self.warmup_iters == 1:
                return self.start_warmup_value
            return self.start_warmup_value + (self.base_value - self.start_warmup_value) * it / (self.warmup_iters - 1)
        step = it - self.warmup_iters
        n_cosine = self.total_iters - self.freeze_iters - self.warmup_iters
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1 + math.cos(math.pi * step / n_cosine))


class BackboneStages:
    """The backbone's lr scale per iteration (``train.freeze_backbone_iterations`` and the ``optim.backbone_*`` keys):
    0 during the heads-first stage, then a linear ramp to ``lr_mult`` over ``warmup_iters`` (reached at the last
    ramp iteration), then ``lr_mult``. Freeze 0, warm-up 0 and multiplier 1 give 1 everywhere (plain pretraining)."""

    def __init__(self, freeze_iters: int, warmup_iters: int, lr_mult: float):
        self.freeze_iters = _check_count("freeze_iters", freeze_iters)
        self.warmup_iters = _check_count("warmup_iters", warmup_iters)
        self.lr_mult = float(lr_mult)

    def __getitem__(self, iteration: int) -> float:
        it = operator.index(iteration) - self.freeze_iters
        if it < 0:
            return 0.0
        if it < self.warmup_iters:
            return self.lr_mult * (it + 1) / self.warmup_iters
        return self.lr_mult


class ZeroedPrefix:
    """``schedule`` with its first ``zero_iters`` values replaced by 0 (the frozen last-layer lr)."""

    def __init__(self, schedule: CosineScheduler, zero_iters: int):
        self.schedule = schedule
        self.zero_iters = _check_count("zero_iters", zero_iters)

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, iteration: int) -> float:
        value = self.schedule[iteration]
        return 0.0 if operator.index(iteration) < self.zero_iters else value


def build_schedules(cfg: DictConfig) -> dict[str, CosineScheduler | ZeroedPrefix | BackboneStages]:
    """The training schedules of a validated config whose ``optim.lr`` is set (original ``franca/train/train.py``).

    Keys: ``lr`` (warmup 0 → lr, cosine → min_lr), ``wd`` and ``momentum`` (cosine, no warmup), ``teacher_temp``
    (linear warmup_teacher_temp → teacher_temp, then constant), ``last_layer_lr`` (``lr`` with its first
    ``freeze_last_layer_epochs`` epochs at 0) and ``backbone_lr_scale`` (:class:`BackboneStages`, ours).
    """
    if cfg.optim.lr <= 0:
        raise ConfigError(
            f"optim.lr={cfg.optim.lr} is not positive; it is computed from optim.base_lr: call "
            "franca.train.config.apply_scaling_rules(cfg, world_size) before build_schedules(cfg)"
        )
    if cfg.optim.warmup_epochs > cfg.optim.epochs:
        raise ConfigError(
            f"optim.warmup_epochs={cfg.optim.warmup_epochs} exceeds optim.epochs={cfg.optim.epochs}; "
            "lower optim.warmup_epochs or raise optim.epochs"
        )
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch
    lr = CosineScheduler(cfg.optim.lr, cfg.optim.min_lr, total, warmup_iters=cfg.optim.warmup_epochs * epoch)
    temp_iters = cfg.teacher.warmup_teacher_temp_epochs * epoch
    return {
        "lr": lr,
        "wd": CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        "momentum": CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        "teacher_temp": CosineScheduler(
            cfg.teacher.teacher_temp,
            cfg.teacher.teacher_temp,
            temp_iters,
            warmup_iters=temp_iters,
            start_warmup_value=cfg.teacher.warmup_teacher_temp,
        ),
        "last_layer_lr": ZeroedPrefix(lr, cfg.optim.freeze_last_layer_epochs * epoch),
        "backbone_lr_scale": BackboneStages(
            cfg.train.freeze_backbone_iterations, cfg.optim.backbone_warmup_iterations, cfg.optim.backbone_lr_mult
        ),
    }
