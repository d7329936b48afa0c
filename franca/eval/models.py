"""Feature heads on a frozen backbone for the evaluation commands."""

import torch
from torch import nn


class FeatureModel(nn.Module):
    """The CLS token, or with ``use_rasa_head`` the mean of the RASA-debiased patch tokens (RASA leaves CLS alone)."""

    def __init__(self, backbone: nn.Module, use_rasa_head: bool = False):
        super().__init__()
        self.backbone = backbone
        self.use_rasa_head = use_rasa_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_rasa_head:
            return self.backbone(x)
        return self.backbone.forward_features(x, use_rasa_head=True)["patch_token_rasa"].mean(dim=1)
