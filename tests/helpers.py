"""Shared test helpers: the tiny model and run configs, a hand-built collated batch, a free TCP port, and gradient
comparisons. Tests import these from here, never from another test module."""

import socket
from functools import cache

import torch

# Heads of 32 prototypes with a 16-wide bottleneck: small enough for every CPU test.
TINY_HEADS = [
    "dino.head_n_prototypes=32",
    "dino.head_bottleneck_dim=16",
    "dino.head_hidden_dim=32",
    "ibot.head_n_prototypes=32",
    "ibot.head_bottleneck_dim=16",
    "ibot.head_hidden_dim=32",
]
# The tiny Franca model: a 2-block ViT of width 32 on 16-pixel global crops (4×4 patches), small heads.
TINY_MODEL = [
    "student.arch=vit_tiny",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=4",
    "crops.global_crops_size=16",
    *TINY_HEADS,
]
# The tiny model for single-step comparisons on :func:`make_batch`: deterministic (no stochastic depth, no KoLeo)
# with two 8-pixel local crops.
TINY_STEP = [
    *TINY_MODEL,
    "student.drop_path_rate=0.0",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.koleo_loss_weight=0.0",
]
# A tiny Franca run on the shipped Fashion-MNIST subset: 3 iterations an epoch, checkpoints every epoch.
TINY_RUN = """
dino: {head_n_prototypes: 64, head_bottleneck_dim: 16, head_hidden_dim: 32, mrl_l2_norm: true}
ibot: {separate_head: true, head_n_prototypes: 64, head_bottleneck_dim: 16, head_hidden_dim: 32}
train: {batch_size_per_gpu: 8, dataset_path: "FashionMNIST:root=bundled:split=train", OFFICIAL_EPOCH_LENGTH: 3,
        num_workers: 0, log_period: 1, seed: 3}
student: {arch: vit_tiny, embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4, drop_path_rate: 0.1,
          ffn_layer: swiglufused, block_chunks: 2}
teacher: {momentum_teacher: 0.9, warmup_teacher_temp_epochs: 1}
optim: {epochs: 3, warmup_epochs: 1, base_lr: 0.01, freeze_last_layer_epochs: 1}
crops: {global_crops_size: 16, local_crops_size: 8, local_crops_number: 2}
evaluation: {eval_period_iterations: 6}
"""
# The quickstart recipe (configs/train/quickstart.yaml) scaled down: a 64-wide, 2-deep ViT on 16 px global and 8 px
# local crops of the shipped 4,000-image subset, batch 32, 320 iterations (about 25 s on two cores); fp32, plain
# losses and no compile on any device.
LEARNING = """
dino: {head_n_prototypes: 128, head_bottleneck_dim: 32, head_hidden_dim: 128, mrl_l2_norm: true}
ibot: {separate_head: true, head_n_prototypes: 128, head_bottleneck_dim: 32, head_hidden_dim: 128}
train: {batch_size_per_gpu: 32, dataset_path: "FashionMNIST:root=bundled:split=train", OFFICIAL_EPOCH_LENGTH: 40,
        num_workers: 0, log_period: 20, seed: 0}
student: {arch: vit_tiny, embed_dim: 64, depth: 2, num_heads: 2, patch_size: 4, drop_path_rate: 0.0,
          ffn_layer: swiglufused, layerscale: 0.1}
teacher: {momentum_teacher: 0.9, final_momentum_teacher: 0.99, warmup_teacher_temp: 0.01, teacher_temp: 0.01,
          warmup_teacher_temp_epochs: 1}
optim: {epochs: 8, warmup_epochs: 1, base_lr: 0.004, weight_decay_end: 0.2, layerwise_decay: 1.0,
        freeze_last_layer_epochs: 0}
crops: {global_crops_size: 16, local_crops_size: 8, local_crops_number: 2, batched_photometric: "true"}
evaluation: {eval_period_iterations: 0}
compute_precision: {dtype: fp32, compile: "false", chunked_losses: "false"}
"""
# Extra settings of the meta-architecture comparisons; mrl_l2_norm: the original head's initial logits are ~1e-4,
# near-uniform, with gradients of ~1e-10 that are rounding.
MODEL_OVERRIDES = ["dino.mrl_l2_norm=true", "dino.koleo_loss_weight=0.1", "compute_precision.loss_chunk_size=3"]
IMAGES, GRID = 4, 4  # samples in the full batch of make_batch; 4x4 patches per global crop


def make_batch(generator: torch.Generator) -> dict:
    """A collated batch built here (crop-major rows) with fixed masks: images 0 and 5 of 2·IMAGES global crops."""
    n_tokens = GRID * GRID
    masks = torch.zeros(2 * IMAGES, n_tokens, dtype=torch.bool)
    masks[0, :5] = True
    masks[5, 3:12] = True
    return {
        "collated_global_crops": torch.randn(2 * IMAGES, 3, 16, 16, generator=generator),
        "collated_local_crops": torch.randn(2 * IMAGES, 3, 8, 8, generator=generator),
        "collated_masks": masks,
    }


def with_mask_lists(batch: dict) -> dict:
    """``batch`` with the collate's ``mask_indices_list`` and ``masks_weight`` computed from its masks."""
    masks = batch["collated_masks"]
    per_image = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
    return {
        **batch,
        "mask_indices_list": masks.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / per_image).expand_as(masks)[masks],
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ in fp32."""
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def student_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of an ``SSLMetaArch``'s student parameters, by name."""
    return {name: p.grad for name, p in model.student.named_parameters() if p.grad is not None}


def step_losses(model, batch: dict, teacher_temp: float, chunk_size: int | None = None) -> dict:
    """The loss terms of one step on ``batch`` (the phases of ``forward_backward``, without its backward)."""
    teacher = model.teacher_targets([model.teacher_backbone(batch)], [batch], teacher_temp, chunk_size)[0]
    return model.student_losses(batch, teacher, chunk_size)


@cache
def bundled_knn_sets(size: int = 16):
    """(bank, test) of the shipped Fashion-MNIST subset at ``size`` px: the first 2,000 training images and the 1,000
    test images, as the learning tests classify them."""
    from torch.utils.data import Subset

    from franca.data.augmentations import make_classification_eval_transform
    from franca.data.loaders import make_dataset

    transform = make_classification_eval_transform(resize_size=size, crop_size=size)
    bank = make_dataset("FashionMNIST:root=bundled:split=train", transform=transform)
    return Subset(bank, range(2000)), make_dataset("FashionMNIST:root=bundled:split=test", transform=transform)


def cls_knn(model: torch.nn.Module, bank, test) -> float:
    """CLS k-NN top-1 (k = 20, T = 0.07) of ``model`` with ``bank`` as the labelled set and ``test`` classified."""
    from franca.utils.features import extract_features
    from franca.utils.knn import knn_accuracies

    train = extract_features(model, bank, batch_size=500)
    test = extract_features(model, test, batch_size=500)
    return knn_accuracies(*train, *test, ks=(20,))["20"]["top1"]
