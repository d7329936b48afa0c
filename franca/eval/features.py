"""Batched feature extraction from a frozen backbone for the evaluation commands (:mod:`franca.utils.features` with
the evaluation defaults: the model moved to the device, bf16 autocast on CUDA)."""

import torch
from torch import nn
from torch.utils.data import Dataset

from franca.utils import features
from franca.utils.features import default_device

__all__ = ["default_device", "extract_features"]


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | None = None,
    name: str = "features",
    log_every_s: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS features ``model(x)`` [N, D] (fp32, on CPU) and integer labels [N] of a (image, label) dataset.

    On CUDA the forward runs under bf16 autocast; features are returned in fp32.
    """
    device = device or default_device()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    return features.extract_features(
        model.to(device), dataset, batch_size, num_workers, device, name, log_every_s, autocast_dtype
    )
