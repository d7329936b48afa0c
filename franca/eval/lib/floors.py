"""Floors beside a model's number: what the same protocol gives without what pretraining learnt (docs/evaluation.md,
"Floors").

- ``random-init``: the same architecture at its initialisation. For a training export
  ``<run>/eval/training_<N>/teacher_checkpoint.pth`` it is the run's own initial teacher: ``<run>/eval/training_0``
  when the trainer exported it, else the ViT built under ``train.seed`` of ``<run>/config.yaml`` (the trainer seeds
  torch with it right before building the student backbone, whose copy the teacher starts as); for any other
  checkpoint, the ViT of its config built under ``--seed``. It reads out the same feature as the model (the CLS
  token; with a RASA head the mean patch token, as a random ViT has no RASA head).
- ``pixels``: the evaluation transform's normalised pixels, average-pooled to at most ``PIXEL_MAX_SIDE`` pixels a
  side (32: 3,072 values, so a large dataset's pixels fit in memory), flattened.

Both are extracted in the same pass over the data as the model (:class:`SideBySide`), so the floors cost one
forward of a random ViT and no extra decoding.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from franca.eval.lib.models import FeatureModel
from franca.models.config import ViTConfig
from franca.models.vision_transformer import DinoVisionTransformer

BASELINES = ("random-init", "pixels")
PIXEL_MAX_SIDE = 32
TRAINING_EXPORT = re.compile(r"training_(\d+)")


def parse_baselines(text: str) -> list[str]:
    """``random-init,pixels`` → the names, in the order given; an unknown name is an error that lists the choices."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown {unknown}; choose from {', '.join(BASELINES)} (comma-separated)")
    return names


class PixelFeatures(nn.Module):
    """Raw-pixel features: the (normalised) image average-pooled to at most ``max_side`` a side, flattened."""

    def __init__(self, max_side: int = PIXEL_MAX_SIDE):
        super().__init__()
        self.max_side = max_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            x = F.adaptive_avg_pool2d(x, (max(1, round(height * scale)), max(1, round(width * scale))))
        return x.flatten(1)


class SideBySide(nn.Module):
    """Several feature models in one forward: their features concatenated [B, Σ D_i] (:meth:`split` undoes it)."""

    def __init__(self, models: dict[str, nn.Module]):
        super().__init__()
        self.names = list(models)
        self.models = nn.ModuleList(models.values())
        self.widths: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [model(x).float() for model in self.models]
        self.widths = [f.shape[1] for f in features]
        return torch.cat(features, dim=1)

    def split(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, features.split(self.widths, dim=1), strict=True))


def run_folder(weights: str) -> Path | None:
    """The training run a ``<run>/eval/training_<N>/teacher_checkpoint.pth`` export belongs to, else None."""
    path = Path(weights)
    if path.is_file() and path.parent.parent.name == "eval" and TRAINING_EXPORT.fullmatch(path.parent.name):
        return path.parents[2]
    return None


def seeded_vit(config: ViTConfig, seed: int) -> DinoVisionTransformer:
    """The ViT of ``config`` as initialised under ``torch.manual_seed(seed)`` (the trainer's initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DinoVisionTransformer(config.inference())


@dataclass
class RandomInit:
    """The random-init backbone of a floor and a sentence saying which initialisation it is."""

    backbone: nn.Module
    source: str


def random_init(backbone: DinoVisionTransformer, weights: str, seed: int) -> RandomInit:
    """The random-init floor's backbone for ``backbone`` loaded from ``weights`` (module docstring)."""
    from franca.hub import load_backbone

    run = run_folder(weights)
    initial = run / "eval" / "training_0" / "teacher_checkpoint.pth" if run else None
    if initial is not None and initial.is_file():
        return RandomInit(load_backbone(initial), f"the run's initial teacher {initial}")
    if run is not None and (run / "config.yaml").is_file():
        from omegaconf import OmegaConf

        run_seed = int(OmegaConf.load(run / "config.yaml").train.seed)
        source = f"seed {run_seed}, train.seed of {run / 'config.yaml'}"
        return RandomInit(seeded_vit(backbone.config, run_seed), source)
    return RandomInit(seeded_vit(backbone.config, seed), f"seed {seed} (--seed; the run's seed is not known)")


def floor_models(
    model: nn.Module, backbone: DinoVisionTransformer, weights: str, baselines: list[str], seed: int, rasa: bool
) -> tuple[SideBySide, dict[str, str]]:
    """The model and its floors side by side, and a description of each floor."""
    models, sources = {"model": model}, {}
    for name in baselines:
        if name == "random-init":
            init = random_init(backbone, weights, seed)
            models[name] = FeatureModel(init.backbone.eval(), readout="mean_patch" if rasa else "cls")
            sources[name] = init.source + (", mean patch token" if rasa else ", CLS token")
        else:
            models[name] = PixelFeatures()
            sources[name] = f"normalised pixels, average-pooled to at most {PIXEL_MAX_SIDE} px a side"
    return SideBySide(models), sources
