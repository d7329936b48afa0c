"""The image feature read off a frozen backbone, one definition for every caller (evaluation commands, quickstart,
benchmarks): the CLS token, the mean patch token, the mean RASA-debiased patch token, or CLS and mean patch side by
side."""

import torch
from torch import nn

READOUTS = ("cls", "mean_patch", "rasa_mean_patch", "cls_mean_patch")


def read_out(features: dict[str, torch.Tensor], readout: str) -> torch.Tensor:
    """[B, D] (or [B, 2D] for ``cls_mean_patch``) from a ``forward_features`` output dict.

    ``rasa_mean_patch`` needs the output of ``forward_features(x, use_rasa_head=True)`` (RASA leaves CLS alone).
    """
    if readout == "cls":
        return features["x_norm_clstoken"]
    if readout == "mean_patch":
        return features["x_norm_patchtokens"].mean(dim=1)
    if readout == "rasa_mean_patch":
        return features["patch_token_rasa"].mean(dim=1)
    if readout == "cls_mean_patch":
        return torch.cat([features["x_norm_clstoken"], features["x_norm_patchtokens"].mean(dim=1)], dim=1)
    raise ValueError(f"feature read-out {readout!r} is unknown; choose one of {', '.join(READOUTS)}")


class FeatureModel(nn.Module):
    """A backbone that returns one read-out (:func:`read_out`); by default the CLS token, or with ``use_rasa_head``
    the mean of the RASA-debiased patch tokens."""

    def __init__(self, backbone: nn.Module, use_rasa_head: bool = False, readout: str | None = None):
        super().__init__()
        readout = readout or ("rasa_mean_patch" if use_rasa_head else "cls")
        if readout not in READOUTS:
            raise ValueError(f"feature read-out {readout!r} is unknown; choose one of {', '.join(READOUTS)}")
        self.backbone = backbone
        self.readout = readout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(x, use_rasa_head=self.readout == "rasa_mean_patch")
        return read_out(features, self.readout)
