"""Tiny data for the evaluation tests: photo crops in class folders, a random ViT checkpoint, linearly separable
synthetic features, and segmentation sets of real photos (2×2 photo grids whose mask label is the photo index, with
an oracle backbone; a VOC2012-like folder)."""

import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data
from torch import nn

from franca.data.datasets.base import IGNORE_INDEX
from franca.data.datasets.voc import NUM_CLASSES
from franca.models.vision_transformer import build_vit

PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea}
SEGMENTATION_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
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


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def photo_tiles(tile: int) -> list[np.ndarray]:
    """Each photo resized to tile × tile RGB uint8."""
    tiles = []
    for name in SEGMENTATION_PHOTOS:
        photo = getattr(data, name)()
        tiles.append(np.asarray(Image.fromarray(photo).convert("RGB").resize((tile, tile), Image.BILINEAR)))
    return tiles


def tile_image(order: tuple[int, ...], tiles: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A 2×2 grid of the photos ``order`` (row-major) and its mask (photo index per pixel)."""
    tile = tiles[0].shape[0]
    image = np.zeros((2 * tile, 2 * tile, 3), np.uint8)
    mask = np.zeros((2 * tile, 2 * tile), np.uint8)
    for slot, photo in enumerate(order):
        r, c = divmod(slot, 2)
        image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = tiles[photo]
        mask[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = photo
    return image, mask


def make_tile_segfolder(root: Path, tile: int = 32, n_train: int = 6, n_val: int = 3, ignore_border: bool = True):
    """``root/{train,val}/{images,masks}`` of 2×2 photo grids (all four photos in each image, in different orders);
    with ``ignore_border`` the first mask row of every val image is 255. Returns the root."""
    tiles = photo_tiles(tile)
    orders = list(itertools.permutations(range(len(SEGMENTATION_PHOTOS))))
    splits = {"train": orders[:n_train], "val": orders[-n_val:]}
    for split, split_orders in splits.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i, order in enumerate(split_orders):
            image, mask = tile_image(order, tiles)
            if split == "val" and ignore_border:
                mask[0] = 255
            Image.fromarray(image).save(root / split / "images" / f"img{i}.png")
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"img{i}.png")
    return root


class OracleBackbone(nn.Module):
    """A fake backbone whose patch features are the one-hot photo index of the patch, found by matching the patch
    pixels to the (normalised) photo tiles: the ideal feature extractor for :func:`make_tile_segfolder` data."""

    def __init__(self, tile: int = 32, patch_size: int = 8):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, len(SEGMENTATION_PHOTOS)
        library, labels = [], []
        for label, tile_pixels in enumerate(photo_tiles(tile)):
            normalised = (tile_pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            patches = torch.from_numpy(normalised).float().permute(2, 0, 1)[None]
            patches = nn.functional.unfold(patches, patch_size, stride=patch_size)[0].T
            library.append(patches)
            labels += [label] * len(patches)
        self.register_buffer("library", torch.cat(library))
        self.register_buffer("labels", torch.tensor(labels))

    def forward_features(self, x: torch.Tensor, use_rasa_head: bool = False) -> dict:
        patches = nn.functional.unfold(x.float(), self.patch_size, stride=self.patch_size).transpose(1, 2)
        nearest = torch.cdist(patches, self.library[None].expand(len(x), -1, -1)).argmin(-1)
        one_hot = nn.functional.one_hot(self.labels[nearest], self.embed_dim).float()
        return {"x_norm_patchtokens": one_hot, "patch_token_rasa": one_hot}


def photo(name: str, size: int = 48) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size))


def class_mask(seed: int, size: int = 48) -> np.ndarray:
    mask = np.random.default_rng(seed).integers(0, NUM_CLASSES, (size, size)).astype(np.uint8)
    mask[0, :] = IGNORE_INDEX
    return mask


def make_voc(root, with_aug: bool = True):
    """VOC2012-like folder: JPEGImages, palette masks in SegmentationClass, L masks in SegmentationClassAug."""
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(len(SEGMENTATION_PHOTOS))]
    for i, (image_id, name) in enumerate(zip(ids, SEGMENTATION_PHOTOS)):
        photo(name).save(root / "JPEGImages" / f"{image_id}.jpg")
        palette_mask = Image.fromarray(class_mask(i), mode="L").convert("P")
        palette_mask.putpalette([v for c in range(256) for v in ((c * 37) % 256, (c * 91) % 256, (c * 13) % 256)])
        palette_mask.save(root / "SegmentationClass" / f"{image_id}.png")
        Image.fromarray(class_mask(100 + i), mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:2]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[2:]) + "\n")
    if with_aug:
        (root / "ImageSets/Segmentation/trainaug.txt").write_text("\n".join(ids) + "\n")
    return ids
