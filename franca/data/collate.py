"""Batching of multi-crop samples with iBOT masks (valeoai/Franca ``franca/data/collate.py``,
``collate_data_and_cast``).

A sample is a tuple ``(crops, target, ...)`` where ``crops`` is the dict from
:class:`franca.data.augmentations.DataAugmentationDINO` or, on the split path, from
:class:`franca.data.batched_augmentations.SplitDataAugmentationDINO` (uint8 crops and their photometric parameters,
finished on the training device); samples from the training loader carry a third element, a
:class:`franca.data.samplers.SampleKey`, that :class:`MaskingCollator` uses to seed the batch's masks.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from franca.data.masking import BlockMask


def stack_crop_major(samples: Sequence[Sequence[Any]], key: str) -> torch.Tensor:
    """[crop 0 of every sample, crop 1 of every sample, ...] → [n_crops·B, ...] (crops or their parameter vectors
    under ``key``); empty [0] without crops."""
    n_crops = len(samples[0][0][key])
    crops = [sample[0][key][crop] for crop in range(n_crops) for sample in samples]
    return torch.stack(crops) if crops else torch.empty(0)


def _stratified_masks(
    n_images: int,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    mask_generator: BlockMask,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Masks [n_images, N]: int(n_images·p) images get ratios stratified over (r_min, r_max), the rest none.

    Image i < n_masked gets int(N·U(r_i, r_{i+1})) masked patches with r = linspace(r_min, r_max, n_masked + 1); the
    image order is then shuffled (as the original).
    """
    n_tokens = mask_generator.num_patches
    n_masked_images = int(n_images * mask_probability)
    ratios = np.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked_images + 1)
    masks = []
    for i in range(n_masked_images):
        num_masked = int(n_tokens * rng.uniform(ratios[i], ratios[i + 1]))
        masks.append(mask_generator(num_masked, rng).flatten())
    masks += [torch.zeros(n_tokens, dtype=torch.bool)] * (n_images - n_masked_images)
    order = torch.from_numpy(rng.permutation(n_images))
    return torch.stack(masks)[order]


def _rank_rows(n_crops: int, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of the global crop-major image list [crop c of global sample j] = c·(B·W) + j."""
    local = torch.arange(batch_size) + rank * batch_size
    return torch.cat([crop * batch_size * world_size + local for crop in range(n_crops)])


def collate_data_and_cast(
    samples: Sequence[Sequence[Any]],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    n_tokens: int,
    mask_generator: BlockMask,
    dtype: torch.dtype,
    rng: np.random.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Stacks crops crop-major, casts them to ``dtype`` and draws the masks of the global crops (original
    ``collate_data_and_cast``).

    The masks are drawn for the global batch of ``world_size`` ranks (this rank's B samples being global samples
    rank·B … rank·B + B − 1) and this rank keeps its rows, so the masks of an iteration do not depend on the world
    size: a run resumed on another number of processes continues with the same masks.

    Samples of the split path (crops with ``global_params``) keep their crops' dtype (uint8) and add
    ``photometric_params`` = {"global": [G·B, P], "local": [L·B, P]}, in the crops' order, for
    :func:`franca.data.batched_augmentations.apply_photometric_to_batch` on the device.

    Returns ``collated_global_crops`` [G·B, 3, S, S], ``collated_local_crops`` [L·B, 3, s, s], ``collated_masks``
    [G·B, N] bool, ``mask_indices_list`` (flat indices into G·B·N), ``masks_weight`` (1 / #masked of the token's
    image, one per masked token). The original's ``upperbound``, ``n_masked_patches`` and ``targets`` are left out:
    no step reads them (the number of masked tokens is ``mask_indices_list.numel()``).
    """
    if not samples:
        raise ValueError("collate_data_and_cast got an empty batch; the loader must yield at least one sample")
    if n_tokens != mask_generator.num_patches:
        raise ValueError(
            f"n_tokens={n_tokens} does not match the mask generator's {mask_generator.height}x{mask_generator.width} "
            "grid; build the generator with input_size = global_crops_size // patch_size"
        )
    r_min, r_max = mask_ratio_tuple
    if not 0.0 <= r_min <= r_max <= 1.0:
        raise ValueError(f"mask_ratio_tuple={tuple(mask_ratio_tuple)} must satisfy 0 <= min <= max <= 1")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability={mask_probability} must be in [0, 1]")
    global_crops = stack_crop_major(samples, "global_crops")
    local_crops = stack_crop_major(samples, "local_crops")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    n_global_crops = len(global_crops) // len(samples)
    all_masks = _stratified_masks(len(global_crops) * world_size, (r_min, r_max), mask_probability, mask_generator, rng)
    rows = _rank_rows(n_global_crops, len(samples), rank, world_size)
    masks = all_masks[rows]
    mask_indices = masks.flatten().nonzero().flatten()
    masked_per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / masked_per_image).expand_as(masks)[masks]
    split = "global_params" in samples[0][0]
    batch = {
        "collated_global_crops": global_crops if split else global_crops.to(dtype),
        "collated_local_crops": local_crops if split else local_crops.to(dtype),
        "collated_masks": masks,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight,
    }
    if split:
        batch["photometric_params"] = {
            kind: stack_crop_major(samples, f"{kind}_params") for kind in ("global", "local")
        }
    return batch


@dataclass
class MaskingCollator:
    """The training collate: :func:`collate_data_and_cast` with the global batch's masks seeded by (seed, iteration).

    The iteration is read from the samples' :class:`~franca.data.samplers.SampleKey`, so the masks of a batch depend
    neither on the worker that built it, nor on whether the run was resumed, nor on the world size; each rank keeps
    its own rows of the global draw.
    """

    mask_generator: BlockMask
    n_tokens: int
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.65)
    mask_probability: float = 0.5
    dtype: torch.dtype = torch.float32
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __call__(self, samples: Sequence[Sequence[Any]]) -> dict[str, Any]:
        keys = [sample[2] if len(sample) > 2 else None for sample in samples]
        if any(key is None or not hasattr(key, "iteration") for key in keys):
            raise TypeError(
                "MaskingCollator needs samples (crops, target, SampleKey) as produced by make_train_data_loader; "
                "for other samples call collate_data_and_cast with an explicit rng"
            )
        iterations = {key.iteration for key in keys}
        if len(iterations) != 1:
            raise ValueError(f"one batch mixes samples of iterations {sorted(iterations)}; batches must not straddle")
        iteration = iterations.pop()
        rng = np.random.default_rng([self.seed, iteration])
        batch = collate_data_and_cast(
            samples,
            self.mask_ratio_tuple,
            self.mask_probability,
            self.n_tokens,
            self.mask_generator,
            self.dtype,
            rng,
            self.rank,
            self.world_size,
        )
        batch["iteration"] = iteration
        batch["sample_indices"] = torch.tensor([key.index for key in keys], dtype=torch.long)
        return batch
