"""Periodic k-NN of the teacher during training: the ``evaluation.knn_*`` keys.

When ``evaluation.knn_train_dataset`` and ``evaluation.knn_val_dataset`` are both set, the trainer calls
:meth:`KnnMonitor.evaluate` on the teacher at initialisation (the run's floor, logged as iteration −1), every
``evaluation.eval_period_iterations`` iterations and at the end of training. It
extracts the teacher backbone's CLS feature of every image of both datasets (shorter side resized to
``crops.global_crops_size``, centre-cropped to it and normalised as the evaluation commands do), in eval mode, without
gradients, under the trainer's autocast, then classifies the validation images by DINO's temperature-weighted vote
(:func:`franca.utils.knn.knn_accuracies`, on L2-normalised features) for each k of ``evaluation.knn_k``. The top-1
accuracies go into the training metrics as ``knn_top1_k<k>`` (percent).

With several processes each rank extracts a strided share of each dataset with its own part of the live teacher: under
FSDP every forward gathers the sharded parameters collectively, so the shares are padded to the same length (every rank
runs the same number of forwards) and no copy of the full teacher is made. The shares are then all-gathered, padding
dropped, and every rank votes on the full features, so all ranks return the same numbers.
"""

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, IterableDataset, Subset

from franca.data.augmentations import make_classification_eval_transform
from franca.data.image_decoding import training_decoding
from franca.data.loaders import make_dataset
from franca.distributed import is_distributed
from franca.utils.features import extract_features
from franca.utils.knn import knn_accuracies


def shard_indices(size: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Rank ``rank``'s strided share of ``range(size)``, padded with index 0 to ``ceil(size / world_size)`` entries so
    that every rank runs as many forwards, and the number of real (unpadded) entries."""
    own = list(range(rank, size, world_size))
    length = -(-size // world_size)
    return own + [0] * (length - len(own)), len(own)


def gather_shards(rows: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` real rows of every rank's padded share (:func:`shard_indices`), concatenated in rank order."""
    if not is_distributed():
        return rows[:size]
    world_size = dist.get_world_size()
    parts = [torch.empty_like(rows) for _ in range(world_size)]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat([part[: shard_indices(size, rank, world_size)[1]] for rank, part in enumerate(parts)])


@dataclass
class KnnMonitor:
    """The k-NN of one run: its two labelled datasets (under the evaluation transform) and the vote's settings."""

    train_set: Dataset
    val_set: Dataset
    ks: tuple[int, ...]
    temperature: float
    period: int
    batch_size: int
    num_workers: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    image_size: int | None = None
    _explained: bool = field(default=False, init=False, repr=False)

    def due(self, done: int, max_iter: int) -> bool:
        """Whether the k-NN runs after ``done`` iterations: every ``period`` iterations (0: never) and at the end."""
        return done == max_iter or (self.period > 0 and done % self.period == 0)

    def features(self, backbone: nn.Module, dataset: Dataset, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS features [N, D] and labels [N] of every image of ``dataset``, on the training device."""
        indices, _ = shard_indices(len(dataset), self.rank, self.world_size)
        feats, labels = extract_features(
            backbone,
            Subset(dataset, indices),
            self.batch_size,
            self.num_workers,
            self.device,
            name=name,
            autocast_dtype=self.autocast_dtype,
        )
        size = len(dataset)
        return gather_shards(feats.to(self.device), size), gather_shards(labels.to(self.device), size)

    def evaluate(self, backbone: nn.Module) -> dict[str, float]:
        """``{"knn_top1_k<k>": top-1 accuracy in %}`` of the teacher ``backbone`` (its mode is left as it was)."""
        train, train_labels = self.features(backbone, self.train_set, "k-NN train")
        val, val_labels = self.features(backbone, self.val_set, "k-NN val")
        for key, labels in (("knn_train_dataset", train_labels), ("knn_val_dataset", val_labels)):
            require_labels(labels, key)
        accuracies = knn_accuracies(train, train_labels, val, val_labels, self.ks, self.temperature, self.device)
        return {f"knn_top1_k{k}": accuracies[f"{k}"]["top1"] for k in self.ks}

    def run(self, backbone: nn.Module, done: int, max_iter: int, main_process: bool) -> dict[str, float]:
        """:meth:`evaluate`, with a line on the main process's console giving the progress and the accuracies."""
        start = time.perf_counter()
        results = self.evaluate(backbone)
        if main_process:
            accuracies = " ".join(f"k={k} {results[f'knn_top1_k{k}']:.2f}%" for k in self.ks)
            print(
                f"k-NN [{done}/{max_iter}] teacher CLS, {len(self.train_set)} train / {len(self.val_set)} val images "
                f"({time.perf_counter() - start:.0f} s): top-1 {accuracies}",
                flush=True,
            )
            if not self._explained and self.image_size is not None:
                print(resize_note(self.image_size), flush=True)
        self._explained = True
        return results


def resize_note(size: int) -> str:
    """Why ``python -m franca.eval.knn`` on an export of this run gives a slightly different number."""
    return (
        f"k-NN note: images are resized to {size} and centre-cropped to {size} (the global-crop size); "
        f"python -m franca.eval.knn resizes the shorter side to {round(size * 256 / 224)} (x 256/224) first, so its "
        f"numbers for the same teacher differ a little; give it --resize-size {size} to get these"
    )


def require_labels(labels: torch.Tensor, key: str) -> None:
    if (labels < 0).any():
        raise ValueError(
            f"evaluation.{key} has {int((labels < 0).sum())} unlabelled images (target -1); the k-NN needs labels, "
            "e.g. an ImageFolder with one sub-folder per class"
        )


def load_knn_dataset(cfg: DictConfig, key: str) -> Dataset:
    """The map-style dataset of ``evaluation.<key>`` under the evaluation transform at the global-crop size, its
    images decoded as the training images are (``train.alpha_background``, ``train.image_max_value``)."""
    dataset_str = cfg.evaluation[key]
    size = cfg.crops.global_crops_size
    decoding = training_decoding(cfg)
    try:
        transform = make_classification_eval_transform(size, size)
        dataset = make_dataset(dataset_str, transform=transform, decoding=decoding)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"evaluation.{key}={dataset_str!r}: {err}") from err
    except ValueError as err:
        raise ValueError(f"evaluation.{key}={dataset_str!r}: {err}") from err
    if isinstance(dataset, IterableDataset) or len(dataset) == 0:
        raise ValueError(
            f"evaluation.{key}={dataset_str!r} is a stream or empty; the k-NN needs a labelled dataset of known size, "
            "e.g. ImageFolder:root=R or ImageNet:split=VAL:root=R:extra=E"
        )
    return dataset


def build_knn_monitor(
    cfg: DictConfig, device: torch.device, autocast_dtype: torch.dtype | None, rank: int = 0, world_size: int = 1
) -> KnnMonitor | None:
    """The run's k-NN, or None when ``evaluation.knn_train_dataset`` is '' (the config makes both datasets set or
    both empty). The datasets are opened here, so a wrong path fails before training starts."""
    evaluation = cfg.evaluation
    if not evaluation.knn_train_dataset:
        return None
    return KnnMonitor(
        train_set=load_knn_dataset(cfg, "knn_train_dataset"),
        val_set=load_knn_dataset(cfg, "knn_val_dataset"),
        ks=tuple(evaluation.knn_k),
        temperature=evaluation.knn_temperature,
        period=evaluation.eval_period_iterations,
        batch_size=cfg.train.batch_size_per_gpu,
        num_workers=cfg.train.num_workers,
        device=device,
        autocast_dtype=autocast_dtype,
        rank=rank,
        world_size=world_size,
        image_size=cfg.crops.global_crops_size,
    )
