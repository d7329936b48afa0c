"""Batching of multi-crop samples with iBOT masks (reference §4.5).

A sample is a tuple ``(crops, target, ...)`` where ``crops`` is the dict from
:class:`franca.data.augmentations.DataAugmentationDINO`; samples from the training loader carry a third element, a
:class:`franca.data.samplers.SampleKey`, that :class:`MaskingCollator` uses to seed the batch's masks.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from franca.data.masking import BlockMask


def _stack_crop_major(samples: Sequence[Sequence[Any]], key: str) -> torch.Tensor:
    """[crop 0 of every sample, crop 1 of every sample, ...] → [n_crops·B, C, H, W]; empty [0] without crops."""
    n_crops = len(samples[0][0][key])
    crops = [sample[0][key][crop] for crop in range(n_crops) for sample in samples]
    return torch.stack(crops) if crops else torch.empty(0)


def _stratified_masks(
    n_images: int,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    mask_generator: BlockMask,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, int]:
    """Masks for ``n_images`` images: int(n_images·p) of them get ratios stratified over (r_min, r_max), the rest none.

    Image i < n_masked gets int(N·U(r_i, r_{i+1})) masked patches with r = linspace(r_min, r_max, n_masked + 1);
    ``upperbound`` = Σ int(N·r_{i+1}) bounds the total. The image order is then shuffled (reference §4.5).
    """
    n_tokens = mask_generator.num_patches
    n_masked_images = int(n_images * mask_probability)
    ratios = np.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked_images + 1)
    masks, upperbound = [], 0
    for i in range(n_masked_images):
        num_masked = int(n_tokens * rng.uniform(ratios[i], ratios[i + 1]))
        masks.append(mask_generator(num_masked, rng).flatten())
        upperbound += int(n_tokens * ratios[i + 1])
    masks += [torch.zeros(n_tokens, dtype=torch.bool)] * (n_images - n_masked_images)
    order = rng.permutation(n_images)
    return torch.stack([masks[i] for i in order]), upperbound


def collate_data_and_cast(
    samples: Sequence[Sequence[Any]],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    n_tokens: int,
    mask_generator: BlockMask,
    dtype: torch.dtype,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Stacks crops crop-major, casts them to ``dtype`` and draws the masks of the global crops (reference §4.5).

    Returns ``collated_global_crops`` [G·B, 3, S, S], ``collated_local_crops`` [L·B, 3, s, s], ``collated_masks``
    [G·B, N] bool, ``mask_indices_list`` (flat indices into G·B·N), ``masks_weight`` (1 / #masked of the token's
    image, one per masked token), ``upperbound`` (int ≥ number of masked tokens), ``n_masked_patches`` (long [1]) and
    ``targets`` (long [B]).
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
    global_crops = _stack_crop_major(samples, "global_crops")
    local_crops = _stack_crop_major(samples, "local_crops")
    masks, upperbound = _stratified_masks(len(global_crops), (r_min, r_max), mask_probability, mask_generator, rng)
    mask_indices = masks.flatten().nonzero().flatten()
    masked_per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / masked_per_image).expand_as(masks)[masks]
    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": masks,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.tensor([mask_indices.numel()], dtype=torch.long),
        "targets": torch.tensor([int(sample[1]) for sample in samples], dtype=torch.long),
    }


@dataclass
class MaskingCollator:
    """The training collate: :func:`collate_data_and_cast` with masks seeded by (seed, iteration, rank).

    The iteration is read from the samples' :class:`~franca.data.samplers.SampleKey`, so the masks of a batch do not
    depend on the worker that built it nor on whether the run was resumed. The rank enters the seed so that ranks
    draw different masks for the same iteration.
    """

    mask_generator: BlockMask
    n_tokens: int
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.65)
    mask_probability: float = 0.5
    dtype: torch.dtype = torch.float32
    seed: int = 0
    rank: int = 0

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
        rng = np.random.default_rng([self.seed, iteration, self.rank])
        batch = collate_data_and_cast(
            samples, self.mask_ratio_tuple, self.mask_probability, self.n_tokens, self.mask_generator, self.dtype, rng
        )
        batch["iteration"] = iteration
        batch["sample_indices"] = torch.tensor([key.index for key in keys], dtype=torch.long)
        return batch
