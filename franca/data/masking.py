"""Patch masks for iBOT: block, inverse block and CyclicMask (paper arXiv 2507.14137, Sec. 3; valeoai/Franca
``franca/data/masking.py``).

Every generator is called with a number of patches ``n`` and returns a bool tensor [H, W] with exactly ``n`` True
(True = masked). Randomness comes only from a ``numpy.random.Generator``: the one given at construction, or the one
passed to the call (the collate passes a generator seeded per batch, which makes the masks reproducible).
"""

import math

import numpy as np
import torch


def _grid_size(input_size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if height < 1 or width < 1:
        raise ValueError(f"mask input_size={input_size!r} must be positive patch-grid sizes (H, W)")
    return int(height), int(width)


class BlockMask:
    """Masks one rectangular block of exactly ``n`` patches (the original ``BlockMasking``).

    The block's log-aspect ratio is uniform in [log min_aspect, log max_aspect] (clipped so the block fits the grid);
    the rectangle is filled in row-major order up to ``n`` patches, so its last row may be partial. With ``roll`` the
    mask is then shifted circularly by a uniform offset on the torus (step 3), which makes every position equally
    likely to be masked.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        roll: bool = False,
        rng: np.random.Generator | None = None,
    ):
        self.height, self.width = _grid_size(input_size)
        if min_aspect <= 0:
            raise ValueError(f"min_aspect={min_aspect} must be > 0 (the original uses 0.3)")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect={max_aspect} must be >= min_aspect={min_aspect}")
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
        self.roll = roll
        self.rng = np.random.default_rng() if rng is None else rng

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size=({self.height}, {self.width}), roll={self.roll})"

    def _check_count(self, num_masked: int) -> int:
        if not 0 <= num_masked <= self.num_patches:
            raise ValueError(
                f"{type(self).__name__} was asked for {num_masked} masked patches; a {self.height}x{self.width} grid "
                f"allows 0..{self.num_patches}"
            )
        return int(num_masked)

    def _block(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """A [H, W] bool array with exactly ``count`` (>= 1) True forming one (row-major filled) rectangle."""
        height, width = self.height, self.width
        low = max(self.log_aspect_range[0], math.log(count / width**2))
        high = min(self.log_aspect_range[1], math.log(height**2 / (count + 1e-5)))
        low = min(low, high)
        aspect = math.exp(rng.uniform(low, high))
        block_h = min(math.ceil(math.sqrt(count * aspect)), height)
        block_w = min(math.ceil(math.sqrt(count / aspect)), width)
        if block_h * block_w < count:
            # Only on strongly non-square grids, where the aspect window and the grid bounds conflict (the original
            # then returned too few cells): widen, then heighten, the rectangle until it holds ``count`` cells.
            block_w = min(math.ceil(count / block_h), width)
            block_h = min(math.ceil(count / block_w), height)
        top = int(rng.integers(0, height - block_h + 1))
        left = int(rng.integers(0, width - block_w + 1))
        rectangle = np.zeros((height, width), dtype=bool)
        rectangle[top : top + block_h, left : left + block_w] = True
        kept = np.flatnonzero(rectangle)[:count]
        block = np.zeros(height * width, dtype=bool)
        block[kept] = True
        return block.reshape(height, width)

    def _maybe_roll(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.roll:
            return mask
        shift = (int(rng.integers(0, self.height)), int(rng.integers(0, self.width)))
        return np.roll(mask, shift, axis=(0, 1))

    def __call__(self, num_masked: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        num_masked = self._check_count(num_masked)
        rng = self.rng if rng is None else rng
        if num_masked == 0:
            return torch.zeros(self.height, self.width, dtype=torch.bool)
        return torch.from_numpy(self._maybe_roll(self._block(num_masked, rng), rng))


class InverseBlockMask(BlockMask):
    """Masks everything outside one visible block of ``H·W − n`` patches (the original inverse block mode).

    Without ``roll`` the masked region hugs the borders (corners are almost always masked, the centre almost never).
    """

    def __call__(self, num_masked: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        num_masked = self._check_count(num_masked)
        rng = self.rng if rng is None else rng
        if num_masked == self.num_patches:
            return torch.ones(self.height, self.width, dtype=torch.bool)
        if num_masked == 0:
            return torch.zeros(self.height, self.width, dtype=torch.bool)
        visible = self._maybe_roll(self._block(self.num_patches - num_masked, rng), rng)
        return torch.from_numpy(~visible)


class CyclicMask(InverseBlockMask):
    """Franca's CyclicMask: an inverse block mask circularly shifted on the torus (original ``CyclicMask``).

    The visible block may wrap around the image borders; per-position mask frequency is uniform.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: np.random.Generator | None = None,
    ):
        super().__init__(input_size, min_aspect=min_aspect, max_aspect=max_aspect, roll=True, rng=rng)


def build_mask_generator(
    input_size: int | tuple[int, int],
    use_block_masking: bool = True,
    use_inverse_block: bool = True,
    roll: bool = True,
    min_aspect: float = 0.3,
) -> BlockMask:
    """Maps the original's config keys ``train.use_block_masking / use_inverse_block / roll`` to a generator.

    All Franca configs use (True, True, True) = :class:`CyclicMask`.
    """
    if not use_block_masking:
        raise ValueError(
            "use_block_masking=False selects the legacy iBOT random-rectangles masking, which franca does not "
            "implement; set train.use_block_masking=True (Franca uses block masking with use_inverse_block and roll)"
        )
    if use_inverse_block and roll:
        return CyclicMask(input_size, min_aspect=min_aspect)
    if use_inverse_block:
        return InverseBlockMask(input_size, min_aspect=min_aspect)
    return BlockMask(input_size, min_aspect=min_aspect, roll=roll)
