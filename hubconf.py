"""torch.hub entry points: ``torch.hub.load("valeoai/Franca" or a local clone, "franca_vitb14", weights=...)``."""

from franca.hub.backbones import franca_vitb14, franca_vitg14, franca_vitl14

dependencies = ["torch", "torchvision", "omegaconf"]

__all__ = ["franca_vitb14", "franca_vitg14", "franca_vitl14"]
