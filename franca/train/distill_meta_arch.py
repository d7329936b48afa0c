"""Distillation meta-architectures: a trainable student and a frozen teacher, run by the Franca trainer unchanged
(``do_train(cfg, meta_arch=...)``; training.md, "Distil").

Both keep :class:`SSLMetaArch`'s interface (``student`` / ``teacher`` module dicts, ``forward_backward``,
``clip_gradients``, ``update_teacher``, ``export_modules``) and inherit its ``forward_backward`` (autocast, backward)
and per-module gradient clipping. What differs:

- the teacher is given (loaded by ``python -m franca.distill`` from ``teacher.weights``), frozen (eval mode, no
  gradient, ``update_teacher`` does nothing) and kept outside the module tree: checkpoints hold the student, the
  optimizer and a signature of the teacher's weights (a restart reloads the teacher from ``teacher.weights`` and
  refuses another one), not a copy of a possibly multi-GB teacher every time. ``model.to()`` and
  ``parallelize`` (``model.teacher``) still reach it;
- the teacher runs once per batch, under the training precision, on crops resized to a multiple of its patch
  (:func:`franca.layers.patch_grid.fit_to_patch`), and its patch tokens are resized to the student's grid
  (:func:`franca.layers.patch_grid.resize_patch_tokens`);
- ``export_modules`` is the student: the trainer exports it in the release format (with its ``backbone_config``) and
  runs the periodic k-NN on it.

:class:`HeadDistillMetaArch` (teacher files of franca runs, which keep their DINO / iBOT heads) is Franca's own
objective with the EMA teacher replaced by the frozen one: the student, with heads shaped like the teacher's
(:class:`franca.layers.head_spec.HeadSpec`), predicts the teacher's Sinkhorn-Knopp targets of the global crops at
every Matryoshka level from its global and local crops, and the iBOT targets of the masked patches, plus KoLeo; the
DINOv2/v3 distillation (dinov3 ``MultiDistillationMetaArch``: the SSL losses against a frozen teacher's targets).
:class:`FeatureDistillMetaArch` (released backbones, no heads) matches the teacher's CLS and patch features on the
same global and local crops through a learned linear projection (:mod:`franca.loss.feature_distill`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from franca.data.image_decoding import training_decoding
from franca.layers.head_spec import HeadSpec
from franca.layers.patch_grid import fit_to_patch, resize_patch_tokens
from franca.loss import koleo_loss
from franca.loss.feature_distill import FeatureCenter, FeatureQueue, cosine_loss, queue_kl_loss, smooth_l1_loss
from franca.models.timm_backbone import TimmBackbone, is_timm_arch
from franca.models.weights import from_release, load_strict
from franca.train import health
from franca.train.ssl_meta_arch import SSLMetaArch, StudentFeatures, build_backbone


@dataclass
class Teacher:
    """The frozen teacher a distillation starts from: ``modules`` = ``{backbone[, dino_head, ibot_head]}`` (heads
    loaded from the file when it has them), where it came from, the heads' shapes and their ``l2_norm`` switch."""

    modules: nn.ModuleDict
    source: str
    head_specs: dict[str, HeadSpec] = field(default_factory=dict)
    l2_norm: bool = False

    @property
    def has_heads(self) -> bool:
        return "dino_head" in self.modules

    @property
    def width(self) -> int:
        return self.modules["backbone"].embed_dim


def choose_mode(setting: str, teacher: Teacher) -> str:
    """``distill.mode``: auto = heads when the teacher has a DINO head, else features."""
    if setting == "heads" and not teacher.has_heads:
        raise ValueError(
            f"distill.mode=heads, but the teacher {teacher.source} has no dino_head.* tensors (released backbones ship "
            "without heads); use distill.mode=features (or auto), or a teacher file written by a franca run"
        )
    if setting == "auto":
        return "heads" if teacher.has_heads else "features"
    return setting


@torch.no_grad()
def weights_signature(module: nn.Module) -> torch.Tensor:
    """[Σ_i (i + 1)·sum(w_i), Σ_i sum(w_i²)] over the floating tensors of ``module``'s state, in float64: two numbers
    that change when any weight does (a restart with another teacher is refused)."""
    values = [t for t in module.state_dict().values() if t.is_floating_point()]
    sums = torch.stack([t.double().sum() * (i + 1) for i, t in enumerate(values)]).sum()
    squares = torch.stack([t.double().square().sum() for t in values]).sum()
    return torch.stack([sums, squares]).cpu()


def build_student_backbone(cfg: DictConfig, teacher_width: int) -> nn.Module:
    """``student.arch``: a ViT of ours (``student.*``), or ``timm:<name>`` whose feature map is projected to the
    teacher's width, at stride ``student.patch_size``."""
    arch = cfg.student.arch
    if is_timm_arch(arch):
        name = arch.partition(":")[2]
        backbone = TimmBackbone.for_stride(name, teacher_width, cfg.student.patch_size, cfg.crops.global_crops_size)
        backbone.input_decoding = training_decoding(cfg).to_record()
        return backbone
    return build_backbone(cfg, drop_path=True)


def _no_mark(phase: str) -> None:
    """The default ``on_phase`` hook: nothing to record."""


def _student_grid(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    return images.shape[-2] // patch_size, images.shape[-1] // patch_size


class DistillMetaArch(SSLMetaArch):
    """The frozen-teacher plumbing shared by both modes (module docstring); subclasses add the student's heads or
    projection in ``_build_student_heads`` and their losses."""

    def __init__(self, cfg: DictConfig, teacher: Teacher):
        nn.Module.__init__(self)  # not SSLMetaArch.__init__: the student and teacher are built here
        self.cfg = cfg
        teacher.modules.requires_grad_(False)
        teacher.modules.eval()
        object.__setattr__(self, "_teacher", teacher.modules)  # outside the module tree: not in the checkpoints
        self.teacher_source = teacher.source
        self._signature = weights_signature(teacher.modules)
        # stored as the bits of the float64 values: an integer buffer keeps them through model.to(dtype)
        self.register_buffer("teacher_signature", self._signature.view(torch.int64).clone())
        self._teacher_checked = False
        self.student = nn.ModuleDict({"backbone": build_student_backbone(cfg, teacher.width)})
        self._ema_pairs = None
        self._build_objective(teacher)

    def _build_objective(self, teacher: Teacher) -> None:
        """The student's heads (or projection) and the loss settings of the mode."""
        raise NotImplementedError

    @property
    def teacher(self) -> nn.ModuleDict:
        return self._teacher

    @property
    def export_modules(self) -> nn.ModuleDict:
        """The student: what the run exports in the release format and evaluates (periodic k-NN)."""
        return self.student

    @property
    def student_takes_masks(self) -> bool:
        """Whether the student backbone has a mask token (our ViTs); a CNN sees its global crops unmasked."""
        return not isinstance(self.student["backbone"], TimmBackbone)

    def update_teacher(self, momentum: float, include_backbone: bool = True) -> None:
        """Nothing: the teacher is frozen."""

    def load_pretrained_backbone(
        self, state_dict: dict[str, torch.Tensor], source: str = "student.pretrained_weights"
    ) -> None:
        """Initialise the student's ViT backbone (not the teacher) from backbone weights in any layout."""
        backbone = self.student["backbone"]
        weights, _ = from_release(state_dict, config=backbone.config)
        hint = "it is for another architecture than student.arch/embed_dim/depth/patch_size/ffn_layer"
        load_strict(backbone, weights, source, "the configured student backbone (student.*)", hint)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._teacher._apply(fn, recurse)
        return self

    def check_teacher(self) -> None:
        """Refuse a teacher whose weights differ from those the run's checkpoint was trained against (once)."""
        if self._teacher_checked:
            return
        stored = self.teacher_signature.detach().cpu().view(torch.float64)
        if not torch.allclose(stored, self._signature, rtol=1e-9, atol=0.0):
            raise RuntimeError(
                f"teacher.weights={self.teacher_source} is not the teacher this run was trained against (weights "
                f"signature {self._signature.tolist()} vs {stored.tolist()} in the checkpoint); give the original "
                "teacher, or start a new run (--no-resume or another --output-dir)"
            )
        self._teacher_checked = True

    @torch.no_grad()
    def teacher_tokens(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher backbone's output dict on ``images`` (resized to a multiple of its patch), its patch tokens
        resized to the student's grid of ``images``."""
        self.check_teacher()
        backbone = self.teacher["backbone"]
        fitted = fit_to_patch(images, backbone.patch_size)
        out = dict(backbone(fitted, is_training=True))
        source = _student_grid(fitted, backbone.patch_size)
        target = _student_grid(images, self.student["backbone"].patch_size)
        out["x_norm_patchtokens"] = resize_patch_tokens(out["x_norm_patchtokens"], source, target)
        return out


class HeadDistillMetaArch(DistillMetaArch):
    """With heads: Franca's losses (``SSLMetaArch.student_losses``) on the frozen teacher's targets."""

    def _build_objective(self, teacher: Teacher) -> None:
        width = self.student["backbone"].embed_dim
        for name, spec in teacher.head_specs.items():
            self.student[name] = spec.for_width(width).build(teacher.l2_norm, self.cfg.dino.head_init)
            got, expected = self.student[name].out_dims, teacher.modules[name].out_dims
            if got != expected:
                raise ValueError(f"the student's {name} has {got} prototypes per level, the teacher's {expected}")
        self._init_objective(self.cfg)

    @torch.no_grad()
    def teacher_backbone(self, batch: dict) -> dict[str, torch.Tensor]:
        """The teacher on the global crops, its patch tokens on the student's grid (where the iBOT masks are)."""
        return self.teacher_tokens(batch["collated_global_crops"])

    def student_backbone(self, batch: dict, train_backbone: bool = True) -> StudentFeatures:
        """As Franca's, but a student without mask token (a CNN) sees its global crops unmasked; the iBOT loss is
        then taken at the positions the masks select."""
        if self.student_takes_masks:
            return super().student_backbone(batch, train_backbone)
        return super().student_backbone({**batch, "collated_masks": None}, train_backbone)


@dataclass
class FeatureTargets:
    """The teacher's side of one head-free (micro-)batch: per crop size the centred CLS features and the centred patch
    features (rows = images × patches on the student's grid), the raw global CLS (health statistics) and the queue's
    keys at the start of the step (``distill.feature_loss=kl_queue``, else None)."""

    cls: list[torch.Tensor]
    patch: list[torch.Tensor]
    teacher_cls: torch.Tensor
    queue_keys: list[torch.Tensor] | None


class FeatureProjector(nn.Module):
    """Linear maps of the student's CLS and patch tokens to the teacher's width (training only; not exported). Called
    as a whole (``forward``), so that FSDP2's hooks on the module gather its parameters."""

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        self.cls = nn.Linear(student_width, teacher_width)
        self.patch = nn.Linear(student_width, teacher_width)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls(cls), self.patch(patches)


class FeatureDistillMetaArch(DistillMetaArch):
    """Head-free: the student's projected CLS and patch tokens match the teacher's, centred by a running mean, on the
    same global and local crops (``distill.feature_loss``)."""

    def _build_objective(self, teacher: Teacher) -> None:
        cfg = self.cfg.distill
        self.n_local_crops = self.cfg.crops.local_crops_number
        self.student["projector"] = FeatureProjector(self.student["backbone"].embed_dim, teacher.width)
        self.cls_center = FeatureCenter(teacher.width, cfg.center_momentum)
        self.patch_center = FeatureCenter(teacher.width, cfg.center_momentum)
        self.queue = FeatureQueue(teacher.width, cfg.queue_size) if cfg.feature_loss == "kl_queue" else None
        object.__setattr__(self, "_export", nn.ModuleDict({"backbone": self.student["backbone"]}))

    @property
    def export_modules(self) -> nn.ModuleDict:
        """The student backbone (the projection is a training device)."""
        return self._export

    @property
    def has_clustering_heads(self) -> bool:
        return False

    def _feature_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg.distill
        if cfg.feature_loss == "smooth_l1":
            return smooth_l1_loss(student, teacher, cfg.smooth_l1_beta)
        return cosine_loss(student, teacher)

    def _crops(self, batch: dict) -> list[tuple[int, torch.Tensor]]:
        """(crops per image, images) of each crop size: the global crops, then the local crops."""
        crops = [(2, batch["collated_global_crops"])]
        if self.n_local_crops:
            crops.append((self.n_local_crops, batch["collated_local_crops"]))
        return crops

    @torch.no_grad()
    def teacher_backbone(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        """The teacher's tokens of each crop size (:meth:`_crops`), patch tokens on the student's grid."""
        return [self.teacher_tokens(images) for _, images in self._crops(batch)]

    @torch.no_grad()
    def teacher_targets(
        self,
        teacher_outs: list[list[dict[str, torch.Tensor]]],
        batches: list[dict],
        teacher_temp: float,
        chunk_size: int | None = None,
    ) -> list[FeatureTargets]:
        """The centred teacher features of every micro-batch and crop size; then the step's teacher features are
        folded into the centres, and its centred global CLS features into the queue (after the targets are made, as
        the DINO centre). ``teacher_temp`` and ``chunk_size`` concern the heads' targets only."""
        cls = [[self.cls_center(out["x_norm_clstoken"]) for out in outs] for outs in teacher_outs]
        keys = None
        if self.queue is not None:  # per crop size: the step's rows (all micro-batches) and the queue
            keys = [self.queue.keys(torch.cat(rows)) for rows in zip(*cls, strict=True)]
        targets = [
            FeatureTargets(
                cls=step_cls,
                patch=[self.patch_center(out["x_norm_patchtokens"]).flatten(0, 1) for out in outs],
                teacher_cls=outs[0]["x_norm_clstoken"],
                queue_keys=keys,
            )
            for step_cls, outs in zip(cls, teacher_outs, strict=True)
        ]
        flat = [out for outs in teacher_outs for out in outs]
        if self.queue is not None:  # crop-major over all micro-batches and ranks: the order of one large batch
            views = [torch.cat([target.cls[0].chunk(2)[view] for target in targets]) for view in (0, 1)]
            for rows in reversed(views):  # each push goes to the front: view 0 ends up first
                self.queue.push(rows)
        self.cls_center.update(torch.cat([out["x_norm_clstoken"] for out in flat]))
        self.patch_center.update(torch.cat([out["x_norm_patchtokens"].flatten(0, 1) for out in flat]))
        return targets

    def student_losses(
        self,
        batch: dict,
        teacher: "FeatureTargets",
        chunk_size: int | None = None,
        stats: dict | None = None,
        on_phase: Callable[[str], None] = _no_mark,
        train_backbone: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``feature_cls_loss`` and ``feature_patch_loss`` (each the mean over the 2 + L crops of each image, crop sets
        weighted by their crop counts) and KoLeo on the student's global CLS; ``stats`` gets the teacher's and the
        student's CLS spread. Without ``train_backbone`` (the heads-first stage) only the projection learns."""
        cfg = self.cfg
        crops = self._crops(batch)
        n_crops = sum(count for count, _ in crops)
        cls_total, patch_total, student_global = 0.0, 0.0, None
        for index, (count, images) in enumerate(crops):
            with torch.set_grad_enabled(train_backbone and torch.is_grad_enabled()):
                student = self.student["backbone"](images, is_training=True)
            student_global = student if index == 0 else student_global
            cls, patch = self.student["projector"](student["x_norm_clstoken"], student["x_norm_patchtokens"])
            cls_loss, patch_loss = self._feature_losses(cls, patch.flatten(0, 1), teacher, index)
            cls_total = cls_total + cls_loss * count / n_crops
            patch_total = patch_total + patch_loss * count / n_crops
        on_phase("student_backbone")
        losses = {
            "feature_cls_loss": cfg.distill.cls_loss_weight * cls_total,
            "feature_patch_loss": cfg.distill.patch_loss_weight * patch_total,
        }
        if cfg.dino.koleo_loss_weight > 0:
            views = student_global["x_norm_clstoken"].chunk(2)
            losses["koleo_loss"] = cfg.dino.koleo_loss_weight * sum(koleo_loss(view) for view in views)
        on_phase("student_heads_losses")
        if stats is not None:
            stats["teacher_cls_spread"] = health.spread_stats(teacher.teacher_cls)
            stats["student_cls_spread"] = health.spread_stats(student_global["x_norm_clstoken"].detach())
        return losses

    def _feature_losses(
        self, cls: torch.Tensor, patch: torch.Tensor, teacher: "FeatureTargets", index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS loss, patch loss) of crop size ``index``: the queue KL on the CLS and cosine on the patches with
        ``distill.feature_loss=kl_queue``, else ``distill.feature_loss`` on both."""
        cfg = self.cfg.distill
        target_cls, target_patch = teacher.cls[index], teacher.patch[index]
        if teacher.queue_keys is not None:
            keys = teacher.queue_keys[index]
            cls_loss = queue_kl_loss(cls, target_cls, keys, cfg.queue_student_temp, cfg.queue_teacher_temp)
            return cls_loss, cosine_loss(patch, target_patch)
        return self._feature_loss(cls, target_cls), self._feature_loss(patch, target_patch)


def build_distill_meta_arch(cfg: DictConfig, teacher: Teacher, mode: str) -> DistillMetaArch:
    """The meta-architecture of ``mode`` ("heads" or "features"; :func:`choose_mode`)."""
    model = {"heads": HeadDistillMetaArch, "features": FeatureDistillMetaArch}[mode](cfg, teacher)
    count = sum(p.numel() for p in model.student["backbone"].parameters())
    print(f"student {cfg.student.arch}: {count:,} backbone parameters, width {model.student['backbone'].embed_dim}")
    return model
