"""RASA head (original ``RASAHead``): sequential rank-2 Gram–Schmidt removals, folded matrix, backbone integration."""

import numpy as np
import pytest
import torch

from franca.models.rasa_head import RASAHead
from franca.models.vision_transformer import DinoVisionTransformer

DIM = 24


def random_head(n_pos_layers: int, seed: int = 0, dim: int = DIM) -> RASAHead:
    torch.manual_seed(seed)
    head = RASAHead(dim, n_pos_layers=n_pos_layers)
    with torch.no_grad():
        for weight in head.weights():
            weight.normal_()
    return head


def orthogonal_planes_head(n_pos_layers: int, tilt: float = 0.0, seed: int = 0) -> RASAHead:
    """A head whose planes are mutually orthogonal (tilt = 0), or tilted away from that by ``tilt``."""
    rng = np.random.default_rng(seed)
    n_planes = n_pos_layers + 1
    basis, _ = np.linalg.qr(rng.standard_normal((DIM, 2 * n_planes)))
    noise = rng.standard_normal((n_planes, 2, DIM))
    head = RASAHead(DIM, n_pos_layers=n_pos_layers)
    with torch.no_grad():
        for j, weight in enumerate(head.weights()):
            mixing = np.eye(2) + 0.3 * rng.standard_normal((2, 2))
            plane = mixing @ basis[:, 2 * j : 2 * j + 2].T + tilt * noise[j]
            weight.copy_(torch.from_numpy(plane))
    return head


def plane_weights(head: RASAHead, use_pos_pred: bool = True) -> list[np.ndarray]:
    return [w.detach().double().numpy() for w in head.weights(use_pos_pred)]


def orthonormal_plane(weight: np.ndarray) -> np.ndarray:
    """Gram–Schmidt of the original head in float64: rows a = w_r/‖w_r‖ and b' ∝ w_c/‖w_c‖ − ⟨·, a⟩a."""
    a = weight[0] / np.linalg.norm(weight[0])
    b = weight[1] / np.linalg.norm(weight[1])
    b = b - (b @ a) * a
    return np.stack([a, b / np.linalg.norm(b)])


def reference_removal(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    for weight in weights:
        plane = orthonormal_plane(weight)
        x = x - (x @ plane.T) @ plane
    return x


def reference_matrix(weights: list[np.ndarray]) -> np.ndarray:
    """M = (I − P_n) … (I − P_0), applied as x · Mᵀ."""
    matrix = np.eye(DIM)
    for weight in weights:
        plane = orthonormal_plane(weight)
        matrix = (np.eye(DIM) - plane.T @ plane) @ matrix
    return matrix


def apply(head: RASAHead, x: np.ndarray, use_pos_pred: bool = True) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(x).float(), use_pos_pred=use_pos_pred).double().numpy()


@pytest.mark.parametrize("n_pos_layers", [0, 8, 9])
@pytest.mark.parametrize("use_pos_pred", [True, False])
def test_forward_matches_float64_gram_schmidt(n_pos_layers, use_pos_pred):
    head = random_head(n_pos_layers)
    x = np.random.default_rng(1).standard_normal((3, 5, DIM))
    expected = reference_removal(x, plane_weights(head, use_pos_pred))
    np.testing.assert_allclose(apply(head, x, use_pos_pred), expected, rtol=0, atol=2e-5)
    with torch.no_grad():
        in_float64 = head.double()(torch.from_numpy(x), use_pos_pred=use_pos_pred).numpy()
    np.testing.assert_allclose(in_float64, expected, rtol=0, atol=1e-12)


def test_output_is_orthogonal_to_every_plane_when_the_planes_are_orthogonal():
    head = orthogonal_planes_head(8)
    x = np.random.default_rng(2).standard_normal((50, DIM))
    out = apply(head, x)
    for weight in plane_weights(head):
        np.testing.assert_allclose(out @ weight.T, 0.0, atol=1e-4)
    basis = np.concatenate([orthonormal_plane(w) for w in plane_weights(head)])
    np.testing.assert_allclose(out, x - (x @ basis.T) @ basis, atol=2e-5)


def test_generic_planes_orthogonal_to_last_plane_only():
    """Successive planes are not orthogonal, so only the last removal is exact; order matters."""
    head = random_head(8)
    weights = plane_weights(head)
    x = np.random.default_rng(3).standard_normal((50, DIM))
    out = apply(head, x)
    np.testing.assert_allclose(out @ weights[-1].T, 0.0, atol=1e-4)
    first_plane = orthonormal_plane(weights[0])
    assert np.abs(out @ first_plane.T).max() > 1e-2
    np.testing.assert_allclose(apply(head, first_plane), 0.0, atol=1e-5)
    assert np.all(np.linalg.norm(out, axis=1) <= np.linalg.norm(x, axis=1) + 1e-5)
    reversed_order = reference_removal(x, weights[::-1])
    assert np.abs(reversed_order - out).max() > 1e-2


def test_idempotent_exactly_for_orthogonal_planes_and_up_to_their_tilt_otherwise():
    x = np.random.default_rng(4).standard_normal((50, DIM))

    def second_application_change(head: RASAHead) -> float:
        head = head.double()
        with torch.no_grad():
            once = head(torch.from_numpy(x))
            twice = head(once)
        return (twice - once).abs().max().item()

    assert second_application_change(orthogonal_planes_head(8)) < 1e-6  # planes stored in float32: orthogonal to ~1e-7
    coarse = second_application_change(orthogonal_planes_head(8, tilt=1e-2))
    fine = second_application_change(orthogonal_planes_head(8, tilt=1e-4))
    assert coarse > 1e-3
    assert fine < 0.03 * coarse  # the change is linear in the tilt (a factor 100 here)
    assert second_application_change(random_head(8)) > 1e-2


@pytest.mark.parametrize("use_pos_pred", [True, False])
def test_folded_matrix_equals_sequential_form(use_pos_pred):
    head = random_head(9)
    matrix = head.folded_matrix(use_pos_pred).detach()
    np.testing.assert_allclose(matrix.double().numpy(), reference_matrix(plane_weights(head, use_pos_pred)), atol=1e-5)
    x = torch.randn(4, 7, DIM)
    with torch.no_grad():
        torch.testing.assert_close(x @ matrix.T, head(x, use_pos_pred=use_pos_pred), rtol=0, atol=1e-5)


def test_pos_info_and_position_prediction():
    head = random_head(2)
    x = np.random.default_rng(5).standard_normal((6, DIM))
    with torch.no_grad():
        x_pos, x_out = head(torch.from_numpy(x), return_pos_info=True)
        predicted = head.forward_pos_pred(torch.from_numpy(x).float()).double().numpy()
    before_last = reference_removal(x, plane_weights(head)[:-1])
    last_plane = orthonormal_plane(plane_weights(head)[-1])
    np.testing.assert_allclose(x_pos.numpy(), (before_last @ last_plane.T) @ last_plane, atol=1e-5)
    np.testing.assert_allclose((x_pos + x_out).numpy(), before_last, atol=1e-5)
    expected = 1 / (1 + np.exp(-(x @ plane_weights(head)[-1].T)))
    np.testing.assert_allclose(predicted, expected, atol=1e-6)


@pytest.mark.parametrize("n_pos_layers, prefix", [(8, ""), (9, "rasa_head."), (9, "module.rasa_head.")])
def test_from_state_dict_counts_the_pre_layers(n_pos_layers, prefix):
    source = random_head(n_pos_layers)
    state = {prefix + key: value for key, value in source.state_dict().items()}
    head = RASAHead.from_state_dict(state)
    assert head.n_pos_layers == n_pos_layers and head.input_dim == DIM
    for key, value in source.state_dict().items():
        torch.testing.assert_close(head.state_dict()[key], value, rtol=0, atol=0)


def test_from_state_dict_rejects_malformed_files():
    state = random_head(3).state_dict()
    with pytest.raises(ValueError, match="no 'pos_pred.weight'"):
        RASAHead.from_state_dict({k: v for k, v in state.items() if k != "pos_pred.weight"})
    with pytest.raises(ValueError, match=r"contiguous from 0, got \[0, 2\]"):
        RASAHead.from_state_dict({k: v for k, v in state.items() if not k.startswith("pre_pos_layers.1.")})
    with pytest.raises(ValueError, match="pos_out_dim=2"):
        RASAHead(DIM, pos_out_dim=1)


def test_backbone_adds_patch_token_rasa_only_on_request():
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=DIM, depth=2, num_heads=2).eval()
    images = torch.randn(2, 3, 42, 56)
    with pytest.raises(RuntimeError, match="needs a RASA head"):
        model.forward_features(images, use_rasa_head=True)
    with pytest.raises(ValueError, match="RASA head for dim 32 cannot be attached to a backbone of dim 24"):
        model.attach_rasa_head(RASAHead(32, n_pos_layers=1))

    head = random_head(9)
    model.attach_rasa_head(head)
    with torch.no_grad():
        plain = model.forward_features(images)
        debiased = model.forward_features(images, use_rasa_head=True)
        listed = model.forward_features([images, images[:1]], use_rasa_head=True)
    assert "patch_token_rasa" not in plain
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(debiased[key], plain[key], rtol=0, atol=0)
    patches = plain["x_norm_patchtokens"].double().numpy()
    expected = np.stack([reference_removal(p, plane_weights(head)) for p in patches])
    assert debiased["patch_token_rasa"].shape == (2, 12, DIM)
    np.testing.assert_allclose(debiased["patch_token_rasa"].numpy(), expected, atol=2e-5)
    torch.testing.assert_close(listed[1]["patch_token_rasa"], debiased["patch_token_rasa"][:1], rtol=0, atol=1e-6)
