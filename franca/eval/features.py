"""Batched feature extraction from a frozen backbone, with a progress line."""

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from franca.utils.logging import Progress


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
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
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    feats, labels = [], []
    progress = Progress(f"extracting {name}", len(dataset))
    last = time.perf_counter()
    done = 0
    for images, targets in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(images.to(device, non_blocking=True))
        feats.append(out.float().cpu())
        labels.append(torch.as_tensor(targets))
        done += len(images)
        if time.perf_counter() - last > log_every_s or done == len(dataset):
            progress.print(done)
            last = time.perf_counter()
    return torch.cat(feats), torch.cat(labels).long()
