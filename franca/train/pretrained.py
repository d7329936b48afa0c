"""``student.pretrained_weights``: the backbone weights that both the student and the teacher start from.

Reading them needs the whole of :mod:`franca.hub` (release names, URLs with their SHA-256 rules, export folders), so
this module sits with the entry points (docs/architecture.md); the trainer passes :func:`load_pretrained` to
:func:`franca.train.build.build_model`.
"""

from omegaconf import DictConfig

from franca.hub import load_backbone
from franca.train.ssl_meta_arch import SSLMetaArch


def load_pretrained(cfg: DictConfig, model: SSLMetaArch) -> None:
    """Both backbones of ``model`` from ``student.pretrained_weights`` (nothing when it is ''); heads stay fresh."""
    source = cfg.student.pretrained_weights
    if not source:
        return
    backbone = load_backbone(source)
    model.load_pretrained_backbone(backbone.state_dict())
    print(f"initialised student and teacher backbones from {source} (heads are fresh)", flush=True)
