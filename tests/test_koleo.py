"""KoLeo on point sets whose nearest-neighbour distances are known in closed form."""

import math

import pytest
import torch

from franca.loss import koleo_loss


def embed_in_random_plane(points_2d, dim, seed):
    """Map 2-D points isometrically into R^dim through a random orthonormal pair of directions."""
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return points_2d @ basis.T


def circle_points(angles, radii):
    angles = torch.tensor(angles, dtype=torch.float64)
    return torch.stack((angles.cos(), angles.sin()), dim=1) * torch.tensor(radii, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("n", [3, 4, 6, 9])
def test_regular_polygon_has_chord_distance(n):
    # Normalised, the vertices of a regular n-gon sit on the unit circle, each 2·sin(π/n) from its neighbours;
    # the radii differ to check that only directions count.
    radii = [0.5 + i for i in range(n)]
    points = circle_points([2 * math.pi * i / n for i in range(n)], radii)
    loss = koleo_loss(embed_in_random_plane(points, dim=6, seed=n).float())
    assert loss.item() == pytest.approx(-math.log(2 * math.sin(math.pi / n)), abs=1e-5)


def test_square_corners_are_sqrt2_apart():
    corners = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    assert koleo_loss(corners).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_irregular_angles_use_each_points_own_nearest_neighbour():
    # Angles 0, .3, 1, 2.2, 4 rad: nearest angular gaps .3, .3, .7, 1.2, 1.8 (4 → 2π is 2.28, farther than 1.8);
    # a chord over the gap Δ is 2·sin(Δ/2).
    points = circle_points([0.0, 0.3, 1.0, 2.2, 4.0], [1.0, 2.0, 0.3, 1.0, 5.0])
    gaps = [0.3, 0.3, 0.7, 1.2, 1.8]
    expected = -sum(math.log(2 * math.sin(gap / 2)) for gap in gaps) / len(gaps)
    loss = koleo_loss(embed_in_random_plane(points, dim=5, seed=0).float())
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_duplicates_stay_finite_and_low_precision_is_computed_in_fp32():
    points = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.bfloat16)
    loss = koleo_loss(points)
    # The duplicates are eps·‖(1, 1, 1)‖ apart under pairwise_distance's eps; the third point's nearest is √2 away.
    duplicate_term = math.log(math.sqrt(3) * 1e-8 + 1e-8)
    expected = -(2 * duplicate_term + math.log(math.sqrt(2))) / 3
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_gradient_pushes_nearest_neighbours_apart():
    points = circle_points([0.0, 0.2, 2.0, 4.0], [1.0] * 4).float().requires_grad_()
    koleo_loss(points).backward()
    # Descending the loss moves point 0 (angle 0) away from point 1 (angle .2): towards negative angles,
    # i.e. along −(tangent at 0) = (0, −1), so the gradient's y component is positive.
    assert points.grad[0, 1].item() > 0 and points.grad[1, 1].item() < 0


@pytest.mark.parametrize("shape", [(1, 4), (0, 4)])
def test_fewer_than_two_samples_is_refused_with_the_fix(shape):
    with pytest.raises(ValueError, match="koleo_loss_weight=0"):
        koleo_loss(torch.zeros(shape))


def test_rejects_non_matrix_input():
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        koleo_loss(torch.zeros(2, 3, 4))
