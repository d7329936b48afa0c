"""Per-sample seeding of augmentations, so crops depend on (seed, pass, index) only (design.md: same data on resume).

torchvision's v2 transforms draw from torch's global RNG and accept no generator, so each sample is transformed
inside a context that seeds torch's (and Python's and NumPy's) global RNGs from (seed, pass, index) and restores
their previous states afterwards: the caller's RNG streams are untouched, in the main process or in a worker.
"""

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from franca.data.samplers import SampleKey


@contextmanager
def seeded_global_rngs(entropy: Sequence[int]) -> Iterator[None]:
    """Seeds torch's CPU RNG, ``random`` and NumPy's global RNG from ``entropy``; restores all three on exit."""
    words = np.random.SeedSequence(list(entropy)).generate_state(3, dtype=np.uint32)
    seed_64 = (int(words[0]) << 32) | int(words[1])
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_64)
        random.seed(seed_64)
        np.random.seed(int(words[2]))
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededTransformDataset(Dataset):
    """Wraps a map dataset for the training loader: ``dataset[key]`` with a :class:`SampleKey`.

    Returns ``(transform(image), target, key)``; reading and transforming run under RNGs seeded by
    (seed, key.pass_index, key.index), so a sample's crops are the same in any worker and after a resume.
    """

    def __init__(self, dataset: Dataset, transform: Callable | None, seed: int):
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[Any, Any, SampleKey]:
        with seeded_global_rngs([self.seed, key.pass_index, key.index]):
            image, target = self.dataset[key.index]
            if self.transform is not None:
                image = self.transform(image)
        return image, target, key
