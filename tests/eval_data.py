"""Tiny data for the evaluation-command tests: photo crops in class folders, a random ViT checkpoint, and linearly
separable synthetic features."""

from pathlib import Path

import torch
from PIL import Image
from skimage import data

from franca.models.vision_transformer import build_vit

PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea}
IMAGE_OPTIONS = ["--resize-size", "40", "--crop-size", "32", "--batch-size", "8", "--num-workers", "0"]


def make_photo_folders(root: Path, n_train: int = 6, n_val: int = 3) -> tuple[str, str]:
    """``ImageFolder`` dataset strings (train, val): shifted 64×64 crops of three skimage photos (downscaled 3×), one
    class each."""
    for name, load in PHOTOS.items():
        photo = load()[::3, ::3]
        for split, indices in (("train", range(n_train)), ("val", range(n_train, n_train + n_val))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                Image.fromarray(photo[6 * i : 6 * i + 64, 8 * i : 8 * i + 64]).save(folder / f"{i}.png")
    return f"ImageFolder:root={root / 'train'}", f"ImageFolder:root={root / 'val'}"


def save_tiny_checkpoint(path: Path, depth: int = 2, seed: int = 0) -> str:
    """A random ViT (dim 192, patch 8, 32 px) saved in the release format ``{"teacher": {"backbone.<key>": ...}}``."""
    torch.manual_seed(seed)
    model = build_vit("vit_tiny", depth=depth, patch_size=8, img_size=32)
    torch.save({"teacher": {"backbone." + k: v for k, v in model.state_dict().items()}}, path)
    return str(path)


def separable_features(
    n_per_class: int, num_classes: int = 4, dim: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features = fixed random linear map of (5·one-hot(class) + N(0, 0.5²) noise): linearly separable classes."""
    generator = torch.Generator().manual_seed(seed)
    mapping = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    inputs = 5.0 * torch.nn.functional.one_hot(labels, num_classes).float()
    inputs += 0.5 * torch.randn(inputs.shape, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return (inputs @ mapping)[order], labels[order]
