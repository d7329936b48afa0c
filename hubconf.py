"""torch.hub entry points: ``torch.hub.load("valeoai/Franca" or a local clone, "franca_vitb14", weights=...)``.

``franca_from_checkpoint(weights=PATH_OR_URL)`` loads any of our checkpoints or exports, reading the architecture
off the file; the B/L/g entries build their fixed architecture and refuse other shapes.
"""

from franca.hub.backbones import franca_from_checkpoint, franca_vitb14, franca_vitg14, franca_vitl14

dependencies = ["torch", "torchvision", "omegaconf"]

__all__ = ["franca_from_checkpoint", "franca_vitb14", "franca_vitg14", "franca_vitl14"]
