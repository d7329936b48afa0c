"""Collate: crop-major stacking, stratified mask counts, weights and indices (as the original)."""

import math

import numpy as np
import pytest
import torch

from franca.data.collate import MaskingCollator, collate_data_and_cast
from franca.data.masking import CyclicMask
from franca.data.samplers import SampleKey

GRID = (8, 8)
N_TOKENS = 64


def make_samples(batch: int, n_local: int = 3, iteration: int = 0) -> list[tuple]:
    """Crop c of sample b is filled with 100·c + b (globals) or 1000 + 100·c + b (locals)."""
    samples = []
    for b in range(batch):
        crops = {
            "global_crops": [torch.full((3, 16, 16), 100.0 * c + b) for c in range(2)],
            "local_crops": [torch.full((3, 8, 8), 1000.0 + 100 * c + b) for c in range(n_local)],
            "offsets": (),
        }
        crops["global_crops_teacher"] = crops["global_crops"]
        samples.append((crops, 10 + b, SampleKey(index=b, pass_index=0, iteration=iteration)))
    return samples


def collate(samples, probability=0.5, ratios=(0.1, 0.65), seed=0, dtype=torch.float16):
    rng = np.random.default_rng(seed)
    return collate_data_and_cast(samples, ratios, probability, N_TOKENS, CyclicMask(GRID), dtype, rng)


def test_crops_are_stacked_crop_major_and_cast():
    batch = collate(make_samples(5, n_local=3))
    globals_, locals_ = batch["collated_global_crops"], batch["collated_local_crops"]
    assert globals_.shape == (10, 3, 16, 16) and globals_.dtype == torch.float16
    assert locals_.shape == (15, 3, 8, 8) and locals_.dtype == torch.float16
    expected_global = [100.0 * c + b for c in range(2) for b in range(5)]
    expected_local = [1000.0 + 100 * c + b for c in range(3) for b in range(5)]
    assert globals_[:, 0, 0, 0].tolist() == expected_global
    assert locals_[:, 0, 0, 0].tolist() == expected_local
    keys = {"collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list", "masks_weight"}
    assert set(batch) == keys


@pytest.mark.parametrize("batch_size, probability, seed", [(6, 0.5, 0), (7, 0.5, 1), (4, 1.0, 2), (5, 0.3, 3)])
def test_mask_counts_follow_the_stratified_ratios(batch_size, probability, seed):
    r_min, r_max = 0.1, 0.65
    batch = collate(make_samples(batch_size), probability=probability, ratios=(r_min, r_max), seed=seed)
    masks = batch["collated_masks"]
    n_images = 2 * batch_size
    assert masks.shape == (n_images, N_TOKENS) and masks.dtype == torch.bool
    n_masked_images = int(n_images * probability)
    counts = sorted(masks.sum(dim=1).tolist())
    assert counts[: n_images - n_masked_images] == [0] * (n_images - n_masked_images)
    masked_counts = counts[n_images - n_masked_images :]
    bounds = [r_min + k * (r_max - r_min) / n_masked_images for k in range(n_masked_images + 1)]
    for k, count in enumerate(masked_counts):
        assert math.floor(N_TOKENS * bounds[k]) - 1 <= count <= math.floor(N_TOKENS * bounds[k + 1])


def test_indices_weights_and_count_are_consistent_with_the_masks():
    batch = collate(make_samples(8), seed=4)
    masks = batch["collated_masks"].numpy()
    indices = batch["mask_indices_list"].numpy()
    expected = [i * N_TOKENS + t for i in range(masks.shape[0]) for t in range(N_TOKENS) if masks[i, t]]
    assert indices.tolist() == expected
    weights = batch["masks_weight"].double().numpy()
    assert weights.shape == (len(expected),)
    per_image = np.zeros(masks.shape[0])
    np.add.at(per_image, indices // N_TOKENS, weights)
    has_masks = masks.sum(axis=1) > 0
    np.testing.assert_allclose(per_image[has_masks], 1.0, rtol=1e-6)
    assert (per_image[~has_masks] == 0).all()
    for flat_index, weight in zip(indices, weights, strict=True):
        assert weight == pytest.approx(1.0 / masks[flat_index // N_TOKENS].sum())


def test_masked_images_are_shuffled_over_the_batch():
    positions = set()
    for seed in range(10):
        masks = collate(make_samples(4), seed=seed)["collated_masks"]
        positions |= set(torch.nonzero(masks.any(dim=1)).flatten().tolist())
    assert positions == set(range(8))


def test_no_masking_when_probability_is_zero():
    batch = collate(make_samples(3), probability=0.0)
    assert not batch["collated_masks"].any()
    assert batch["mask_indices_list"].numel() == 0 and batch["masks_weight"].numel() == 0


def test_collate_rejects_inconsistent_settings():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="n_tokens=63"):
        collate_data_and_cast(make_samples(2), (0.1, 0.5), 0.5, 63, CyclicMask(GRID), torch.float32, rng)
    with pytest.raises(ValueError, match="mask_ratio_tuple"):
        collate_data_and_cast(make_samples(2), (0.6, 0.5), 0.5, 64, CyclicMask(GRID), torch.float32, rng)


def test_masking_collator_seeds_masks_by_iteration():
    collator = MaskingCollator(CyclicMask(GRID), N_TOKENS, seed=3)
    first = collator(make_samples(6, iteration=7))
    again = collator(make_samples(6, iteration=7))
    other = collator(make_samples(6, iteration=8))
    assert torch.equal(first["collated_masks"], again["collated_masks"])
    assert not torch.equal(first["collated_masks"], other["collated_masks"])
    assert first["iteration"] == 7 and first["sample_indices"].tolist() == list(range(6))


def test_masks_do_not_depend_on_the_world_size():
    """Two ranks of 3 samples each get exactly the rows one rank of 6 samples gets (crop-major within each rank)."""
    whole = MaskingCollator(CyclicMask(GRID), N_TOKENS, seed=3)(make_samples(6, iteration=7))["collated_masks"]
    parts = [
        MaskingCollator(CyclicMask(GRID), N_TOKENS, seed=3, rank=r, world_size=2)(make_samples(3, iteration=7))
        for r in range(2)
    ]
    for rank, part in enumerate(parts):
        expected = torch.cat([whole[crop * 6 + rank * 3 : crop * 6 + rank * 3 + 3] for crop in range(2)])
        assert torch.equal(part["collated_masks"], expected)
    assert not torch.equal(parts[0]["collated_masks"], parts[1]["collated_masks"])


def test_masking_collator_refuses_mixed_iterations_and_missing_keys():
    collator = MaskingCollator(CyclicMask(GRID), N_TOKENS)
    mixed = make_samples(2, iteration=0) + make_samples(2, iteration=1)
    with pytest.raises(ValueError, match=r"iterations \[0, 1\]"):
        collator(mixed)
    with pytest.raises(TypeError, match="SampleKey"):
        collator([sample[:2] for sample in make_samples(2)])
