"""The Franca meta-architecture: student and EMA teacher (backbone + DINO head + iBOT head) and their losses.

One ``forward_backward`` computes the whole objective of reference §3–4.2 for a collated multi-crop batch:
- teacher (eval mode, no grad): global crops → CLS → DINO head → per-level targets; masked patch tokens → iBOT head →
  per-level targets (Sinkhorn-Knopp, or softmax centering);
- student: global crops (with mask tokens) and local crops as two batches; CLS of all crops through the DINO head,
  masked patch tokens through the iBOT head; DINO loss averaged over the 2 + 2L (student crop, teacher crop) pairs and
  summed over Matryoshka levels, iBOT loss, KoLeo on the backbone CLS of each global view.
The DINOv2 baseline is the same code with ``dino.MRL: false`` (one-level heads).

``compute_precision.chunked_losses`` (auto = on CUDA) switches the targets and the DINO / iBOT cross-entropies to
their chunked forms (``franca.loss.chunked``): the same values in exact arithmetic, without fp32 [tokens × K] tensors.
On CPU the plain path stays the default; its numbers are the golden test's.
"""

import torch
from omegaconf import DictConfig
from torch import nn

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
)
from franca.models import build_vit
from franca.models.vision_transformer import resize_pos_embed
from franca.train import health

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def build_backbone(cfg: DictConfig, drop_path: bool = True) -> nn.Module:
    """The ViT of ``cfg.student`` at the global-crop size (drop path only for the student)."""
    s = cfg.student
    overrides = {k: s[k] for k in ("embed_dim", "depth", "num_heads") if s[k]}
    return build_vit(
        s.arch,
        **overrides,
        img_size=cfg.crops.global_crops_size,
        patch_size=s.patch_size,
        ffn_layer=s.ffn_layer,
        layerscale=s.layerscale,
        drop_path_rate=s.drop_path_rate if drop_path else 0.0,
        drop_path_uniform=s.drop_path_uniform,
        qkv_bias=s.qkv_bias,
        proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias,
        num_register_tokens=s.num_register_tokens,
        interpolate_offset=s.interpolate_offset,
        interpolate_antialias=s.interpolate_antialias,
    )


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


def resolve_autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``compute_precision.dtype``: auto = bf16 on CUDA and fp32 (no autocast) on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AUTOCAST_DTYPES[name]


def resolve_loss_chunk_size(chunked_losses: str, chunk_size: int, device: torch.device) -> int | None:
    """Rows per chunk of the chunked losses, or None for the plain path (``compute_precision.chunked_losses``).

    auto = chunked on CUDA (where the [tokens × K] fp32 tensors cost memory and time), plain elsewhere.
    """
    if chunked_losses not in ("auto", "true", "false"):
        raise ValueError(f"compute_precision.chunked_losses={chunked_losses!r}; use auto, true or false")
    if chunk_size < 1:
        raise ValueError(f"compute_precision.loss_chunk_size={chunk_size} must be >= 1 (rows per chunk, e.g. 256)")
    enabled = device.type == "cuda" if chunked_losses == "auto" else chunked_losses == "true"
    return chunk_size if enabled else None


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.student = build_model_dict(cfg, drop_path=True)
        self.teacher = build_model_dict(cfg, drop_path=False)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

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

    def _ibot_head(self, which: str) -> nn.Module:
        models = self.student if which == "student" else self.teacher
        return models["ibot_head"] if "ibot_head" in models else models["dino_head"]

    def load_pretrained_backbone(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Initialise both backbones from released-format weights (heads stay fresh: continued pretraining).

        A position grid of another size (e.g. 224 px weights for 518 px finetuning) is resized with the model's own
        run-time interpolation, the same as ``scripts/modify_ckpt_highres.py``: the initial model then reproduces the
        source model run at the new size.
        """
        backbone = self.student["backbone"]
        own = backbone.state_dict()
        state_dict = dict(state_dict)
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.shape != own["pos_embed"].shape and pos.shape[-1] == own["pos_embed"].shape[-1]:
            grid = backbone.img_size // backbone.patch_size
            resized = resize_pos_embed(pos, (grid, grid), backbone.interpolate_offset, backbone.interpolate_antialias)
            state_dict["pos_embed"] = resized.to(pos.dtype)
        mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if mismatched or missing or unexpected:
            shapes = ", ".join(f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:4])
            raise ValueError(
                f"student.pretrained_weights do not fit the configured backbone: shape mismatches [{shapes}], "
                f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}; the checkpoint is for another "
                "architecture than student.arch/embed_dim/depth/patch_size/ffn_layer"
            )
        backbone.load_state_dict(state_dict)
        self.teacher["backbone"].load_state_dict(state_dict)

    def loss_chunk_size(self, device: torch.device) -> int | None:
        """Rows per chunk of the chunked losses on ``device``, None for the plain path."""
        precision = self.cfg.compute_precision
        return resolve_loss_chunk_size(precision.chunked_losses, precision.loss_chunk_size, device)

    # ----------------------------------------------------------------------------------------------------------------
    def _teacher_targets(
        self, logits: list[torch.Tensor], temp: float, center: SoftmaxCentering | None, chunk_size: int | None = None
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
    def _teacher_output(
        self, global_crops: torch.Tensor, mask_indices: torch.Tensor, teacher_temp: float, chunk_size: int | None
    ):
        out = self.teacher["backbone"](global_crops, is_training=True)
        cls_logits = self.teacher["dino_head"](out["x_norm_clstoken"])
        patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        patch_logits = self._ibot_head("teacher")(patches) if self.use_ibot else None
        use_center = self.centering == "centering"
        dino_center = self.dino_center if use_center else None
        dino_targets = self._teacher_targets(cls_logits, teacher_temp, dino_center, chunk_size)
        ibot_targets = None
        if patch_logits is not None:
            ibot_center = self.ibot_center if use_center else None
            ibot_targets = self._teacher_targets(patch_logits, teacher_temp, ibot_center, chunk_size)
        return dino_targets, ibot_targets, out["x_norm_clstoken"]

    def compute_losses(self, batch: dict, teacher_temp: float, stats: dict | None = None) -> dict[str, torch.Tensor]:
        """All loss terms for one collated batch (paper arXiv 2507.14137, Sec. 3); their sum is the training objective.

        Given a dict, ``stats`` is filled with this rank's raw training-health statistics (``franca.train.health``):
        device tensors computed from the targets and logits already made, reduced over ranks by
        ``health.reduce_stats`` when the trainer writes a log line.
        """
        cfg = self.cfg
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        masks = batch["collated_masks"]
        mask_indices = batch["mask_indices_list"]
        n_global_images = global_crops.shape[0]
        n_local = self.n_local_crops

        chunk_size = self.loss_chunk_size(global_crops.device)
        dino_targets, ibot_targets, teacher_cls = self._teacher_output(
            global_crops, mask_indices, teacher_temp, chunk_size
        )

        backbone = self.student["backbone"]
        s_global = backbone(global_crops, masks=masks, is_training=True)
        global_cls = s_global["x_norm_clstoken"]
        cls_parts = [global_cls]
        if n_local:
            cls_parts.insert(0, backbone(local_crops, is_training=True)["x_norm_clstoken"])
        head_out = self.student["dino_head"](torch.cat(cls_parts))
        n_local_rows = head_out[0].shape[0] - n_global_images
        local_logits = [h[:n_local_rows] for h in head_out]
        global_logits = [h[n_local_rows:] for h in head_out]

        n_pairs = 2 + 2 * n_local
        losses = {}
        if n_local:
            local_loss = self.dino_loss(local_logits, dino_targets, n_local, 2)
            losses["dino_local_crops_loss"] = cfg.dino.loss_weight * local_loss / n_pairs
        global_loss = self.dino_loss(global_logits, dino_targets, 2, 2, skip_same_view=True)
        losses["dino_global_crops_loss"] = cfg.dino.loss_weight * global_loss / n_pairs
        if cfg.dino.koleo_loss_weight > 0:
            koleo = sum(koleo_loss(view) for view in global_cls.chunk(2))
            losses["koleo_loss"] = cfg.dino.koleo_loss_weight * koleo
        if ibot_targets is not None:
            patches = s_global["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
            patch_logits = self._ibot_head("student")(patches)
            ibot = self.ibot_loss(patch_logits, ibot_targets, batch["masks_weight"], n_global_images)
            losses["ibot_loss"] = cfg.ibot.loss_weight * ibot
        if stats is not None:
            rows = chunk_size or health.DEFAULT_CHUNK_ROWS
            stats.update(health.head_stats("dino", dino_targets, head_out, self.dino_loss.student_temp, rows))
            if ibot_targets is not None:
                stats.update(health.head_stats("ibot", ibot_targets, patch_logits, self.ibot_loss.student_temp, rows))
            stats["teacher_cls_spread"] = health.spread_stats(teacher_cls)
        return losses

    def forward_backward(
        self,
        batch: dict,
        teacher_temp: float,
        autocast_dtype: torch.dtype | None = None,
        scaler=None,
        stats: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the losses under autocast and backpropagate their sum; returns the detached loss terms.

        ``stats``: a dict to fill with the training-health statistics (see ``compute_losses``)."""
        device_type = batch["collated_global_crops"].device.type
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = self.compute_losses(batch, teacher_temp, stats)
        total = sum(losses.values())
        (scaler.scale(total) if scaler is not None else total).backward()
        return {k: v.detach() for k, v in losses.items()}

    def clip_gradients(self, max_norm: float) -> dict[str, torch.Tensor]:
        """Clip each student submodule's gradient norm separately (reference §4.2 step 4); returns the norms.

        Works on FSDP2-sharded (DTensor) gradients too: ``clip_grad_norm_`` then reduces the norm over the shards.
        """
        return {
            name: nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
            for name, module in self.student.items()
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA θ_t ← m·θ_t + (1−m)·θ_s over all three submodules.

        With FSDP2 each rank updates its own shards (student and teacher are sharded alike); with replicated students
        the teacher is a plain copy and takes the local replica. Every rank applies the same update, so the teacher
        stays consistent without communication. The (teacher, student) tensor lists are paired once, at the first
        update (after ``parallelize``), and reused: parameters keep their storage for the whole run.
        """
        if self._ema_pairs is None:
            self._ema_pairs = self._pair_ema_tensors()
        teacher_params, student_params = self._ema_pairs
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)

    def _pair_ema_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student = dict(self.student.named_parameters())
        teacher_params, student_params = [], []
        for name, p in self.teacher.named_parameters():
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
