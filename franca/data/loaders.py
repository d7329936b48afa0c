"""Dataset strings (as valeoai/Franca ``franca/data/loaders.py``) and the training / evaluation data loaders.

A dataset string is ``Name:key=value:key=value...``; a duplicate key keeps its last value (the original's IN21K configs
contain ``root=TRAIN:root=<path>``). A part that is not ``identifier=...`` continues the previous value, so values may
contain ``:`` (URLs, Windows drives). Names and their keys come from :mod:`franca.data.datasets.registry`.
"""

import re
import signal
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from franca.data.datasets.registry import get_dataset_spec, registered_dataset_names
from franca.data.image_decoding import ImageDecoding
from franca.data.samplers import InfiniteSampleKeySampler
from franca.data.seeded_transform import SeededTransformDataset

_KEY_VALUE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


def parse_dataset_string(dataset_str: str) -> tuple[str, dict[str, str]]:
    """``"Name:k1=v1:k2=v2"`` → ``("Name", {"k1": "v1", "k2": "v2"})`` (syntax only; names and keys not checked)."""
    name, *parts = dataset_str.split(":")
    if not name.strip():
        raise ValueError(f"dataset string {dataset_str!r} has no dataset name; expected e.g. 'ImageFolder:root=/data'")
    options: dict[str, str] = {}
    last_key = None
    for part in parts:
        match = _KEY_VALUE.fullmatch(part)
        if match:
            last_key = match[1]
            options[last_key] = match[2]
        elif last_key is not None:
            options[last_key] += ":" + part
        else:
            raise ValueError(f"part {part!r} of dataset string {dataset_str!r} is not key=value")
    return name.strip(), options


def make_dataset(
    dataset_str: str,
    transform: Callable | None = None,
    target_transform: Callable | None = None,
    decoding: ImageDecoding | None = None,
) -> Dataset:
    """Builds the dataset named by ``dataset_str``, e.g. ``ImageNet:split=TRAIN:root=/data/imagenet``.

    ``decoding`` (transparency background, high-bit-depth scaling; default white, per-image range) becomes the
    dataset's ``image_decoding`` attribute, so loader workers receive it with the dataset.
    """
    name, options = parse_dataset_string(dataset_str)
    if name not in registered_dataset_names():
        raise ValueError(
            f"unknown dataset {name!r} in dataset string {dataset_str!r}; valid names: "
            f"{', '.join(registered_dataset_names())}"
        )
    spec = get_dataset_spec(name)
    unknown = sorted(set(options) - set(spec.keys))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)} for dataset {name} in {dataset_str!r}; valid keys: "
            f"{', '.join(spec.keys)}"
        )
    missing = [key for key in spec.required_keys if key not in options]
    if missing:
        raise ValueError(
            f"dataset string {dataset_str!r} lacks {', '.join(f'{key}=...' for key in missing)}; {name} needs "
            f"{', '.join(spec.required_keys)}"
        )
    empty = [key for key, value in options.items() if not value]
    if empty:
        raise ValueError(f"key(s) {', '.join(empty)} in dataset string {dataset_str!r} have an empty value")
    dataset = spec.factory(transform=transform, target_transform=target_transform, **options)
    if decoding is not None:
        dataset.image_decoding = decoding
    return dataset


def make_train_data_loader(
    dataset: Dataset,
    transform: Callable | None,
    collate: Callable[[list[Any]], Any],
    batch_size_per_rank: int,
    seed: int,
    start_iteration: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
) -> DataLoader:
    """An infinite loader whose k-th batch is iteration ``start_iteration + k`` of the run (see :mod:`samplers`).

    Samples are ``(transform(image), target, SampleKey)`` with augmentations seeded by (seed, pass, index); give a
    :class:`franca.data.collate.MaskingCollator` as ``collate`` to seed the masks by (seed, iteration). Workers
    are persistent; memory is pinned when CUDA is available (unless ``pin_memory`` says otherwise). The loader draws
    nothing from the caller's global RNGs.
    """
    sampler = InfiniteSampleKeySampler(
        len(dataset), batch_size_per_rank, seed=seed, start_iteration=start_iteration, rank=rank, world_size=world_size
    )
    return train_worker_loader(
        SeededTransformDataset(dataset, transform, seed),
        batch_size_per_rank,
        collate,
        num_workers,
        pin_memory,
        prefetch_factor,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
    )


def train_worker_loader(
    dataset: Dataset,
    batch_size: int,
    collate: Callable[[list[Any]], Any],
    num_workers: int,
    pin_memory: bool | None,
    prefetch_factor: int,
    **sampling: Any,
) -> DataLoader:
    """The DataLoader settings both training loaders (map-style and shards) share, kept in one place: persistent
    workers that ignore stop signals, memory pinned when CUDA is available. ``sampling`` passes the loader's own
    ``sampler`` and ``generator``, if any."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
        **sampling,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1 (sent to the whole process group on preemption) and SIGINT (Ctrl-C reaches the
    whole foreground group) so that the main process can finish its iteration and write a checkpoint before the loader
    shuts them down."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def make_eval_data_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool | None = None
) -> DataLoader:
    """A single ordered pass over ``dataset`` in batches (the last one may be smaller), for feature extraction."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=torch.Generator().manual_seed(0),
    )
