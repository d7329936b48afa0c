"""One training iteration, the only copy: schedules → forward/backward → unscale → per-submodule clipping → optimizer
step → EMA teacher (valeoai/Franca ``franca/train/train.py``, ``do_train``).

The trainer (:mod:`franca.train.train`) and ``benchmarks/train_step.py`` both run :class:`TrainStep`; the benchmark
times and counts FLOPs through its ``on_phase`` marks (:data:`TRAIN_STEP_PHASES`).
"""

from collections.abc import Callable

import torch
from omegaconf import DictConfig

from franca.train.param_groups import apply_optim_schedule
from franca.train.runtime import Runtime
from franca.train.ssl_meta_arch import STEP_PHASES, SSLMetaArch

# The marks ``on_phase`` receives during one :class:`TrainStep` call, in order.
TRAIN_STEP_PHASES = (*STEP_PHASES, "optimizer_ema")
# The schedule values of an iteration that the trainer logs (``training_metrics.json``).
LOGGED_SCHEDULES = {"lr": "lr", "wd": "wd", "mom": "momentum", "teacher_temp": "teacher_temp"}


def _no_mark(phase: str) -> None:
    """The default ``on_phase`` hook: nothing to record."""


class TrainStep:
    """Runs iteration ``i`` of a run on one batch (or the micro-batches of one step): the optimizer takes the
    schedules' lr, weight decay, last-layer lr and backbone lr scale of ``i``, the losses use its teacher temperature,
    the teacher its EMA momentum.

    ``schedules``: per-iteration arrays of :func:`franca.train.schedules.build_schedules`; ``scaler``: a GradScaler
    for fp16, else None; ``clip_grad``: the per-submodule gradient-norm limit (0 = no clipping);
    ``freeze_backbone_iterations``: the iterations of the heads-first stage, in which the student backbone runs
    without gradients (no gradient, no optimizer state, no weight decay) and the teacher backbone stays as it is.
    """

    def __init__(
        self,
        model: SSLMetaArch,
        optimizer: torch.optim.Optimizer,
        schedules: dict,
        runtime: Runtime,
        clip_grad: float,
        scaler: torch.amp.GradScaler | None = None,
        freeze_backbone_iterations: int = 0,
    ):
        self.model = model
        self.optimizer = optimizer
        self.schedules = schedules
        self.runtime = runtime
        self.clip_grad = clip_grad
        self.scaler = scaler
        self.freeze_backbone_iterations = freeze_backbone_iterations

    def trains_backbone(self, iteration: int) -> bool:
        """False during the heads-first stage (``train.freeze_backbone_iterations``)."""
        return iteration >= self.freeze_backbone_iterations

    def schedule_values(self, iteration: int) -> dict[str, float]:
        """The logged schedule values of ``iteration``: lr, wd, mom, teacher_temp."""
        return {name: float(self.schedules[key][iteration]) for name, key in LOGGED_SCHEDULES.items()}

    def __call__(
        self,
        batches: dict | list[dict],
        iteration: int,
        stats: dict | None = None,
        on_phase: Callable[[str], None] = _no_mark,
    ) -> dict[str, torch.Tensor]:
        """One iteration on a batch, or on the micro-batches of one step (gradient accumulation,
        ``SSLMetaArch.forward_backward``); returns the detached loss terms. ``stats``: a dict to fill with the
        training-health statistics (``SSLMetaArch.student_losses``); ``on_phase``: called with each of
        :data:`TRAIN_STEP_PHASES` once that phase is done."""
        s = self.schedules
        train_backbone = self.trains_backbone(iteration)
        apply_optim_schedule(
            self.optimizer,
            lr=s["lr"][iteration],
            wd=s["wd"][iteration],
            last_layer_lr=s["last_layer_lr"][iteration],
            backbone_lr_scale=s["backbone_lr_scale"][iteration],
        )
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.model.forward_backward(
            batches,
            s["teacher_temp"][iteration],
            self.runtime,
            self.scaler,
            stats=stats,
            on_phase=on_phase,
            train_backbone=train_backbone,
        )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            self.model.clip_gradients(self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.update_teacher(s["momentum"][iteration], include_backbone=train_backbone)
        on_phase("optimizer_ema")
        return losses


def build_grad_scaler(cfg: DictConfig, runtime: Runtime) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast with ``compute_precision.grad_scaler``, else None."""
    if runtime.autocast_dtype == torch.float16 and cfg.compute_precision.grad_scaler:
        return torch.amp.GradScaler(runtime.device.type)
    return None
