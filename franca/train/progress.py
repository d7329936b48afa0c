"""What the trainer's console says beyond the numbers: each clustering loss beside its value when nothing is learnt
(training.md, "Small runs and your own data"), and why a rerun of a finished run does nothing.

A cross-entropy between a uniform target and a uniform prediction over K prototypes is log K. Summed over the
Matryoshka levels with the level weights w_l and averaged as :meth:`SSLMetaArch.assemble_losses` averages (2 global
and L local crops; ``franca/train/ssl_meta_arch.py``), the loss terms at uniform targets and predictions are

- ``dino_local``  = dino.loss_weight · Σ_l w_l log K_l · 2L / (2 + max(2L, 1)): each local crop against both teacher
  global crops, divided by the original's pair count;
- ``dino_global`` = dino.loss_weight · Σ_l w_l log K_l · 2 / (2 + max(2L, 1)): each global crop against the other
  view's target;
- ``ibot``        = ibot.loss_weight · Σ_l w_l log K_l · m / (2B): every masked token weighs 1 / (masked tokens of its
  image), so each of the m global crops with masked tokens adds one uniform cross-entropy, and the sum is divided
  by the 2B global crops; the collate masks int(2·B·W·p) of the 2·B·W global crops of a step (W ranks,
  p = ``ibot.mask_sample_probability``), so the rank-averaged value uses m / 2B = int(2BWp) / (2BW).

K_l are the heads' prototype counts per level (``out_dims``). A loss learns when it falls below its uniform value:
the teacher's targets then carry information the student matches. KoLeo has no such value and is shown alone.
"""

import math
from pathlib import Path

from franca.checkpoint.release import teacher_export_path
from franca.train.ssl_meta_arch import SSLMetaArch

UNIFORM_TERMS = ("dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss")


def level_sum(prototypes: list[int], level_weights: list[float] | None) -> float:
    """Σ_l w_l log K_l (w_l = 1 when no weights are given)."""
    weights = list(level_weights) if level_weights else [1.0] * len(prototypes)
    return sum(w * math.log(k) for w, k in zip(weights, prototypes, strict=True))


def uniform_loss_values(
    dino_prototypes: list[int],
    ibot_prototypes: list[int] | None,
    n_local_crops: int,
    masked_share: float,
    dino: dict,
    ibot: dict,
) -> dict[str, float]:
    """The logged loss terms at uniform targets and predictions (module docstring). ``dino`` / ``ibot`` hold the
    config's ``loss_weight`` and ``level_weights``; ``ibot_prototypes`` None = no iBOT term; ``masked_share`` = m / 2B.
    """
    pairs = 2 + max(2 * n_local_crops, 1)
    dino_sum = dino["loss_weight"] * level_sum(dino_prototypes, dino["level_weights"])
    values = {}
    if n_local_crops:
        values["dino_local_crops_loss"] = dino_sum * 2 * n_local_crops / pairs
    values["dino_global_crops_loss"] = dino_sum * 2 / pairs
    if ibot_prototypes is not None:
        values["ibot_loss"] = ibot["loss_weight"] * level_sum(ibot_prototypes, ibot["level_weights"]) * masked_share
    return values


def masked_global_share(batch_size_per_rank: int, world_size: int, mask_probability: float) -> float:
    """int(2·B·W·p) / (2·B·W): the share of a step's global crops that the collate masks."""
    crops = 2 * batch_size_per_rank * world_size
    return int(crops * mask_probability) / crops


def model_uniform_values(model: SSLMetaArch, world_size: int) -> dict[str, float]:
    """:func:`uniform_loss_values` of a meta-architecture and its config, for ``world_size`` ranks; none for a model
    without clustering heads (head-free distillation)."""
    if not model.has_clustering_heads:
        return {}
    cfg = model.cfg
    ibot_prototypes = model._ibot_head("student").out_dims if model.use_ibot else None
    share = masked_global_share(cfg.train.batch_size_per_gpu, world_size, cfg.ibot.mask_sample_probability)
    heads = {
        name: {"loss_weight": cfg[name].loss_weight, "level_weights": list(cfg[name].level_weights)}
        for name in ("dino", "ibot")
    }
    dino_prototypes = model.student["dino_head"].out_dims
    return uniform_loss_values(
        dino_prototypes, ibot_prototypes, model.n_local_crops, share, heads["dino"], heads["ibot"]
    )


def short_name(term: str) -> str:
    return term.replace("_crops", "").replace("_loss", "")


def announce_uniform_values(uniform: dict[str, float]) -> str:
    """The line printed at the start of a run: each clustering loss's uniform value."""
    values = ", ".join(f"{short_name(term)} {value:.2f}" for term, value in uniform.items())
    return f"uniform values (the losses when nothing is learnt; they learn once below): {values}"


def format_losses(losses: dict[str, float], uniform: dict[str, float]) -> str:
    """``dino_local 15.8412/19.41 dino_global 4.0132/4.85 koleo -0.1021 ibot 9.9023/12.13``: each term, and beside it
    its uniform value where it has one."""
    return " ".join(
        f"{short_name(term)} {value:.4f}" + (f"/{uniform[term]:.2f}" if term in uniform else "")
        for term, value in losses.items()
    )


def finished_run_note(out_dir: Path, max_iter: int) -> str:
    """What a rerun of a complete run prints instead of exporting its teacher again."""
    return (
        f"the run in {out_dir} is complete ({max_iter}/{max_iter} iterations) and its teacher is exported to "
        f"{teacher_export_path(out_dir, max_iter)}: nothing to do (raise optim.epochs to train on, or pass --no-resume "
        "to start again)"
    )
