"""DINO and Matryoshka heads: structure, key names, slicing and formulas against hand computations."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from franca.layers.heads import DINOHead, MatryoshkaHead, build_head


def tiny_matryoshka(**kwargs):
    options = {"in_dim": 64, "out_dim": 128, "hidden_dim": 32, "bottleneck_dim": 16, "nlayers": 3}
    return MatryoshkaHead(**{**options, **kwargs})


def weight_normed(g, v):
    return g.double() * v.double() / v.double().norm(dim=1, keepdim=True)


def test_matryoshka_levels_prototypes_and_state_dict_names():
    head = tiny_matryoshka()
    assert head.level_dims == [4, 8, 16, 32, 64]
    assert head.out_dims == [8, 16, 32, 64, 128]  # int(K·d_l/D) = K/16 ... K
    expected = {}
    for level, (d, k) in enumerate(zip(head.level_dims, head.out_dims, strict=True)):
        expected |= {
            f"matryoshka_projections.{level}.weight": (d, d),
            f"matryoshka_projections.{level}.bias": (d,),
            f"mlps.{level}.0.weight": (32, d),
            f"mlps.{level}.0.bias": (32,),
            f"mlps.{level}.2.weight": (32, 32),
            f"mlps.{level}.2.bias": (32,),
            f"mlps.{level}.4.weight": (16, 32),
            f"mlps.{level}.4.bias": (16,),
            f"last_layers.{level}.weight_g": (k, 1),
            f"last_layers.{level}.weight_v": (k, 16),
        }
    assert {name: tuple(t.shape) for name, t in head.state_dict().items()} == expected
    outputs = head(torch.randn(2, 3, 64))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, k) for k in head.out_dims]


def test_released_vitb_nesting_and_prototype_counts():
    head = MatryoshkaHead(768, 131072, hidden_dim=8, bottleneck_dim=4, nlayers=1, nesting_list=None)
    assert head.level_dims == [48, 96, 192, 384, 768]
    assert head.out_dims == [8192, 16384, 32768, 65536, 131072]


def test_project_mode_reads_the_full_feature():
    head = tiny_matryoshka(input_mode="project")
    assert [tuple(p.weight.shape) for p in head.matryoshka_projections] == [(d, 64) for d in head.level_dims]


@pytest.mark.parametrize("init", ["trunc_normal", "fan_in"])
def test_initialisation(init):
    torch.manual_seed(0)
    head = tiny_matryoshka(hidden_dim=256, init=init)
    for last_layer in head.last_layers:
        assert torch.equal(last_layer.weight_g, torch.ones_like(last_layer.weight_g))
    linear_layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linear_layers) == 5 * 4
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linear_layers)
    hidden_weight = head.mlps[4][2].weight
    if init == "trunc_normal":  # DINOv2: std .02 whatever the width
        assert 0.018 < hidden_weight.std().item() < 0.022 and hidden_weight.abs().max() <= 2.0
    else:  # std 1/sqrt(256), truncated at 2 std: the std of such a truncated normal is 0.880 of the parameter
        assert 0.85 / 16 < hidden_weight.std().item() < 0.91 / 16 and hidden_weight.abs().max() <= 2 / 16
        first = head.mlps[0][0].weight  # fan-in 4: the level-0 slice, 1024 weights (std of the estimate ~2 %)
        assert 0.80 / 2 < first.std().item() < 0.96 / 2
    # weight_v keeps nn.Linear's default uniform init, bound 1/sqrt(fan_in) = 1/4, not the trunc-normal .02.
    v = head.last_layers[4].weight_v
    assert v.abs().max() <= 0.25 and v.std().item() > 0.1


def test_slice_mode_level_depends_only_on_its_prefix():
    head = tiny_matryoshka().eval()
    x = torch.randn(5, 64)
    before = head(x)
    for level, d in enumerate(head.level_dims[:-1]):
        perturbed = x.clone()
        perturbed[:, d:] += torch.randn(5, 64 - d)
        after = head(perturbed)
        for other in range(level + 1):
            torch.testing.assert_close(after[other], before[other], rtol=0, atol=0)
        assert not torch.allclose(after[level + 1], before[level + 1])


def test_project_mode_every_level_depends_on_the_last_feature():
    head = tiny_matryoshka(input_mode="project").eval()
    x = torch.randn(5, 64)
    perturbed = x.clone()
    perturbed[:, -1] += 1.0
    for before, after in zip(head(x), head(perturbed), strict=True):
        assert not torch.allclose(before, after)


@pytest.mark.parametrize("input_mode", ["slice", "project"])
def test_matryoshka_forward_matches_hand_formula(input_mode):
    head = tiny_matryoshka(input_mode=input_mode).double()
    with torch.no_grad():
        for last_layer in head.last_layers:
            last_layer.weight_g.uniform_(0.5, 2.0)  # non-unit gains: the prototype norms must follow weight_g
    x = torch.randn(4, 64, dtype=torch.float64)
    state = head.state_dict()
    for level, (d, output) in enumerate(zip(head.level_dims, head(x), strict=True)):
        h = x[:, :d] if input_mode == "slice" else x
        h = h @ state[f"matryoshka_projections.{level}.weight"].T + state[f"matryoshka_projections.{level}.bias"]
        for index in (0, 2, 4):
            h = h @ state[f"mlps.{level}.{index}.weight"].T + state[f"mlps.{level}.{index}.bias"]
            h = F.gelu(h)  # a GELU after every layer, the bottleneck included; no L2 normalisation
        prototypes = weight_normed(state[f"last_layers.{level}.weight_g"], state[f"last_layers.{level}.weight_v"])
        torch.testing.assert_close(output, h @ prototypes.T)


def test_one_layer_heads_are_a_bare_linear_with_the_original_keys():
    """nlayers=1 as the original ``_build_mlp``: a bare Linear(in → bottleneck), no GELU, keys ``mlps.{l}.weight``;
    a state dict with those keys (an original 1-layer checkpoint) loads strictly."""
    head = tiny_matryoshka(nlayers=1).double()
    state = head.state_dict()
    assert {k for k in state if k.startswith("mlps.0.")} == {"mlps.0.weight", "mlps.0.bias"}
    original = {k: torch.randn_like(v) for k, v in state.items()}
    head.load_state_dict(original)
    x = torch.randn(3, 64, dtype=torch.float64)
    for level, (d, output) in enumerate(zip(head.level_dims, head(x), strict=True)):
        h = x[:, :d] @ original[f"matryoshka_projections.{level}.weight"].T
        h = h + original[f"matryoshka_projections.{level}.bias"]
        h = h @ original[f"mlps.{level}.weight"].T + original[f"mlps.{level}.bias"]  # no GELU after the only layer
        prototypes = weight_normed(original[f"last_layers.{level}.weight_g"], original[f"last_layers.{level}.weight_v"])
        torch.testing.assert_close(output, h @ prototypes.T)
    dino = DINOHead(64, 32, hidden_dim=16, bottleneck_dim=8, nlayers=1)
    assert set(dino.state_dict()) == {"mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"}


def test_weight_norm_names_load_into_torch_legacy_weight_norm():
    head = tiny_matryoshka()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        legacy = nn.utils.weight_norm(nn.Linear(16, 128, bias=False))
    legacy.load_state_dict(head.last_layers[4].state_dict())
    bottleneck = torch.randn(3, 16)
    torch.testing.assert_close(head.last_layers[4](bottleneck), legacy(bottleneck))


def test_state_dict_round_trip_reproduces_outputs():
    head, copy = tiny_matryoshka(), tiny_matryoshka()
    copy.load_state_dict(head.state_dict())
    x = torch.randn(2, 64)
    for a, b in zip(head(x), copy(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dino_head_structure_and_hand_formula():
    head = DINOHead(in_dim=24, out_dim=40, hidden_dim=32, bottleneck_dim=8).double()
    assert head.level_dims == [24] and head.out_dims == [40]
    shapes = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (32, 24),
        "mlp.0.bias": (32,),
        "mlp.2.weight": (32, 32),
        "mlp.2.bias": (32,),
        "mlp.4.weight": (8, 32),
        "mlp.4.bias": (8,),
        "last_layer.weight_g": (40, 1),
        "last_layer.weight_v": (40, 8),
    }
    x = torch.randn(6, 24, dtype=torch.float64)
    outputs = head(x)
    assert len(outputs) == 1
    state = head.state_dict()
    h = F.gelu(x @ state["mlp.0.weight"].T + state["mlp.0.bias"])
    h = F.gelu(h @ state["mlp.2.weight"].T + state["mlp.2.bias"])
    h = h @ state["mlp.4.weight"].T + state["mlp.4.bias"]  # no GELU after DINOv2's bottleneck
    h = h / h.norm(dim=1, keepdim=True)
    prototypes = weight_normed(state["last_layer.weight_g"], state["last_layer.weight_v"])
    torch.testing.assert_close(outputs[0], h @ prototypes.T)


def test_dino_head_logits_are_cosines_and_scale_free():
    # With a unit bottleneck and unit prototypes (weight_g = 1) each logit is a cosine in [-1, 1], unchanged when
    # the bottleneck is scaled; the Matryoshka head has no normalisation, so the same scaling changes its logits.
    head = DINOHead(in_dim=16, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(10, 16) * 100
    logits = head(x)[0]
    assert logits.abs().max() <= 1.0 + 1e-6
    matryoshka = tiny_matryoshka()
    y = torch.randn(3, 64)
    with torch.no_grad():
        dino_before, mrl_before = head(x)[0], matryoshka(y)[-1]
        for layer in (head.mlp[4], matryoshka.mlps[-1][4]):
            layer.weight.mul_(5.0)
            layer.bias.mul_(5.0)
        torch.testing.assert_close(head(x)[0], dino_before)
        assert not torch.allclose(matryoshka(y)[-1], mrl_before)


def test_build_head_kinds():
    dino = build_head("dino", 32, 64, 16, 8, 3)
    assert isinstance(dino, DINOHead) and dino.out_dims == [64]
    mrl = build_head("matryoshka", 32, 64, 16, 8, 2, nesting_list=[8, 32], input_mode="project")
    assert isinstance(mrl, MatryoshkaHead) and mrl.level_dims == [8, 32] and mrl.out_dims == [16, 64]
    assert mrl.input_mode == "project" and len(mrl.mlps[0]) == 4  # nlayers=2: Linear, GELU, Linear, GELU


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "mrl"}, "unknown"),
        ({"kind": "dino", "nesting_list": [8, 32]}, "matryoshka heads only"),
        ({"kind": "matryoshka", "nesting_list": [16, 8]}, "strictly increasing"),
        ({"kind": "matryoshka", "nesting_list": [8, 64]}, r"\[1, in_dim=32\]"),
        ({"kind": "matryoshka", "input_mode": "crop"}, "input_mode"),
        ({"kind": "matryoshka", "nlayers": 0}, "nlayers"),
        ({"kind": "matryoshka", "out_dim": 8}, "raise out_dim"),
    ],
)
def test_build_head_rejects_bad_settings(kwargs, message):
    options = {"in_dim": 32, "out_dim": 64, "hidden_dim": 16, "bottleneck_dim": 8, "nlayers": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        build_head(**options)


def test_l2_normalised_matryoshka_levels_are_dinov2_heads():
    """With l2_norm=True each level is Linear-GELU-Linear-GELU-Linear, L2 norm, weight-normed prototypes (float64)."""
    torch.manual_seed(0)
    head = MatryoshkaHead(32, 64, hidden_dim=16, bottleneck_dim=8, nlayers=3, nesting_list=[8, 32], l2_norm=True)
    head = head.double()
    x = torch.randn(5, 32, dtype=torch.float64)
    outputs = head(x)
    for level, d in enumerate([8, 32]):
        proj_w = head.matryoshka_projections[level].weight
        proj_b = head.matryoshka_projections[level].bias
        h = x[:, :d] @ proj_w.T + proj_b
        mlp = head.mlps[level]
        h = torch.nn.functional.gelu(h @ mlp[0].weight.T + mlp[0].bias)
        h = torch.nn.functional.gelu(h @ mlp[2].weight.T + mlp[2].bias)
        h = h @ mlp[4].weight.T + mlp[4].bias  # no GELU after the bottleneck
        h = h / h.norm(dim=1, keepdim=True)
        last = head.last_layers[level]
        weight = last.weight_g * last.weight_v / last.weight_v.norm(dim=1, keepdim=True)
        assert torch.allclose(outputs[level], h @ weight.T, atol=1e-12)
    assert len(head.mlps[0]) == 5


def test_fan_in_init_keeps_a_narrow_heads_bottleneck_at_unit_scale():
    """The stall's cause (docs/training_dynamics.md): with std .02 a narrow head's bottleneck starts ~1e-4, so the
    biases that AdamW moves by ~lr per step soon decide its direction; std 1/sqrt(fan_in) keeps it near unit scale."""
    torch.manual_seed(0)
    features = F.layer_norm(torch.randn(64, 128), (128,))
    norms = {}
    for init in ("trunc_normal", "fan_in"):
        head = MatryoshkaHead(
            128, 512, hidden_dim=256, bottleneck_dim=64, nesting_list=[8, 128], l2_norm=True, init=init
        )
        with torch.no_grad():
            norms[init] = [
                mlp(proj(features[:, :d])).norm(dim=1).mean().item()
                for d, proj, mlp in zip(head.level_dims, head.matryoshka_projections, head.mlps, strict=True)
            ]
    assert max(norms["trunc_normal"]) < 0.02
    assert min(norms["fan_in"]) > 0.2


def test_unknown_head_init_is_refused():
    with pytest.raises(ValueError, match="head init='xavier'.*fan_in"):
        tiny_matryoshka(init="xavier")
