"""Masks: exact counts, the geometry of the (cyclic) block, and CyclicMask's uniform coverage (as the original)."""

import math

import numpy as np
import pytest
import torch

from franca.data.masking import BlockMask, CyclicMask, InverseBlockMask, build_mask_generator

GRID_SIZES = [
    (16, 16),
    (14, 14),
    (7, 11),
    (11, 7),
    (1, 5),
    (5, 1),
    (2, 30),
    (30, 2),
    (11, 3),
    (40, 2),
    (1, 1),
    (37, 37),
]


def partial_rectangle(height: int, width: int, count: int, block_h: int, block_w: int) -> np.ndarray:
    """``count`` cells of a block_h x block_w rectangle at (0, 0), filled row by row."""
    pattern = np.zeros((height, width), dtype=bool)
    for cell in range(count):
        pattern[cell // block_w, cell % block_w] = True
    return pattern


def is_rolled_partial_rectangle(region: np.ndarray) -> bool:
    """Brute force: some circular shift turns ``region`` into a row-filled rectangle anchored at (0, 0)."""
    height, width = region.shape
    count = int(region.sum())
    if count == 0:
        return True
    candidates = []
    for block_w in range(1, width + 1):
        block_h = math.ceil(count / block_w)
        if block_h <= height:
            candidates.append(partial_rectangle(height, width, count, block_h, block_w))
    for top, left in zip(*np.nonzero(region), strict=True):
        unrolled = np.roll(region, (-top, -left), axis=(0, 1))
        if any(np.array_equal(unrolled, pattern) for pattern in candidates):
            return True
    return False


def test_partial_rectangle_check_rejects_two_blocks():
    region = np.zeros((8, 8), dtype=bool)
    region[0, 0:2] = True
    region[4, 4:6] = True
    assert not is_rolled_partial_rectangle(region)
    region = np.zeros((8, 8), dtype=bool)
    region[[7, 7, 0, 0], [7, 0, 7, 0]] = True  # a 2x2 block wrapped around the corner
    assert is_rolled_partial_rectangle(region)


@pytest.mark.parametrize("grid", GRID_SIZES)
@pytest.mark.parametrize(
    "make",
    [
        lambda grid, rng: BlockMask(grid, rng=rng),
        lambda grid, rng: BlockMask(grid, roll=True, rng=rng),
        lambda grid, rng: InverseBlockMask(grid, rng=rng),
        lambda grid, rng: CyclicMask(input_size=grid, min_aspect=0.3, rng=rng),
    ],
    ids=["block", "block-roll", "inverse-block", "cyclic"],
)
def test_exact_number_of_masked_patches(grid, make):
    rng = np.random.default_rng(0)
    generator = make(grid, rng)
    total = grid[0] * grid[1]
    counts = {0, 1, total - 1, total} | {int(n) for n in rng.integers(0, total + 1, size=12)}
    for count in sorted(c for c in counts if 0 <= c <= total):
        mask = generator(count)
        assert mask.dtype == torch.bool and tuple(mask.shape) == grid
        assert int(mask.sum()) == count


@pytest.mark.parametrize("grid", [(16, 16), (7, 11), (2, 30), (5, 1)])
def test_cyclic_visible_part_is_one_rectangle_on_the_torus(grid):
    rng = np.random.default_rng(1)
    generator = CyclicMask(grid, rng=rng)
    total = grid[0] * grid[1]
    wrapped = 0
    for _ in range(40):
        count = int(rng.integers(0, total))
        visible = ~generator(count).numpy()
        assert is_rolled_partial_rectangle(visible)
        rows_used = visible.any(axis=1)
        wrapped += bool(rows_used[0] and rows_used[-1] and not rows_used.all())
    if grid == (16, 16):
        assert wrapped > 0, "the rolled block never straddled the top/bottom border"


def test_block_mask_masked_part_is_one_rectangle():
    rng = np.random.default_rng(2)
    plain, rolled = BlockMask((9, 13), rng=rng), BlockMask((9, 13), roll=True, rng=rng)
    for _ in range(30):
        count = int(rng.integers(1, 9 * 13))
        for generator in (plain, rolled):
            assert is_rolled_partial_rectangle(generator(count).numpy())
        block = plain(count).numpy()
        rows, cols = np.nonzero(block)
        # without roll the rectangle does not wrap: its bounding box holds it with at most one partial row.
        assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) - count < cols.max() - cols.min() + 1


def mask_frequency(generator, draws: int, rng: np.random.Generator) -> np.ndarray:
    total = generator.height * generator.width
    counts = np.zeros((generator.height, generator.width))
    for _ in range(draws):
        counts += generator(int(total * rng.uniform(0.1, 0.5)), rng).numpy()
    return counts / draws


def test_cyclic_mask_covers_positions_uniformly():
    rng = np.random.default_rng(3)
    frequency = mask_frequency(CyclicMask((16, 16)), 4000, rng)
    assert 0.25 < frequency.mean() < 0.35
    assert frequency.max() / frequency.min() < 1.3


def test_unrolled_inverse_block_is_strongly_non_uniform():
    rng = np.random.default_rng(4)
    frequency = mask_frequency(InverseBlockMask((16, 16)), 1000, rng)
    corners = frequency[[0, 0, -1, -1], [0, -1, 0, -1]].mean()
    centre = frequency[6:10, 6:10].mean()
    assert corners > 0.6 and centre < 0.1


def test_same_generator_state_gives_same_mask():
    first = CyclicMask((14, 14))(70, np.random.default_rng(5))
    second = CyclicMask((14, 14))(70, np.random.default_rng(5))
    third = CyclicMask((14, 14))(70, np.random.default_rng(6))
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_invalid_counts_and_sizes_are_refused():
    with pytest.raises(ValueError, match="0..16"):
        CyclicMask((4, 4))(17)
    with pytest.raises(ValueError, match="input_size"):
        CyclicMask((0, 4))
    with pytest.raises(ValueError, match="min_aspect"):
        BlockMask(4, min_aspect=0)


def test_build_mask_generator_maps_the_original_flags():
    assert type(build_mask_generator(16, True, True, True)) is CyclicMask
    inverse = build_mask_generator((16, 8), True, True, False)
    assert type(inverse) is InverseBlockMask and not inverse.roll and (inverse.height, inverse.width) == (16, 8)
    block = build_mask_generator(16, True, False, True)
    assert type(block) is BlockMask and block.roll
    with pytest.raises(ValueError, match="use_block_masking"):
        build_mask_generator(16, False, True, True)
