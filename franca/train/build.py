"""Builders of a training run: the model (placed and parallelised), the optimizer and the train step, the multi-crop
data with its masking collate, and the batch preparation on the device.

Used by the trainer (:mod:`franca.train.train`), ``benchmarks/train_step.py`` and the data benchmarks, so that every
part that runs the training step builds it the same way.
"""

import random
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from franca.data.augmentations import DataAugmentationDINO
from franca.data.batched_augmentations import SplitDataAugmentationDINO, apply_photometric_to_batch
from franca.data.collate import MaskingCollator
from franca.data.datasets import WebDatasetShards
from franca.data.image_decoding import training_decoding
from franca.data.loaders import make_dataset, make_train_data_loader
from franca.data.masking import build_mask_generator
from franca.data.streams import make_webdataset_train_loader
from franca.train.parallel import parallelize
from franca.train.param_groups import fuse_params_groups, get_params_groups
from franca.train.runtime import Runtime
from franca.train.schedules import build_schedules
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.step import TrainStep, build_grad_scaler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: DictConfig, model: SSLMetaArch, device: torch.device) -> torch.optim.Optimizer:
    groups = []
    for name, module in model.student.items():
        groups += get_params_groups(
            module,
            layerwise_decay=cfg.optim.layerwise_decay,
            patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
            is_backbone=name == "backbone",
        )
    betas = (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(fuse_params_groups(groups), betas=betas, **fast)


def build_transform(cfg: DictConfig, batched_photometric: bool):
    """The multi-crop transform of the loader workers: all of it per image, or its split worker half (original
    ``DataAugmentationDINO``; the photometric half then runs in :func:`prepare_batch`)."""
    augmentation = SplitDataAugmentationDINO if batched_photometric else DataAugmentationDINO
    return augmentation(
        cfg.crops.global_crops_scale,
        cfg.crops.local_crops_scale,
        cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size,
        local_crops_size=cfg.crops.local_crops_size,
        blur_quirk=cfg.crops.blur_quirk,
    )


def build_collator(cfg: DictConfig, rank: int = 0, world_size: int = 1) -> MaskingCollator:
    """The masking collate of the config: iBOT masks (block / inverse block / CyclicMask roll) for the global grid."""
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    return MaskingCollator(
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=build_mask_generator(
            (grid, grid), cfg.train.use_block_masking, cfg.train.use_inverse_block, cfg.train.roll
        ),
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
    )


def training_dataset(cfg: DictConfig, transform: Callable | None = None):
    """The dataset of ``train.dataset_path``, decoded as the run decodes its images; a missing folder or file is an
    error that names the config key."""
    try:
        return make_dataset(cfg.train.dataset_path, transform=transform, decoding=training_decoding(cfg))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"train.dataset_path={cfg.train.dataset_path!r}: {error}") from None


def build_data(
    cfg: DictConfig, start_iteration: int, rank: int = 0, world_size: int = 1, batched_photometric: bool = False
):
    """The dataset and the training loader (map-style or shards) with the multi-crop transform and masking collate;
    ``batched_photometric`` gives the split transform, whose batches :func:`prepare_batch` finishes."""
    transform = build_transform(cfg, batched_photometric)
    dataset = training_dataset(cfg)
    collate = build_collator(cfg, rank, world_size)
    make_loader = make_webdataset_train_loader if isinstance(dataset, WebDatasetShards) else make_train_data_loader
    loader = make_loader(
        dataset,
        transform,
        collate,
        batch_size_per_rank=cfg.train.batch_size_per_gpu,
        seed=cfg.train.seed,
        start_iteration=start_iteration,
        num_workers=cfg.train.num_workers,
        rank=rank,
        world_size=world_size,
    )
    return dataset, loader


def describe_dataset_size(dataset) -> str:
    size = dataset.num_samples if isinstance(dataset, WebDatasetShards) else len(dataset)
    return "a stream of unknown length" if size is None else f"{size} images"


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def prepare_batch(batch: dict, runtime: Runtime) -> dict:
    """A loader batch on the runtime's device, ready for the step: with ``runtime.batched_photometric`` its uint8 crops
    get their drawn colour jitter, grayscale, blur, solarisation and normalisation there (the parameters stay on the
    CPU, which picks the rows without a device sync); float tensors in ``runtime.param_dtype`` (float64 for fp64)."""
    batch = move_batch(batch, runtime.device)
    if runtime.batched_photometric:
        batch = apply_photometric_to_batch(batch)
    if runtime.param_dtype == torch.float32:
        return batch
    dtype = runtime.param_dtype
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def build_model(
    cfg: DictConfig,
    runtime: Runtime,
    world_size: int = 1,
    local_world_size: int | None = None,
    initialise: Callable[[SSLMetaArch], None] | None = None,
    meta_arch: Callable[[DictConfig], SSLMetaArch] = SSLMetaArch,
) -> SSLMetaArch:
    """The meta-architecture (``meta_arch(cfg)``: Franca's :class:`SSLMetaArch` unless given), initialised alike on
    every rank (same seed; then ``initialise``, e.g. pretrained weights), in ``runtime.param_dtype`` on the device,
    parallelised, in training mode."""
    seed_everything(cfg.train.seed)
    model = meta_arch(cfg)
    if initialise is not None:
        initialise(model)
    model.to(runtime.device, dtype=runtime.param_dtype)
    parallelize(model, cfg, runtime, world_size, local_world_size)
    model.train()
    return model


def build_train_step(cfg: DictConfig, model: SSLMetaArch, runtime: Runtime) -> TrainStep:
    """The run's :class:`TrainStep`: AdamW over the student's parameter groups, the schedules, the fp16 grad scaler
    (when used) and ``optim.clip_grad``."""
    optimizer = build_optimizer(cfg, model, runtime.device)
    scaler = build_grad_scaler(cfg, runtime)
    freeze = cfg.train.freeze_backbone_iterations
    return TrainStep(model, optimizer, build_schedules(cfg), runtime, cfg.optim.clip_grad, scaler, freeze)
