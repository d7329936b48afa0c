"""Throughput of Franca's multi-crop data pipeline on JPEG folders: CPU workers, and decode + augment on a GPU.

One "img" is one decoded image turned into 2×224² + 8×98² crops (the IN21K recipes, ``configs/train/IN21K/``).

- ``--make-jpegs N``: writes N JPEGs (quality 90) of typical ImageNet sizes into ``--images-dir`` (default
  ``OUT/jpegs``): random crops of scikit-image's bundled real photos, resized to about ``--size`` (each side × U(0.8,
  1.2), one in four portrait) and randomly flipped.
- CPU paths (``--cpu-paths``): the trainer's own loader (``franca.train.train.build_data``: ImageFolder → PIL decode
  → transform → ``MaskingCollator``) with each ``--workers`` count; ``per_sample``: the transform is
  ``DataAugmentationDINO`` (the whole augmentation in the workers, ``crops.batched_photometric=false``); ``split``:
  ``SplitDataAugmentationDINO`` (crops, flips and the photometric parameter draws only: what stays on the CPU with
  ``crops.batched_photometric=true``, whose photometric ops run on the training device and are not timed here).
  img/s measured after the warm-up (2 batches per worker, so the startup and the first prefetched batches are
  excluded). One worker ≈ one core (DataLoader workers run torch with one thread), so img/s per worker is img/s per
  CPU core.
- Tensor path (``--device cuda``; skipped with a message where there is no GPU): file bytes →
  ``torchvision.io.decode_jpeg(device=...)`` on the batch, then either
  ``per_image``: the library's ``DataAugmentationDINO`` itself applied to each decoded uint8 tensor on the device, or
  ``batched``: the library's split path on the device: ``SplitDataAugmentationDINO`` per decoded image (crops,
  flips, parameter draws), then ``apply_photometric`` on the stacked [B,3,S,S] crop batches (colour jitter in each
  crop's own order, grayscale, blur, solarisation, normalisation: franca.data.batched_augmentations).
- Cores needed to feed a training step rate R img/s, per CPU path: ceil(R / img/s per core); the rates are
  ``--target-rates`` (default the DINOv2-style ViT-B/14 and ViT-L/14 step rates, 335 and 156 img/s) and every run of
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

from franca.data.batched_augmentations import apply_photometric
from franca.data.collate import stack_crop_major
from franca.data.datasets.folder_scan import scan_image_files
from franca.train.build import build_data, build_transform
from franca.train.config import load_config

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
CPU_PATHS = {
    "per_sample": "per-sample (whole augmentation)",
    "split": "split (decode + crops + parameter draws)",
}
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


def measure_loader(cfg, workers: int, batches_per_worker: int, path: str = "per_sample") -> dict:
    """img/s of the trainer's loader on the CPU ``path`` with ``workers`` workers (0 = in the main process), warm-up
    excluded: ``per_sample`` does the whole augmentation, ``split`` what stays on the CPU with
    ``crops.batched_photometric`` (decode, crops, flips, parameter draws, masks)."""
    _, loader = build_data(cfg, 0, batched_photometric=path == "split")
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
        "path": path,
        "workers": workers,
        "batch_size": batch_size,
        "timed_batches": timed,
        "img_per_s": img_per_s,
        "img_per_s_per_worker": img_per_s / lanes,
    }


# ------------------------------------------------------------------------------------------------- tensor path
def measure_tensor_path(paths: list[Path], cfg, device: torch.device, mode: str, batch_size: int, batches: int):
    """img/s of read + ``decode_jpeg`` on ``device`` + augmentation (``per_image`` or ``batched``) of JPEG batches."""
    if mode == "per_image":
        augment = build_transform(cfg, batched_photometric=False)

        def run(images):
            return [augment(image) for image in images]
    else:
        split = build_transform(cfg, batched_photometric=True)

        def run(images):
            samples = [(split(image),) for image in images]
            return [
                apply_photometric(
                    stack_crop_major(samples, f"{kind}_crops"), stack_crop_major(samples, f"{kind}_params")
                )
                for kind in ("global", "local")
            ]

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


def per_core_rates(loader_runs: list[dict]) -> dict[str, float]:
    """:func:`per_core_rate` of each CPU path measured."""
    paths = dict.fromkeys(r["path"] for r in loader_runs)
    return {path: per_core_rate([r for r in loader_runs if r["path"] == path]) for path in paths}


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
    p.add_argument(
        "--cpu-paths",
        nargs="+",
        default=list(CPU_PATHS),
        choices=CPU_PATHS,
        help="loader paths: per_sample (whole augmentation in the workers), split (photometric ops left to the device)",
    )
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
    for path, workers in itertools.product(args.cpu_paths, args.workers):
        cfg = pipeline_config(args.config, images_dir, args.batch_size, workers)
        run = measure_loader(cfg, workers, args.batches_per_worker, path)
        loader_runs.append(run)
        print(f"CPU loader, {path}, {workers} workers: {run['img_per_s']:.1f} img/s", flush=True)
    per_core = per_core_rates(loader_runs)

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
        "cores_needed": {path: cores_needed(rates, rate) for path, rate in per_core.items()},
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
        [f"CPU loader, {CPU_PATHS[r['path']]}, {r['workers']} workers", r["img_per_s"], r["img_per_s_per_worker"]]
        for r in payload["cpu_loader"]
    ]
    rows += [
        [f"decode + {r['mode']} augmentation on {r['device']}", r["img_per_s"], None] for r in payload["tensor_path"]
    ]
    table = markdown_table(["pipeline", "img/s", "img/s per core"], rows)
    paths = list(payload["cores_needed"])
    needs = [
        [name, rate, *(payload["cores_needed"][path][name] for path in paths)]
        for name, rate in payload["target_rates"].items()
    ]
    header = ["step rate to feed", "img/s", *(f"CPU cores needed, {path}" for path in paths)]
    return table + "\n\n" + markdown_table(header, needs)


if __name__ == "__main__":
    main()
