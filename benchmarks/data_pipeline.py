"""Throughput of Franca's multi-crop data pipeline on JPEG folders: CPU workers, and decode + augment on a GPU.

One "img" is one decoded image turned into 2×224² + 8×98² crops (the IN21K recipes, reference §4.4).

- ``--make-jpegs N``: writes N JPEGs (quality 90) of typical ImageNet sizes into ``--images-dir`` (default
  ``OUT/jpegs``): random crops of scikit-image's bundled real photos, resized to about ``--size`` (each side × U(0.8,
  1.2), one in four portrait) and randomly flipped.
- CPU path: the trainer's own loader (``franca.train.train.build_data``: ImageFolder → PIL decode →
  ``DataAugmentationDINO`` → ``MaskingCollator``) with each ``--workers`` count; img/s measured after the warm-up
  (2 batches per worker, so the startup and the first prefetched batches are excluded). One worker ≈ one core
  (DataLoader workers run torch with one thread), so img/s per worker is img/s per CPU core.
- Tensor path (``--device cuda``; skipped with a message where there is no GPU): file bytes →
  ``torchvision.io.decode_jpeg(device=...)`` on the batch, then either
  ``per_image``: the library's ``DataAugmentationDINO`` itself applied to each decoded uint8 tensor on the device, or
  ``batched``: per-crop RandomResizedCrop + flip, then colour jitter, grayscale, blur, solarisation and normalisation
  on whole [B,3,S,S] crop batches with per-sample random parameters (:class:`BatchedMultiCrop`). The batched path
  applies the four jitter operations in one random order per batch (torchvision draws one per crop) and works on
  float images throughout; it models the cost of the same operations, it is not a bit-exact copy.
- Cores needed to feed a training step rate R img/s: ceil(R / img/s per core); the rates are ``--target-rates``
  (default the DINOv2-style ViT-B/14 and ViT-L/14 step rates, 335 and 156 img/s) and every run of
  ``--train-step-json`` (the output of benchmarks/train_step.py).

Results go to ``OUT/data_pipeline.json`` (atomically) and a Markdown table is printed last; ``--results-md FILE``
appends it as a dated section.

Reproduce::

    python benchmarks/data_pipeline.py --make-jpegs 2000 --images-dir results/jpegs --workers 1 2 4 8 16 \\
        --device cuda --train-step-json results/perf/train_step.json --out results/perf
"""

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import append_results_section, environment, markdown_table, resolve_device, write_json_atomic
from PIL import Image
from torchvision import io as tvio
from torchvision import transforms as v1
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from franca.config import load_config
from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO
from franca.data.datasets.files import scan_image_files
from franca.train.train import build_data

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "hubble_deep_field",
    "stereo_motorcycle",
    "coins",
    "grass",
    "gravel",
    "brick",
    "immunohistochemistry",
)
DEFAULT_TARGET_RATES = {"DINOv2-style ViT-B/14 step (design.md)": 335.0, "DINOv2-style ViT-L/14 step": 156.0}


def load_photos() -> list[np.ndarray]:
    """scikit-image's bundled real photos as RGB uint8 arrays (no download)."""
    try:
        import skimage.data
    except ImportError as error:
        raise SystemExit(
            f"--make-jpegs needs scikit-image for its sample photos ({error}); pip install scikit-image"
        ) from error
    photos = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image
        photos.append(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3])
    return photos


def make_jpegs(directory: Path, count: int, size: tuple[int, int], seed: int = 0, quality: int = 90) -> list[Path]:
    """``count`` JPEGs of about ``size`` = (width, height) made from real photos; returns their paths."""
    rng = np.random.default_rng(seed)
    photos = load_photos()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = (int(side * rng.uniform(0.8, 1.2)) for side in size)
        if rng.random() < 0.25:
            width, height = height, width
        crop_h, crop_w = _crop_with_aspect(photo.shape[0], photo.shape[1], width / height, rng.uniform(0.6, 1.0))
        top = rng.integers(0, photo.shape[0] - crop_h + 1)
        left = rng.integers(0, photo.shape[1] - crop_w + 1)
        image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize((width, height), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path = directory / f"img_{index:06d}.jpg"
        image.save(path, quality=quality)
        paths.append(path)
    return paths


def _crop_with_aspect(height: int, width: int, aspect: float, fraction: float) -> tuple[int, int]:
    """The largest (h, w) with w/h = aspect inside height × width, scaled by ``fraction``."""
    crop_w = min(width, height * aspect)
    crop_h = crop_w / aspect
    return max(1, int(crop_h * fraction)), max(1, int(crop_w * fraction))


# ---------------------------------------------------------------------------------------------------- CPU path
def pipeline_config(config_file: str, images_dir: Path, batch_size: int, workers: int):
    overrides = [
        f"train.dataset_path=ImageFolder:root={images_dir}",
        f"train.batch_size_per_gpu={batch_size}",
        f"train.num_workers={workers}",
    ]
    return load_config(config_file, overrides)


def measure_loader(cfg, workers: int, batches_per_worker: int) -> dict:
    """img/s of the trainer's loader with ``workers`` workers (0 = in the main process), warm-up excluded."""
    _, loader = build_data(cfg, 0)
    batch_size = cfg.train.batch_size_per_gpu
    lanes = max(1, workers)
    iterator = iter(loader)
    for _ in range(2 * lanes):
        next(iterator)
    timed = batches_per_worker * lanes
    start = time.perf_counter()
    for _ in range(timed):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator, loader
    img_per_s = timed * batch_size / seconds
    return {
        "workers": workers,
        "batch_size": batch_size,
        "timed_batches": timed,
        "img_per_s": img_per_s,
        "img_per_s_per_worker": img_per_s / lanes,
    }


# ------------------------------------------------------------------------------------------------- tensor path
def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * image + (1 - factor) * other).clamp(0, 1)


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def adjust_brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness of float images [N,3,H,W]; ``factor`` [N] (torchvision's formula)."""
    return _blend(image, torch.zeros_like(image), factor.view(-1, 1, 1, 1))


def adjust_contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(image).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, factor.view(-1, 1, 1, 1))


def adjust_saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(image, _grayscale(image), factor.view(-1, 1, 1, 1))


def adjust_hue(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample hue rotation by ``shift`` [N] in [−0.5, 0.5] (torchvision's HSV round trip)."""
    hsv = _rgb_to_hsv(image)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.cat([hue.unsqueeze(1), hsv[:, 1:]], dim=1))


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 9) -> torch.Tensor:
    """Per-sample separable Gaussian blur (reflect padding, torchvision's kernel) of [N,C,H,W] with σ [N]."""
    n, c, h, w = image.shape
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma.to(image.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    pad = kernel_size // 2
    flat = torch.nn.functional.pad(image.reshape(1, n * c, h, w), [pad, pad, pad, pad], mode="reflect")
    flat = torch.nn.functional.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = torch.nn.functional.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, h, w)


class BatchedMultiCrop:
    """The multi-crop augmentation of :class:`DataAugmentationDINO` with photometric ops run on crop batches.

    Geometry (bicubic antialiased RandomResizedCrop + horizontal flip) is done per crop, since source images differ
    in size; colour jitter (p 0.8), grayscale (p 0.2), blur (kernel 9, σ ∈ [0.1, 2], per crop kind probability
    as the quirk: 0.0 / 0.9 / 0.5), solarisation (second global crop, p 0.2) and normalisation run on the stacked
    [B,3,S,S] batch with per-sample random parameters. Inputs are uint8 [3,H,W] tensors; outputs as the collate's
    ``collated_global_crops`` [2B,3,G,G] and ``collated_local_crops`` [LB,3,s,s] (crop-major).
    """

    def __init__(self, global_scale, local_scale, n_local: int, global_size: int = 224, local_size: int = 98):
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.n_local, self.global_size, self.local_size = n_local, global_size, local_size

    @staticmethod
    def _crop(image: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
        top, left, h, w = v1.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
        bicubic = v2.InterpolationMode.BICUBIC
        crop = v2.functional.resized_crop(image, top, left, h, w, [size, size], interpolation=bicubic, antialias=True)
        return crop.flip(-1) if torch.rand(()) < 0.5 else crop

    @staticmethod
    def _photometric(crops: torch.Tensor, blur_p: float, solarize_p: float) -> torch.Tensor:
        n, device = crops.shape[0], crops.device

        def draw(low: float, high: float) -> torch.Tensor:
            return torch.empty(n, device=device).uniform_(low, high)

        def chance(p: float) -> torch.Tensor:
            return torch.rand(n, device=device) < p

        jitter = chance(0.8)
        identity = (1.0, 1.0, 1.0, 0.0)
        factors = [draw(0.6, 1.4), draw(0.6, 1.4), draw(0.8, 1.2), draw(-0.1, 0.1)]
        factors = [torch.where(jitter, f, torch.full_like(f, same)) for f, same in zip(factors, identity, strict=True)]
        for op_index in torch.randperm(4).tolist():
            crops = JITTER_OPS[op_index](crops, factors[op_index])
        crops = torch.where(chance(0.2).view(-1, 1, 1, 1), _grayscale(crops).expand_as(crops), crops)
        if blur_p > 0:
            blurred = gaussian_blur(crops, draw(0.1, 2.0))
            crops = torch.where(chance(blur_p).view(-1, 1, 1, 1), blurred, crops)
        if solarize_p > 0:
            solarized = torch.where(crops >= 128 / 255, 1 - crops, crops)
            crops = torch.where(chance(solarize_p).view(-1, 1, 1, 1), solarized, crops)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        return (crops - mean) / std

    def __call__(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        floats = [image.float().div_(255) for image in images]
        kinds = [(self.global_size, self.global_scale, 0.0, 0.0), (self.global_size, self.global_scale, 0.9, 0.2)]
        kinds += [(self.local_size, self.local_scale, 0.5, 0.0)] * self.n_local
        batches = []
        for size, scale, blur_p, solarize_p in kinds:
            crops = torch.stack([self._crop(image, size, scale) for image in floats]).clamp_(0, 1)
            batches.append(self._photometric(crops, blur_p, solarize_p))
        return {"collated_global_crops": torch.cat(batches[:2]), "collated_local_crops": torch.cat(batches[2:])}


def measure_tensor_path(paths: list[Path], cfg, device: torch.device, mode: str, batch_size: int, batches: int):
    """img/s of read + ``decode_jpeg`` on ``device`` + augmentation (``per_image`` or ``batched``) of JPEG batches."""
    crops = cfg.crops
    if mode == "per_image":
        augment = DataAugmentationDINO(
            crops.global_crops_scale,
            crops.local_crops_scale,
            crops.local_crops_number,
            global_crops_size=crops.global_crops_size,
            local_crops_size=crops.local_crops_size,
            blur_quirk=crops.blur_quirk,
        )

        def run(images):
            return [augment(image) for image in images]
    else:
        batched = BatchedMultiCrop(
            crops.global_crops_scale,
            crops.local_crops_scale,
            crops.local_crops_number,
            crops.global_crops_size,
            crops.local_crops_size,
        )

        def run(images):
            return batched(images)

    stream = itertools.cycle(paths)

    def one_batch():
        data = [tvio.read_file(str(next(stream))) for _ in range(batch_size)]
        run(tvio.decode_jpeg(data, device=device, mode=tvio.ImageReadMode.RGB))

    one_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        one_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    img_per_s = batches * batch_size / seconds
    return {"mode": mode, "device": str(device), "batch_size": batch_size, "batches": batches, "img_per_s": img_per_s}


# ---------------------------------------------------------------------------------------------------- report
def target_rates(train_step_json: str | None, defaults: dict[str, float]) -> dict[str, float]:
    rates = dict(defaults)
    if train_step_json:
        for run in json.loads(Path(train_step_json).read_text())["runs"]:
            if "img_per_s" in run:
                mode = "compiled" if run["compile"] else "eager"
                rates[f"{run['model']} batch {run['batch_size']} {mode} (measured)"] = run["img_per_s"]
    return rates


def per_core_rate(loader_runs: list[dict]) -> float:
    """img/s per core: that of the fewest workers ≥ 1 measured (more workers than cores would lower it)."""
    in_workers = [r for r in loader_runs if r["workers"] >= 1] or loader_runs
    return min(in_workers, key=lambda r: r["workers"])["img_per_s_per_worker"]


def cores_needed(rates: dict[str, float], img_per_s_per_core: float) -> dict[str, int]:
    return {name: math.ceil(rate / img_per_s_per_core) for name, rate in rates.items()}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "benchmarks/data_pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images-dir", default=None, help="folder of JPEGs (default OUT/jpegs with --make-jpegs)")
    p.add_argument("--make-jpegs", type=int, default=0, help="write this many JPEGs into --images-dir first")
    p.add_argument("--size", default="500x375", help="typical WIDTHxHEIGHT of the JPEGs made")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4], help="data-loader worker counts (0: inline)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches-per-worker", type=int, default=4, help="timed batches per worker")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="tensor path device (default: cuda)")
    p.add_argument("--tensor-modes", nargs="*", default=["batched", "per_image"], choices=("batched", "per_image"))
    p.add_argument("--tensor-batches", type=int, default=10, help="timed batches of the tensor path")
    p.add_argument("--config", default="configs/train/IN21K/vitb14.yaml", help="crop settings and masks come from it")
    p.add_argument("--target-rates", nargs="*", type=float, default=None, help="step rates (img/s) to feed")
    p.add_argument("--train-step-json", default=None, help="add the img/s of benchmarks/train_step.py runs as targets")
    p.add_argument("--out", default="results/perf")
    p.add_argument("--results-md", default=None, help="append the table as a dated section to this Markdown file")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    images_dir = Path(args.images_dir or Path(args.out) / "jpegs")
    if args.make_jpegs:
        width, height = (int(v) for v in args.size.lower().split("x"))
        print(f"writing {args.make_jpegs} JPEGs of about {width}x{height} to {images_dir}", flush=True)
        make_jpegs(images_dir, args.make_jpegs, (width, height))
    if not images_dir.is_dir():
        raise SystemExit(f"--images-dir {images_dir} does not exist; pass a folder of JPEGs or --make-jpegs N")
    paths = [images_dir / p for p in scan_image_files(images_dir)]
    wanted_device = "cuda" if args.device is None else args.device
    env = environment(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))

    loader_runs = []
    for workers in args.workers:
        cfg = pipeline_config(args.config, images_dir, args.batch_size, workers)
        run = measure_loader(cfg, workers, args.batches_per_worker)
        loader_runs.append(run)
        print(f"CPU loader, {workers} workers: {run['img_per_s']:.1f} img/s", flush=True)
    per_core = per_core_rate(loader_runs)

    tensor_runs = []
    if wanted_device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: the GPU decode + augmentation path is skipped", flush=True)
    else:
        device = resolve_device(wanted_device)
        cfg = pipeline_config(args.config, images_dir, args.batch_size, 0)
        for mode in args.tensor_modes:
            run = measure_tensor_path(paths, cfg, device, mode, args.batch_size, args.tensor_batches)
            tensor_runs.append(run)
            print(f"tensor path {mode} on {device}: {run['img_per_s']:.1f} img/s", flush=True)

    defaults = DEFAULT_TARGET_RATES if args.target_rates is None else {f"{r:g} img/s": r for r in args.target_rates}
    rates = target_rates(args.train_step_json, defaults)
    command = "python " + shlex.join(["benchmarks/data_pipeline.py", *(sys.argv[1:] if argv is None else argv)])
    payload = {
        "environment": env,
        "command": command,
        "images": {"dir": str(images_dir), "count": len(paths)},
        "crops": "2x224 + 8x98 (config crops.*)",
        "cpu_loader": loader_runs,
        "img_per_s_per_core": per_core,
        "tensor_path": tensor_runs,
        "target_rates": rates,
        "cores_needed": cores_needed(rates, per_core),
    }
    out_path = write_json_atomic(Path(args.out) / "data_pipeline.json", payload)
    table = pipeline_table(payload)
    print(f"\nresults in {out_path}\n\n{table}", flush=True)
    if args.results_md:
        append_results_section(args.results_md, "Data pipeline (benchmarks/data_pipeline.py)", env, command, table)
        print(f"appended to {args.results_md}", flush=True)
    return payload


def pipeline_table(payload: dict) -> str:
    rows = [
        [f"CPU loader, {r['workers']} workers", r["img_per_s"], r["img_per_s_per_worker"]]
        for r in payload["cpu_loader"]
    ]
    rows += [
        [f"decode + {r['mode']} augmentation on {r['device']}", r["img_per_s"], None] for r in payload["tensor_path"]
    ]
    table = markdown_table(["pipeline", "img/s", "img/s per core"], rows)
    needs = [[name, rate, payload["cores_needed"][name]] for name, rate in payload["target_rates"].items()]
    return table + "\n\n" + markdown_table(["step rate to feed", "img/s", "CPU cores needed"], needs)


if __name__ == "__main__":
    main()
