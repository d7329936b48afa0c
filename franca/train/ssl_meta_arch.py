"""The Franca meta-architecture: student and EMA teacher (backbone + DINO head + iBOT head) and their losses.

One ``forward_backward`` computes the whole objective (paper arXiv 2507.14137, Sec. 3; valeoai/Franca
``franca/train/ssl_meta_arch.py``, ``SSLMetaArch.forward_backward``) for a collated multi-crop batch:
- teacher (eval mode, no grad): global crops → CLS → DINO head → per-level targets; masked patch tokens → iBOT head →
  per-level targets (Sinkhorn-Knopp, or softmax centering);
- student: global crops (with mask tokens) and local crops as two batches; CLS of all crops through the DINO head,
  masked patch tokens through the iBOT head; DINO loss averaged over the 2 + 2L (student crop, teacher crop) pairs and
  summed over Matryoshka levels, iBOT loss, KoLeo on the backbone CLS of each global view.
The DINOv2 baseline is the same code with ``dino.MRL: false`` (one-level heads).

The step runs in named phases (:data:`STEP_PHASES`): ``teacher_backbone`` → ``teacher_targets`` →
``student_backbone`` → ``student_heads`` → ``assemble_losses`` → backward. ``forward_backward`` composes them (the
student phases once per micro-batch with gradient accumulation) and calls an optional ``on_phase`` hook after each
(``benchmarks/train_step.py`` times and counts FLOPs with it), so the library holds the only copy of the loss
assembly, checked in float64 in tests/test_loss_assembly.py.

``Runtime.loss_chunk_size`` (``compute_precision.chunked_losses``, auto = on CUDA; ``franca.train.runtime``) switches
the targets and the DINO / iBOT cross-entropies to their chunked forms (``franca.loss.chunked``): the same values in
exact arithmetic, without fp32 [tokens × K] tensors. On CPU the plain path stays the default; its numbers are the
golden test's.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from franca.data.image_decoding import training_decoding
from franca.layers.heads import build_head
from franca.loss import (
    DenseTargets,
    DINOLoss,
    IBOTPatchLoss,
    SoftmaxCentering,
    TargetRows,
    koleo_loss,
    sinkhorn_knopp,
    sinkhorn_knopp_streaming,
    target_rows,
)
from franca.models import DinoVisionTransformer, ViTConfig
from franca.models.weights import from_release, load_strict
from franca.train import health
from franca.train.runtime import Runtime

# The marks ``on_phase`` receives, in order, during one ``forward_backward``.
STEP_PHASES = ("teacher_backbone", "teacher_heads_targets", "student_backbone", "student_heads_losses", "backward")


def build_backbone(cfg: DictConfig, drop_path: bool = True) -> nn.Module:
    """The ViT of ``cfg.student`` at the global-crop size (drop path only for the student), carrying the run's image
    decoding (``train.alpha_background``, ``train.image_max_value``) so that its exports record it."""
    config = ViTConfig.from_student_config(cfg.student, img_size=cfg.crops.global_crops_size, drop_path=drop_path)
    backbone = DinoVisionTransformer(config)
    backbone.input_decoding = training_decoding(cfg).to_record()
    return backbone


def _build_head(cfg: DictConfig, head_cfg: DictConfig, embed_dim: int) -> nn.Module:
    nesting = list(cfg.dino.nesting_list) or None
    return build_head(
        "matryoshka" if cfg.dino.MRL else "dino",
        embed_dim,
        head_cfg.head_n_prototypes,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
        nlayers=head_cfg.head_nlayers,
        nesting_list=nesting,
        input_mode=cfg.dino.mrl_input,
        l2_norm=cfg.dino.mrl_l2_norm,
        init=cfg.dino.head_init,
    )


def build_model_dict(cfg: DictConfig, drop_path: bool) -> nn.ModuleDict:
    """``{backbone, dino_head[, ibot_head]}``: the student (``drop_path=True``) or the teacher's modules."""
    models = nn.ModuleDict({"backbone": build_backbone(cfg, drop_path=drop_path)})
    dim = models["backbone"].embed_dim
    models["dino_head"] = _build_head(cfg, cfg.dino, dim)
    if cfg.ibot.separate_head:
        models["ibot_head"] = _build_head(cfg, cfg.ibot, dim)
    return models


@dataclass
class TeacherTargets:
    """The teacher's side of one step: per-level DINO targets of the global crops, per-level iBOT targets of the
    masked patch tokens (None without iBOT), as tensors or as ``TargetRows`` (chunked losses), and its backbone CLS
    (for the health statistics)."""

    dino: list[torch.Tensor] | list[TargetRows]
    ibot: list[torch.Tensor] | list[TargetRows] | None
    cls: torch.Tensor


@dataclass
class StudentFeatures:
    """The student backbone's outputs: the dict of the masked global crops and the CLS of the local crops (None
    without local crops)."""

    global_crops: dict[str, torch.Tensor]
    local_cls: torch.Tensor | None


@dataclass
class StudentOutputs:
    """The student's side of one step: per-level DINO head logits of the CLS rows [local crops; global crops], the
    backbone CLS of the 2B global crops (KoLeo) and the per-level iBOT logits of the masked tokens (None without
    iBOT). Rows are crop-major: crop c of image b is row c·B + b."""

    dino_logits: list[torch.Tensor]
    global_cls: torch.Tensor
    ibot_logits: list[torch.Tensor] | None

    @property
    def n_local_rows(self) -> int:
        return self.dino_logits[0].shape[0] - self.global_cls.shape[0]

    @property
    def local_logits(self) -> list[torch.Tensor]:
        return [level[: self.n_local_rows] for level in self.dino_logits]

    @property
    def global_logits(self) -> list[torch.Tensor]:
        return [level[self.n_local_rows :] for level in self.dino_logits]


def _no_mark(phase: str) -> None:
    """The default ``on_phase`` hook: nothing to record."""


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The rows of all micro-batches (no copy for one)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _split_levels(levels: list, counts: list[int]) -> list[list]:
    """Per-level targets of concatenated rows → for each micro-batch of ``counts`` rows, its per-level targets."""
    if len(counts) == 1:
        return [levels]
    bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
    return [[target_rows(level, start, stop) for level in levels] for start, stop in zip(bounds[:-1], bounds[1:])]


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.student = build_model_dict(cfg, drop_path=True)
        self.teacher = build_model_dict(cfg, drop_path=False)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self._ema_pairs: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        self._init_objective(cfg)

    def _init_objective(self, cfg: DictConfig) -> None:
        """The crops, losses and target centring of ``cfg`` for the student's heads (distillation's
        ``DistillMetaArch`` builds its own student and teacher, then calls this too)."""
        self.n_local_crops = cfg.crops.local_crops_number
        # Decided by the config, not by the batch: a rank whose batch has no masked token still runs the iBOT heads
        # (on zero rows) and their Sinkhorn-Knopp, so every rank joins the same FSDP and SK collectives.
        self.use_ibot = cfg.ibot.mask_sample_probability > 0
        self.dino_loss = DINOLoss(student_temp=0.1, level_weights=list(cfg.dino.level_weights) or None)
        self.ibot_loss = IBOTPatchLoss(student_temp=0.1, level_weights=list(cfg.ibot.level_weights) or None)
        self.centering = cfg.train.centering
        if self.centering == "centering":
            self.dino_center = SoftmaxCentering(self.student["dino_head"].out_dims)
            self.ibot_center = SoftmaxCentering(self._ibot_head("student").out_dims)

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def export_modules(self) -> nn.ModuleDict:
        """What the run exports in the release format and evaluates (periodic k-NN): the EMA teacher."""
        return self.teacher

    @property
    def has_clustering_heads(self) -> bool:
        """Whether the losses are the DINO / iBOT clusterings (with uniform values to compare with); False for the
        head-free distillation."""
        return True

    def _ibot_head(self, which: str) -> nn.Module:
        models = self.student if which == "student" else self.teacher
        return models["ibot_head"] if "ibot_head" in models else models["dino_head"]

    def load_pretrained_backbone(
        self, state_dict: dict[str, torch.Tensor], source: str = "student.pretrained_weights"
    ) -> None:
        """Initialise both backbones from backbone weights in any checkpoint layout (heads stay fresh: continued
        pretraining), through :func:`franca.models.weights.from_release`.

        A position grid of another size (e.g. 224 px weights for 518 px finetuning) is resized with the model's own
        run-time interpolation, the same as ``scripts/modify_ckpt_highres.py``: the initial model then reproduces the
        source model run at the new size.
        """
        backbone = self.student["backbone"]
        weights, _ = from_release(state_dict, config=backbone.config)
        hint = "it is for another architecture than student.arch/embed_dim/depth/patch_size/ffn_layer"
        for model in (backbone, self.teacher["backbone"]):
            load_strict(model, weights, source, "the configured backbone (student.*)", hint)

    # ----------------------------------------------------------------------------------------------------------------
    def _level_targets(
        self, logits: list[torch.Tensor], temp: float, center: SoftmaxCentering | None, chunk_size: int | None
    ) -> list[torch.Tensor] | list[TargetRows]:
        """Per-level targets: tensors, or ``TargetRows`` served by chunks when ``chunk_size`` is set."""
        if center is None:
            if chunk_size is None:
                return [sinkhorn_knopp(t, temp) for t in logits]
            return [sinkhorn_knopp_streaming(t, temp, chunk_size=chunk_size) for t in logits]
        targets = center.targets(logits, temp)
        center.update(logits)
        return targets if chunk_size is None else [DenseTargets(t, chunk_size) for t in targets]

    @torch.no_grad()
    def teacher_backbone(self, batch: dict) -> dict[str, torch.Tensor]:
        """Phase ``teacher_backbone``: the teacher backbone on the global crops (no gradient)."""
        return self.teacher["backbone"](batch["collated_global_crops"], is_training=True)

    @torch.no_grad()
    def teacher_targets(
        self,
        teacher_outs: list[dict[str, torch.Tensor]],
        batches: list[dict],
        teacher_temp: float,
        chunk_size: int | None = None,
    ) -> list[TeacherTargets]:
        """Phase ``teacher_heads_targets``: teacher heads on the CLS and masked patch tokens of every micro-batch, then
        per-level targets over all of them at once (Sinkhorn-Knopp, or softmax centering with
        ``train.centering=centering``), split back into one :class:`TeacherTargets` per micro-batch.

        With several micro-batches (``train.grad_accumulation_steps``) the targets are those of one step on the
        concatenated batch: Sinkhorn-Knopp and the centre see all rows (both are unchanged by reordering rows)."""
        cls = [out["x_norm_clstoken"] for out in teacher_outs]
        cls_logits = self.teacher["dino_head"](_cat(cls))
        dino_targets = self._level_targets(cls_logits, teacher_temp, self._center("dino"), chunk_size)
        dino_split = _split_levels(dino_targets, [len(c) for c in cls])
        ibot_split: list[list | None] = [None] * len(batches)
        if self.use_ibot:
            patches = [
                out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
                for out, batch in zip(teacher_outs, batches, strict=True)
            ]
            patch_logits = self._ibot_head("teacher")(_cat(patches))
            ibot_targets = self._level_targets(patch_logits, teacher_temp, self._center("ibot"), chunk_size)
            ibot_split = _split_levels(ibot_targets, [len(p) for p in patches])
        return [TeacherTargets(dino, ibot, c) for dino, ibot, c in zip(dino_split, ibot_split, cls, strict=True)]

    def _center(self, head: str) -> SoftmaxCentering | None:
        """The softmax centre of the ``dino`` or ``ibot`` head with ``train.centering=centering``, else None."""
        return getattr(self, f"{head}_center") if self.centering == "centering" else None

    def student_backbone(self, batch: dict, train_backbone: bool = True) -> StudentFeatures:
        """Phase ``student_backbone``: the student backbone on the masked global crops, then on the local crops;
        without gradients when ``train_backbone`` is False (stage 1 of ``train.freeze_backbone_iterations``)."""
        backbone = self.student["backbone"]
        with torch.set_grad_enabled(train_backbone and torch.is_grad_enabled()):
            global_out = backbone(batch["collated_global_crops"], masks=batch["collated_masks"], is_training=True)
            local_cls = None
            if self.n_local_crops:
                local_cls = backbone(batch["collated_local_crops"], is_training=True)["x_norm_clstoken"]
        return StudentFeatures(global_out, local_cls)

    def student_heads(self, features: StudentFeatures, batch: dict) -> StudentOutputs:
        """Student heads: DINO head on the CLS of all crops (one batch), iBOT head on the masked patch tokens."""
        global_cls = features.global_crops["x_norm_clstoken"]
        cls_rows = global_cls if features.local_cls is None else torch.cat([features.local_cls, global_cls])
        dino_logits = self.student["dino_head"](cls_rows)
        ibot_logits = None
        if self.use_ibot:
            patches = features.global_crops["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
            ibot_logits = self._ibot_head("student")(patches)
        return StudentOutputs(dino_logits, global_cls, ibot_logits)

    def assemble_losses(
        self, student: StudentOutputs, teacher: TeacherTargets, masks_weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The weighted loss terms of one step (paper arXiv 2507.14137, Sec. 3; the combination of DINOv2's
        ``SSLMetaArch.forward_backward``), summed over Matryoshka levels with ``{dino,ibot}.level_weights``:

        - DINO: cross-entropy of each local crop against both teacher global crops, and of each global crop against
          the other view's target (same-view pairs skipped); both divided by the original's 2 + max(2L, 1) pairs
          (2 + 2L with local crops, 3 without);
        - KoLeo on the backbone CLS of each global view, summed over the two views;
        - iBOT: masked tokens weighted by ``masks_weight`` (1 / masked tokens of their image), divided by the 2B
          global crops of this rank.
        """
        cfg = self.cfg
        n_local = self.n_local_crops
        n_pairs = 2 + max(2 * n_local, 1)
        losses = {}
        if n_local:
            local_loss = self.dino_loss(student.local_logits, teacher.dino, n_local, 2)
            losses["dino_local_crops_loss"] = cfg.dino.loss_weight * local_loss / n_pairs
        global_loss = self.dino_loss(student.global_logits, teacher.dino, 2, 2, skip_same_view=True)
        losses["dino_global_crops_loss"] = cfg.dino.loss_weight * global_loss / n_pairs
        if cfg.dino.koleo_loss_weight > 0:
            koleo = sum(koleo_loss(view) for view in student.global_cls.chunk(2))
            losses["koleo_loss"] = cfg.dino.koleo_loss_weight * koleo
        if teacher.ibot is not None:
            n_global_images = student.global_cls.shape[0]
            ibot = self.ibot_loss(student.ibot_logits, teacher.ibot, masks_weight, n_global_images)
            losses["ibot_loss"] = cfg.ibot.loss_weight * ibot
        return losses

    def student_losses(
        self,
        batch: dict,
        teacher: TeacherTargets,
        chunk_size: int | None = None,
        stats: dict | None = None,
        on_phase: Callable[[str], None] = _no_mark,
        train_backbone: bool = True,
    ) -> dict[str, torch.Tensor]:
        """All loss terms of one (micro-)batch given its teacher targets (paper arXiv 2507.14137, Sec. 3): phases
        ``student_backbone`` and ``student_heads_losses``; their sum is the training objective.

        ``chunk_size``: rows per chunk of the chunked losses (``Runtime.loss_chunk_size``), None for the plain path.
        Given a dict, ``stats`` is filled with this rank's raw training-health statistics (``franca.train.health``):
        device tensors computed from the targets and logits already made, reduced over ranks by
        ``health.reduce_stats`` when the trainer writes a log line."""
        features = self.student_backbone(batch, train_backbone)
        on_phase("student_backbone")
        student = self.student_heads(features, batch)
        losses = self.assemble_losses(student, teacher, batch["masks_weight"])
        on_phase("student_heads_losses")
        if stats is not None:
            rows = chunk_size or health.DEFAULT_CHUNK_ROWS
            dino_temp, ibot_temp = self.dino_loss.student_temp, self.ibot_loss.student_temp
            stats.update(health.head_stats("dino", teacher.dino, student.dino_logits, dino_temp, rows))
            if teacher.ibot is not None:
                stats.update(health.head_stats("ibot", teacher.ibot, student.ibot_logits, ibot_temp, rows))
            stats["teacher_cls_spread"] = health.spread_stats(teacher.cls)
        return losses

    def forward_backward(
        self,
        batches: dict | list[dict],
        teacher_temp: float,
        runtime: Runtime,
        scaler=None,
        stats: dict | None = None,
        on_phase: Callable[[str], None] = _no_mark,
        train_backbone: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Compute the losses under the runtime's autocast and backpropagate their sum; returns the detached terms.

        ``batches``: one collated batch, or the micro-batches of one step (``train.grad_accumulation_steps``): the
        teacher runs on all of them first and their targets are made together (:meth:`teacher_targets`), then each
        micro-batch's student losses are backpropagated with weight 1/k, so the gradients and losses are those of one
        step on the concatenated batch, except KoLeo, which acts within each micro-batch (training.md). With
        ``train_backbone`` False the student backbone runs without gradients (the heads-first stage).
        ``stats``: a dict to fill with the training-health statistics of the last micro-batch (see
        :meth:`student_losses`); ``on_phase``: called with each of :data:`STEP_PHASES` once that phase is done (the
        student phases and ``backward`` once per micro-batch)."""
        micro = [batches] if isinstance(batches, dict) else list(batches)
        with runtime.autocast():
            teacher_outs = [self.teacher_backbone(batch) for batch in micro]
            on_phase("teacher_backbone")
            targets = self.teacher_targets(teacher_outs, micro, teacher_temp, runtime.loss_chunk_size)
            on_phase("teacher_heads_targets")
        del teacher_outs
        totals: dict[str, torch.Tensor] = {}
        for index, (batch, teacher) in enumerate(zip(micro, targets, strict=True)):
            last = index == len(micro) - 1
            with runtime.autocast():
                losses = self.student_losses(
                    batch, teacher, runtime.loss_chunk_size, stats if last else None, on_phase, train_backbone
                )
            total = sum(losses.values())
            if len(micro) > 1:
                total = total / len(micro)
                losses = {k: v.detach() / len(micro) for k, v in losses.items()}
            (scaler.scale(total) if scaler is not None else total).backward()
            on_phase("backward")
            for name, value in losses.items():
                totals[name] = value.detach() if name not in totals else totals[name] + value.detach()
        return totals

    def clip_gradients(self, max_norm: float) -> dict[str, torch.Tensor]:
        """Clip each student submodule's gradient norm separately (as the original
        ``SSLMetaArch``); returns the norms.

        Works on FSDP2-sharded (DTensor) gradients too: ``clip_grad_norm_`` then reduces the norm over the shards.
        """
        return {
            name: nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
            for name, module in self.student.items()
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float, include_backbone: bool = True) -> None:
        """EMA θ_t ← m·θ_t + (1−m)·θ_s over the three submodules; the backbone is left out (and its teacher copy does
        not move at all) with ``include_backbone`` False, the heads-first stage of ``train.freeze_backbone_iterations``.

        With FSDP2 each rank updates its own shards (student and teacher are sharded alike); with replicated students
        the teacher is a plain copy and takes the local replica. Every rank applies the same update, so the teacher
        stays consistent without communication. The (teacher, student) tensor lists are paired once, at the first
        update (after ``parallelize``), and reused: parameters keep their storage for the whole run.
        """
        if self._ema_pairs is None:
            self._ema_pairs = {True: self._pair_ema_tensors(True), False: self._pair_ema_tensors(False)}
        teacher_params, student_params = self._ema_pairs[include_backbone]
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)

    def _pair_ema_tensors(self, include_backbone: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student = dict(self.student.named_parameters())
        teacher_params, student_params = [], []
        for name, p in self.teacher.named_parameters():
            if not include_backbone and name.startswith("backbone."):
                continue
            t_local, s_local = _local_tensor(p), _local_tensor(student[name].detach())
            if t_local.shape != s_local.shape:
                raise RuntimeError(
                    f"teacher and student parameter {name} are sharded differently (local shapes "
                    f"{tuple(t_local.shape)} vs {tuple(s_local.shape)}); give compute_precision.teacher and "
                    "compute_precision.student the same sharding strategies"
                )
            teacher_params.append(t_local)
            student_params.append(s_local)
        return teacher_params, student_params

    def _apply(self, fn, recurse: bool = True):
        self._ema_pairs = None  # .to() / .cuda() may replace parameter storage
        return super()._apply(fn, recurse)


def _local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard (or replica) of a DTensor, the tensor itself otherwise; in-place updates reach the DTensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
