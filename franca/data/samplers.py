"""Deterministic, resumable sample order for training (replaces the original's ShardedInfiniteSampler,
valeoai/Franca ``franca/data/samplers.py``).

The run reads an infinite stream: pass ``p`` is a permutation of the dataset seeded by (seed, p), and the passes are
concatenated (a pass boundary may fall inside a batch). Iteration ``i`` consumes stream positions
[i·G, (i+1)·G) with G = batch_size_per_rank · world_size, and rank ``r`` takes positions
[i·G + r·B, i·G + (r+1)·B). Each position yields a :class:`SampleKey`, whose (index, pass) seed the sample's
augmentations and whose iteration seeds the batch's masks. Hence a run started at ``start_iteration=k`` sees exactly
the batches an uninterrupted run sees from k on, whatever the number of workers, and the global batches depend on
the global batch size only, not on how it is split over ranks.
"""

from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler


class SampleKey(NamedTuple):
    """One position of the training stream: the dataset ``index``, its ``pass_index`` and the ``iteration``."""

    index: int
    pass_index: int
    iteration: int


def pass_permutation(dataset_size: int, seed: int, pass_index: int) -> torch.Tensor:
    """The order of the dataset in pass ``pass_index``: a permutation seeded by (seed, pass_index) only."""
    pass_seed = int(np.random.SeedSequence([seed, pass_index]).generate_state(1, dtype=np.uint64)[0])
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(pass_seed))


def check_stream_settings(batch_size_per_rank: int, seed: int, start_iteration: int, rank: int, world_size: int):
    """The settings every training stream (map-style sampler or shard stream) shares, checked once."""
    if batch_size_per_rank < 1:
        raise ValueError(f"batch_size_per_rank={batch_size_per_rank} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if seed < 0 or start_iteration < 0:
        raise ValueError(f"seed={seed} and start_iteration={start_iteration} must be >= 0")


class InfiniteSampleKeySampler(Sampler[SampleKey]):
    """Yields rank ``rank``'s sample keys, ``batch_size_per_rank`` per iteration, from ``start_iteration`` on."""

    def __init__(
        self,
        dataset_size: int,
        batch_size_per_rank: int,
        seed: int = 0,
        start_iteration: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if dataset_size < 1:
            raise ValueError(f"dataset_size={dataset_size}: the training dataset is empty")
        check_stream_settings(batch_size_per_rank, seed, start_iteration, rank, world_size)
        self.dataset_size = dataset_size
        self.batch_size_per_rank = batch_size_per_rank
        self.seed = seed
        self.start_iteration = start_iteration
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[SampleKey]:
        cached_pass, permutation = -1, None
        iteration = self.start_iteration
        while True:
            first = (iteration * self.world_size + self.rank) * self.batch_size_per_rank
            for position in range(first, first + self.batch_size_per_rank):
                pass_index, offset = divmod(position, self.dataset_size)
                if pass_index != cached_pass:
                    cached_pass, permutation = pass_index, pass_permutation(self.dataset_size, self.seed, pass_index)
                yield SampleKey(int(permutation[offset]), pass_index, iteration)
            iteration += 1
