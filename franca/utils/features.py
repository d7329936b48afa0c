"""Batched feature extraction from a frozen model, with a progress line; shared by the evaluation commands, the
benchmarks and the trainer's periodic k-NN (:mod:`franca.train.knn_monitor`)."""

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
    autocast_dtype: torch.dtype | None | str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``model(x)`` [N, D] (fp32, on CPU) and integer labels [N] of an (image, label) dataset, in order.

    ``model`` is moved to ``device`` (default: CUDA when available) when its parameters are elsewhere. It runs in eval
    mode, without gradients, under autocast to ``autocast_dtype`` ("auto": bf16 on CUDA, none elsewhere, the
    evaluation default; None: none; the trainer passes its own), on images in its parameters' dtype (float64 for a
    ``compute_precision.dtype=fp64`` run); the train/eval mode of each of its modules is restored afterwards, so a
    model in training can be used.
    """
    device = device or default_device()
    if autocast_dtype == "auto":
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    if any(p.device != device for p in model.parameters()):  # a sharded model in training is already there
        model = model.to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    input_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    feats, labels = [], []
    progress = Progress(f"extracting {name}", len(dataset))
    last = time.perf_counter()
    done = 0
    try:
        for images, targets in loader:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(images.to(device, input_dtype, non_blocking=True))
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(targets))
            done += len(images)
            if time.perf_counter() - last > log_every_s or done == len(dataset):
                progress.print(done)
                last = time.perf_counter()
    finally:
        for module, training in modes.items():
            module.train(training)
    return torch.cat(feats), torch.cat(labels).long()
