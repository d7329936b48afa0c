"""``teacher.weights``: the frozen teacher of a distillation, its backbone read by the hub and, when the file has them,
its DINO / iBOT heads (training.md, "Distil").

The backbone comes from :func:`franca.hub.franca_from_checkpoint` (registry and hub names, release and teacher
files, training checkpoints, safetensors folders, URLs). A training checkpoint stores no ``backbone_config``, and the
head count of a non-standard width is not in its tensors: for a file inside a franca run folder (``<run>/checkpoints/``
or ``<run>/eval/training_<n>/``) it is read from the run's ``config.yaml``.

Heads exist only in files that franca runs write: the teacher of a training checkpoint ``model_*.pth`` and a teacher
export ``teacher_checkpoint.pth`` (released weights and safetensors folders carry none). Their shapes are read off the
tensors (:class:`franca.layers.head_spec.HeadSpec`); the one switch the tensors do not show, ``dino.mrl_l2_norm`` (L2
norm, or the original GELU, after the bottleneck), is read from the run's ``config.yaml`` too, else from the distill
config; the teacher's description says which.
"""

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from franca.hub import franca_from_checkpoint, load_checkpoint_file
from franca.hub.loading import is_url
from franca.layers.head_spec import HeadSpec
from franca.models.config import ARCHITECTURES
from franca.models.weights import extract_training_heads, load_strict
from franca.train.distill_meta_arch import Teacher

RUN_CONFIG = "config.yaml"


def read_heads(source: str) -> dict[str, dict]:
    """The head tensors of a teacher file or URL (``{}`` for hub names and files without heads)."""
    if not is_url(source) and not os.path.isfile(source):
        return {}
    return extract_training_heads(load_checkpoint_file(source))


def run_config_of(source: str) -> Path | None:
    """The ``config.yaml`` of the franca run a local teacher file belongs to, if any."""
    if is_url(source):
        return None
    path = Path(source).resolve()
    return next((folder / RUN_CONFIG for folder in path.parents[:3] if (folder / RUN_CONFIG).is_file()), None)


def run_num_heads(run: DictConfig) -> int | None:
    """The attention heads of a run config's ViT (``student.num_heads``, else those of ``student.arch``)."""
    student = run.get("student", {})
    heads = student.get("num_heads") or ARCHITECTURES.get(student.get("arch"), (0, 0, 0))[2]
    return heads or None


def head_l2_norm(run: DictConfig | None, cfg: DictConfig) -> tuple[bool, str]:
    """``dino.mrl_l2_norm`` of the teacher's heads and where it was read."""
    value = None if run is None else OmegaConf.select(run, "dino.mrl_l2_norm")
    if value is not None:
        return bool(value), "the teacher's run config"
    return bool(cfg.dino.mrl_l2_norm), "dino.mrl_l2_norm of the distill config"


def load_teacher(cfg: DictConfig) -> Teacher:
    """The frozen teacher of ``teacher.weights``, with its heads when the file has them."""
    source = str(cfg.teacher.weights)
    run_path = run_config_of(source)
    run = OmegaConf.load(run_path) if run_path is not None else None
    heads_count = run_num_heads(run) if run is not None else None
    backbone = franca_from_checkpoint(source, **({"num_heads": heads_count} if heads_count else {}))
    if run_path is not None:
        print(f"teacher run config {run_path}: {backbone.num_heads} attention heads", flush=True)
    modules = nn.ModuleDict({"backbone": backbone})
    heads = read_heads(source)
    specs, l2_norm = {}, False
    if heads:
        l2_norm, origin = head_l2_norm(run, cfg)
        for name, state in heads.items():
            spec = HeadSpec.from_state_dict(state, backbone.embed_dim, f"{source} ({name})")
            modules[name] = spec.build(l2_norm)
            load_strict(modules[name], state, f"{source} ({name})", f"the {spec.describe()}")
            specs[name] = spec
            print(f"teacher {name}: {spec.describe()}, l2_norm={l2_norm} (from {origin})", flush=True)
    return Teacher(modules, source, specs, l2_norm)
