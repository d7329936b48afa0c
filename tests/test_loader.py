"""The training stream: pass permutations, rank slicing, resume and worker-count invariance, RNG isolation."""

import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from franca.data import (
    DataAugmentationDINO,
    MaskingCollator,
    SampleKey,
    make_eval_data_loader,
    make_train_data_loader,
)
from franca.data.masking import CyclicMask
from franca.data.samplers import InfiniteSampleKeySampler
from franca.data.seeded_transform import SeededTransformDataset


class NoiseImages(Dataset):
    """Image i: fixed random 20x24 RGB noise; target i."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        pixels = np.random.default_rng(index).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        return Image.fromarray(pixels), index


def take_keys(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def test_stream_is_a_concatenation_of_seeded_pass_permutations():
    n, batch = 7, 3
    keys = take_keys(InfiniteSampleKeySampler(n, batch, seed=1), 6 * batch)
    for position, key in enumerate(keys):
        assert key.pass_index == position // n and key.iteration == position // batch
    for pass_index in range(2):
        assert sorted(key.index for key in keys if key.pass_index == pass_index) == list(range(n))
    passes = [[key.index for key in keys if key.pass_index == p] for p in range(2)]
    assert passes[0] != passes[1]
    other_seed = take_keys(InfiniteSampleKeySampler(n, batch, seed=2), 6 * batch)
    assert [key.index for key in other_seed] != [key.index for key in keys]


def test_resume_and_world_size_give_the_same_global_stream():
    n = 11
    reference = take_keys(InfiniteSampleKeySampler(n, 6, seed=4), 6 * 10)
    resumed = take_keys(InfiniteSampleKeySampler(n, 6, seed=4, start_iteration=4), 6 * 6)
    assert resumed == reference[6 * 4 :]
    ranks = [iter(InfiniteSampleKeySampler(n, 3, seed=4, rank=r, world_size=2)) for r in range(2)]
    two_ranks = []
    for _ in range(10):
        for rank_iterator in ranks:
            two_ranks += list(itertools.islice(rank_iterator, 3))
    assert two_ranks == reference


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="rank=2"):
        InfiniteSampleKeySampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        InfiniteSampleKeySampler(0, 2)


def test_seeded_dataset_crops_depend_on_seed_pass_and_index_only():
    augmentation = DataAugmentationDINO((0.3, 1.0), (0.1, 0.3), 2, global_crops_size=16, local_crops_size=8)
    dataset = SeededTransformDataset(NoiseImages(5), augmentation, seed=3)
    first = dataset[SampleKey(2, 0, 0)][0]["global_crops"][0]
    assert torch.equal(first, dataset[SampleKey(2, 0, 9)][0]["global_crops"][0])
    assert not torch.equal(first, dataset[SampleKey(3, 0, 0)][0]["global_crops"][0])
    assert not torch.equal(first, dataset[SampleKey(2, 1, 0)][0]["global_crops"][0])
    other_seed = SeededTransformDataset(NoiseImages(5), augmentation, seed=4)
    assert not torch.equal(first, other_seed[SampleKey(2, 0, 0)][0]["global_crops"][0])


def make_loader(start_iteration=0, num_workers=0, seed=5):
    augmentation = DataAugmentationDINO((0.3, 1.0), (0.1, 0.3), 2, global_crops_size=16, local_crops_size=8)
    collate = MaskingCollator(CyclicMask((2, 2)), n_tokens=4, mask_probability=0.5, seed=seed)
    return make_train_data_loader(
        NoiseImages(9),
        augmentation,
        collate,
        batch_size_per_rank=4,
        seed=seed,
        start_iteration=start_iteration,
        num_workers=num_workers,
    )


def take_batches(loader, count):
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(count)]
    del iterator
    return batches


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a["iteration"] == b["iteration"]
        for key in ("collated_global_crops", "collated_local_crops", "collated_masks", "sample_indices"):
            assert torch.equal(a[key], b[key]), key


def test_resumed_loader_yields_the_uninterrupted_batches():
    uninterrupted = take_batches(make_loader(), 6)
    resumed = take_batches(make_loader(start_iteration=3), 3)
    assert [batch["iteration"] for batch in uninterrupted] == list(range(6))
    assert_same_batches(resumed, uninterrupted[3:])
    assert uninterrupted[0]["collated_global_crops"].shape == (8, 3, 16, 16)
    assert uninterrupted[0]["collated_local_crops"].shape == (8, 3, 8, 8)


@pytest.mark.slow
def test_worker_count_does_not_change_the_batches():
    assert_same_batches(take_batches(make_loader(num_workers=0), 4), take_batches(make_loader(num_workers=2), 4))


def test_loader_leaves_the_global_rngs_alone():
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    take_batches(make_loader(), 2)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_eval_loader_is_ordered_and_keeps_the_last_partial_batch():
    class Numbers(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, index):
            return torch.full((2,), float(index)), index

    batches = list(make_eval_data_loader(Numbers(), batch_size=2))
    assert [batch[1].tolist() for batch in batches] == [[0, 1], [2, 3], [4]]
