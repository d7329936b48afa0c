"""Hub, weights registry, key adapters and safe loading (original ``franca/hub/backbones.py``)."""

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from franca.hub import (
    REGISTRY,
    franca_vitb14,
    franca_vitg14,
    franca_vitl14,
    get_weights,
    load_backbone,
    load_checkpoint_file,
    load_multipart_checkpoint,
)
from franca.models.rasa_head import RASAHead
from franca.models.vision_transformer import DinoVisionTransformer
from franca.models.weights import from_release, infer_config, to_release

REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASES = "https://github.com/valeoai/Franca/releases/download"

# The Franca ViT settings of the original hub, written out independently of the hub's own table.
FRANCA_SETTINGS = dict(
    patch_size=14,
    ffn_layer="swiglufused",
    layerscale=1e-5,
    num_register_tokens=0,
    interpolate_offset=0.1,
    interpolate_antialias=False,
)
TINY = dict(embed_dim=128, depth=4, num_heads=2, **FRANCA_SETTINGS)


def tiny_vit(img_size: int = 98, seed: int = 0, **overrides) -> DinoVisionTransformer:
    """A small Franca-style ViT with every parameter randomised at a scale where it matters for the output."""
    torch.manual_seed(seed)
    model = DinoVisionTransformer(img_size=img_size, **{**TINY, **overrides})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
            elif name in ("pos_embed", "cls_token", "mask_token"):
                param.normal_()
    return model.eval()


def features(model: DinoVisionTransformer, images: torch.Tensor, use_rasa_head: bool = False) -> dict:
    with torch.no_grad():
        return model.eval().forward_features(images, use_rasa_head=use_rasa_head)


def assert_same_outputs(model_a, model_b, images):
    out_a, out_b = features(model_a, images), features(model_b, images)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# State-dict names and shapes of the released checkpoints (chunked ``blocks.{c}.{i}`` keys)


def expected_release_keys(dim: int, hidden: int, depth: int, grid: int, chunked: bool) -> dict[str, tuple]:
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid * grid, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
    }
    per_block = {
        "norm1.weight": (dim,),
        "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim),
        "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
        "ls1.gamma": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "mlp.w12.weight": (2 * hidden, dim),
        "mlp.w12.bias": (2 * hidden,),
        "mlp.w3.weight": (dim, hidden),
        "mlp.w3.bias": (dim,),
        "ls2.gamma": (dim,),
    }
    blocks_per_chunk = depth // 4
    for i in range(depth):
        block = f"blocks.{i // blocks_per_chunk}.{i}." if chunked else f"blocks.{i}."
        keys.update({block + name: shape for name, shape in per_block.items()})
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return keys


@pytest.mark.parametrize(
    "entry, dim, hidden, depth, grid, n_tensors",
    [
        (franca_vitb14, 768, 2048, 12, 37, 175),
        (franca_vitl14, 1024, 2736, 24, 37, 343),
        (franca_vitg14, 1536, 4096, 40, 16, 567),
    ],
)
def test_release_key_names_and_shapes(entry, dim, hidden, depth, grid, n_tensors):
    with torch.device("meta"):
        model = entry(pretrained=False)
    flat = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert len(flat) == n_tensors
    assert flat == expected_release_keys(dim, hidden, depth, grid, chunked=False)

    release = to_release(model.state_dict())
    chunked = expected_release_keys(dim, hidden, depth, grid, chunked=True)
    assert {key: tuple(t.shape) for key, t in release.items()} == {"backbone." + k: s for k, s in chunked.items()}
    bare = to_release(model.state_dict(), prefix="")
    assert list(bare) == list(chunked)

    backbone, rasa = from_release({"teacher": release})
    assert rasa == {} and {key: tuple(t.shape) for key, t in backbone.items()} == flat


def test_architecture_is_read_off_the_keys():
    with torch.device("meta"):
        model = franca_vitl14(pretrained=False)
    spec = infer_config(from_release(to_release(model.state_dict()))[0])
    assert (spec.arch, spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size) == ("vit_large", 1024, 24, 16, 14)
    assert (spec.ffn_layer, spec.mlp_ratio, spec.img_size, spec.num_register_tokens) == ("swiglufused", 4.0, 518, 0)

    with torch.device("meta"):
        dinov2_style = DinoVisionTransformer(
            img_size=224, patch_size=16, embed_dim=384, depth=3, num_heads=6, ffn_layer="mlp", num_register_tokens=4
        )
    spec = infer_config(dinov2_style.state_dict())
    assert (spec.arch, spec.num_heads, spec.patch_size, spec.ffn_layer) == (None, 6, 16, "mlp")
    assert (spec.mlp_ratio, spec.num_register_tokens, spec.img_size, spec.depth) == (4.0, 4, 224, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Position-embedding interpolation (original ``interpolate_pos_encoding``) against an independent float64 implementation


def cubic_kernel(distance: float, a: float) -> float:
    d = abs(distance)
    if d <= 1:
        return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return 0.0


def bicubic_resize_axis(grid: np.ndarray, axis: int, scale: float, a: float = -0.75) -> np.ndarray:
    """1-D bicubic resize along ``axis`` with PyTorch's scale_factor semantics (half-pixel, clamped borders)."""
    n_in = grid.shape[axis]
    n_out = math.floor(n_in * scale)
    moved = np.moveaxis(grid, axis, 0)
    out = np.zeros((n_out,) + moved.shape[1:])
    for dst in range(n_out):
        src = (dst + 0.5) / scale - 0.5
        left = math.floor(src)
        frac = src - left
        for k in range(-1, 3):
            out[dst] += cubic_kernel(frac - k, a) * moved[min(max(left + k, 0), n_in - 1)]
    return np.moveaxis(out, 0, axis)


def reference_pos_embed(pos_embed: np.ndarray, height: int, width: int, patch: int = 14) -> np.ndarray:
    """[1, 1+M², D] → [1, 1+h0·w0, D] as the original (scale factors (h0+0.1)/M and (w0+0.1)/M)."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    h0, w0 = height // patch, width // patch
    if h0 * w0 == side * side and height == width:
        return pos_embed
    grid = pos_embed[0, 1:].reshape(side, side, -1)
    grid = bicubic_resize_axis(grid, 0, (h0 + 0.1) / side)
    grid = bicubic_resize_axis(grid, 1, (w0 + 0.1) / side)
    assert grid.shape[:2] == (h0, w0)
    return np.concatenate([pos_embed[:, :1], grid.reshape(1, h0 * w0, -1)], axis=1)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * weight + bias


def reference_forward(state: dict[str, np.ndarray], images: np.ndarray, num_heads: int, patch: int = 14) -> np.ndarray:
    """Float64 forward of the original ViT from a flat state dict: final-norm tokens [B, 1+N, D]."""
    b, c, height, width = images.shape
    h0, w0 = height // patch, width // patch
    patches = images.reshape(b, c, h0, patch, w0, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b, h0 * w0, -1)
    tokens = patches @ state["patch_embed.proj.weight"].reshape(len(state["patch_embed.proj.bias"]), -1).T
    tokens = tokens + state["patch_embed.proj.bias"]
    cls = np.broadcast_to(state["cls_token"], (b, 1, tokens.shape[-1]))
    x = np.concatenate([cls, tokens], axis=1) + reference_pos_embed(state["pos_embed"], height, width, patch)
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    for i in range(depth):
        p = {key[len(f"blocks.{i}.") :]: v for key, v in state.items() if key.startswith(f"blocks.{i}.")}
        y = layer_norm(x, p["norm1.weight"], p["norm1.bias"])
        n, d = y.shape[1], y.shape[2]
        qkv = (y @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).reshape(b, n, 3, num_heads, d // num_heads)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // num_heads)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn = attn / attn.sum(-1, keepdims=True)
        y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + (y @ p["attn.proj.weight"].T + p["attn.proj.bias"]) * p["ls1.gamma"]
        y = layer_norm(x, p["norm2.weight"], p["norm2.bias"])
        gate, value = np.split(y @ p["mlp.w12.weight"].T + p["mlp.w12.bias"], 2, axis=-1)
        y = (gate / (1 + np.exp(-gate)) * value) @ p["mlp.w3.weight"].T + p["mlp.w3.bias"]
        x = x + y * p["ls2.gamma"]
    return layer_norm(x, state["norm.weight"], state["norm.bias"])


@pytest.mark.parametrize("built_at", [518, 224])
@pytest.mark.parametrize("size", [(224, 224), (518, 518), (224, 322)])
@pytest.mark.slow
def test_interpolation_matches_float64_reference(built_at, size):
    model = tiny_vit(img_size=built_at, depth=2)
    state = {key: t.double().numpy() for key, t in model.state_dict().items()}
    height, width = size
    n_tokens = 1 + (height // 14) * (width // 14)

    with torch.no_grad():
        pos = model.interpolate_pos_encoding(torch.zeros(1, n_tokens, TINY["embed_dim"]), height, width)
    expected_pos = reference_pos_embed(state["pos_embed"], height, width)
    # PyTorch computes source coordinates and cubic weights in float32 (≈1e-6 relative error in the coordinate).
    np.testing.assert_allclose(
        pos.detach().double().numpy(), expected_pos, rtol=0, atol=1e-5 * np.abs(expected_pos).max()
    )

    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    out = features(model, images)
    expected = reference_forward(state, images.double().numpy(), TINY["num_heads"])
    np.testing.assert_allclose(out["x_norm_clstoken"].numpy(), expected[:, 0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["x_norm_patchtokens"].numpy(), expected[:, 1:], rtol=0, atol=1e-4)


def test_reference_bicubic_agrees_with_closed_forms():
    """The test's own bicubic keeps constants (any a: partition of unity) and, with a = −0.5, linear ramps."""
    np.testing.assert_allclose(bicubic_resize_axis(np.full((16, 2), 3.0), 0, 37.1 / 16), 3.0, atol=1e-12)
    ramp = np.arange(16, dtype=np.float64)[:, None]
    resized = bicubic_resize_axis(ramp, 0, 37.1 / 16, a=-0.5)
    src = (np.arange(37) + 0.5) / (37.1 / 16) - 0.5
    interior = (src > 1) & (src < 14)
    np.testing.assert_allclose(resized[interior, 0], src[interior], atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Round trips through files in every key convention


def with_training_heads(state: dict) -> dict:
    heads = {
        "dino_head.mlp.0.weight": torch.randn(8, 128),
        "dino_head.last_layer.weight_g": torch.ones(16, 1),
        "ibot_head.mlp.0.weight": torch.randn(8, 128),
    }
    return {**state, **heads}


FORMATS = {
    "v1.0 teacher, backbone. prefix, chunked, training heads": lambda sd: {
        "teacher": with_training_heads(to_release(sd, block_chunks=2))
    },
    "teacher, backbone. prefix, flat": lambda sd: {"teacher": {"backbone." + k: v for k, v in sd.items()}},
    "model wrapper, module.backbone. prefix, chunked": lambda sd: {
        "model": {"module." + k: v for k, v in to_release(sd, block_chunks=4).items()}
    },
    "v1.1 backbone-only, chunked, no prefix": lambda sd: to_release(sd, prefix=""),
    "our flat state dict": lambda sd: dict(sd),
}


@pytest.mark.parametrize("layout", list(FORMATS))
def test_round_trip_in_every_key_convention(tmp_path, layout):
    source = tiny_vit()
    path = tmp_path / "checkpoint.pth"
    torch.save(FORMATS[layout](source.state_dict()), path)
    loaded = load_backbone(str(path))
    assert loaded.img_size == 98 and loaded.rasa_head is None
    assert_same_outputs(source, loaded, torch.randn(2, 3, 70, 112))


def test_chunk_remap_uses_the_global_block_index():
    sd = {"blocks.1.2.norm1.weight": torch.zeros(1), "backbone.blocks.3.norm1.weight": torch.ones(1)}
    backbone, _ = from_release(sd)
    assert set(backbone) == {"blocks.2.norm1.weight", "blocks.3.norm1.weight"}
    release = to_release({f"blocks.{i}.ls1.gamma": torch.zeros(1) for i in range(12)}, block_chunks=4)
    assert [k.split(".")[2] for k in release] == ["0", "0", "0", "1", "1", "1", "2", "2", "2", "3", "3", "3"]


def test_safetensors_file_and_export_folder(tmp_path):
    from safetensors.torch import save_file

    source = tiny_vit(img_size=56)
    save_file(source.state_dict(), str(tmp_path / "bare.safetensors"))
    assert_same_outputs(source, load_backbone(tmp_path / "bare.safetensors"), torch.randn(1, 3, 42, 84))

    folder = tmp_path / "export"
    folder.mkdir()
    save_file(source.state_dict(), str(folder / "model.safetensors"))
    config = {"arch": None, "img_size": 56, **TINY}
    (folder / "config.json").write_text(json.dumps(config))
    assert_same_outputs(source, load_backbone(folder), torch.randn(1, 3, 42, 84))


@pytest.fixture(scope="module")
def vitb14_checkpoint(tmp_path_factory):
    """A random Franca ViT-B/14 (224 grid) saved in the v1.0 release layout, with training heads."""
    source = franca_vitb14(pretrained=False, img_size=224).eval()
    path = tmp_path_factory.mktemp("vitb14") / "franca_vitb14_local.pth"
    torch.save({"teacher": with_training_heads(to_release(source.state_dict()))}, path)
    return source, path


@pytest.mark.slow
def test_hub_entry_through_torch_hub_load(vitb14_checkpoint):
    source, path = vitb14_checkpoint
    loaded = torch.hub.load(str(REPO_ROOT), "franca_vitb14", source="local", weights=str(path))
    assert loaded.img_size == 224 and loaded.embed_dim == 768
    assert_same_outputs(source, loaded, torch.randn(1, 3, 56, 70))

    with pytest.raises(ValueError, match=r"img_size=518 conflicts .*built for 224px.*modify_ckpt_highres"):
        franca_vitb14(weights=str(path), img_size=518)


def test_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"teacher": to_release(tiny_vit().state_dict())}, path)
    with pytest.raises(ValueError) as info:
        franca_vitb14(weights=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "missing keys" in message and "blocks.4." in message
    assert "shape mismatches" in message and "cls_token: checkpoint (1, 1, 128) vs model (1, 1, 768)" in message
    assert "embed_dim=128, depth=4" in message and "load_backbone" in message


# ---------------------------------------------------------------------------------------------------------------------
# RASA heads: 8- and 9-pre-layer files, embedded tensors, wrong dimension


def gram_schmidt_removal(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    for w in weights:
        a = w[0] / np.linalg.norm(w[0])
        b = w[1] / np.linalg.norm(w[1])
        b = b - (b @ a) * a
        b = b / np.linalg.norm(b)
        x = x - np.outer(x @ a, a) - np.outer(x @ b, b)
    return x


@pytest.mark.parametrize("n_pre_layers, prefix", [(8, ""), (9, "rasa_head.")])
def test_rasa_files_with_8_or_9_pre_layers(tmp_path, n_pre_layers, prefix):
    source = tiny_vit()
    backbone_path, rasa_path = tmp_path / "backbone.pth", tmp_path / "rasa.pth"
    torch.save({"teacher": to_release(source.state_dict())}, backbone_path)
    torch.manual_seed(3)
    head = RASAHead(128, n_pos_layers=n_pre_layers)
    torch.save({prefix + k: v for k, v in head.state_dict().items()}, rasa_path)

    loaded = load_backbone(str(backbone_path), rasa_weights=str(rasa_path))
    assert loaded.rasa_head.n_pos_layers == n_pre_layers
    images = torch.randn(2, 3, 70, 98)
    out = features(loaded, images, use_rasa_head=True)
    weights = [head.state_dict()[f"pre_pos_layers.{j}.weight"].double().numpy() for j in range(n_pre_layers)]
    weights.append(head.state_dict()["pos_pred.weight"].double().numpy())
    patches = features(source, images)["x_norm_patchtokens"].double().numpy()
    expected = np.stack([gram_schmidt_removal(p, weights) for p in patches])
    np.testing.assert_allclose(out["patch_token_rasa"].numpy(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], features(source, images)["x_norm_patchtokens"])


def test_embedded_rasa_tensors_are_used_only_on_request(tmp_path):
    source = tiny_vit()
    head = RASAHead(128, n_pos_layers=9)
    state = {**source.state_dict(), **{"rasa_head." + k: v for k, v in head.state_dict().items()}}
    path = tmp_path / "with_rasa.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in state.items()}}, path)
    assert load_backbone(str(path)).rasa_head is None
    loaded = load_backbone(str(path), use_rasa_head=True)
    for key, value in head.state_dict().items():
        torch.testing.assert_close(loaded.rasa_head.state_dict()[key], value, rtol=0, atol=0)


def test_rasa_errors(tmp_path):
    backbone_path, rasa_path = tmp_path / "backbone.pth", tmp_path / "rasa96.pth"
    torch.save(tiny_vit().state_dict(), backbone_path)
    torch.save(RASAHead(96, n_pos_layers=8).state_dict(), rasa_path)
    with pytest.raises(ValueError, match=r"rasa96.pth is for embedding size 96, but the backbone's is 128"):
        load_backbone(str(backbone_path), rasa_weights=str(rasa_path))
    with pytest.raises(ValueError, match=r"use_rasa_head=True, but no RASA head is available.*rasa_weights="):
        load_backbone(str(backbone_path), use_rasa_head=True)
    with torch.device("meta"), pytest.raises(ValueError, match=r"no RASA head was released for vit_base .*'IN21K'"):
        franca_vitb14(pretrained=False, rasa_weights="IN21K_224")
    with torch.device("meta"), pytest.raises(ValueError, match=r"pretrained=False with use_rasa_head=True needs"):
        franca_vitb14(pretrained=False, use_rasa_head=True)


# ---------------------------------------------------------------------------------------------------------------------
# Safe loading: pickles, downloads, hashes, split archives


class RunsCode:
    """Unpickling this object would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "code_was_executed"
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1), "payload": RunsCode(marker)}}, path)
    with pytest.raises(RuntimeError, match=r"refusing to load .*evil.pth.*could run arbitrary code"):
        load_backbone(str(path))
    assert not marker.exists()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch.hub cache and a fake ``download_url_to_file`` serving files from a dict URL → bytes."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served: dict[str, bytes | Path] = {}
    requested: list[str] = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        requested.append(url)
        if url not in served:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        if isinstance(served[url], Path):
            shutil.copyfile(served[url], dst)
        else:
            Path(dst).write_bytes(served[url])

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    return served, requested, tmp_path / "torch_home" / "hub" / "checkpoints"


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_url_without_network_names_the_url(hub_cache):
    url = "https://example.org/weights/franca_custom.pth"
    with pytest.raises(RuntimeError) as info:
        load_backbone(url)
    assert url in str(info.value) and 'weights="/path/to/franca_custom.pth"' in str(info.value)
    with torch.device("meta"), pytest.raises(RuntimeError, match=r"rasa_weights=\"/path/to/franca_vitb14_In21K_rasa"):
        franca_vitb14(pretrained=False, rasa_weights="IN21K")


def test_sha256_is_verified(hub_cache):
    served, _, cache = hub_cache
    url = "https://example.org/small.pth"
    payload = saved_bytes({"w": torch.arange(3.0)})
    served[url] = payload
    with pytest.raises(RuntimeError, match=r"SHA-256 mismatch for https://example.org/small.pth"):
        load_checkpoint_file(url, sha256="0" * 64)
    assert not (cache / "small.pth").exists()

    good = hashlib.sha256(payload).hexdigest()
    torch.testing.assert_close(load_checkpoint_file(url, sha256=good)["w"], torch.arange(3.0))
    assert (cache / "small.pth").is_file()
    with pytest.raises(RuntimeError, match=r"SHA-256 mismatch .*check its source"):
        load_checkpoint_file(cache / "small.pth", sha256="f" * 64)
    assert (cache / "small.pth").is_file(), "a local file with a wrong digest is refused, not deleted"
    assert (cache / "small.pth.sha256").read_text().split()[0] == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(load_checkpoint_file(url)["w"], torch.arange(3.0))


@pytest.mark.slow
def test_registry_name_downloads_release_and_rasa(hub_cache, vitb14_checkpoint):
    served, requested, _ = hub_cache
    source, path = vitb14_checkpoint
    torch.manual_seed(5)
    head = RASAHead(768, n_pos_layers=8)
    served[f"{RELEASES}/v1.0.0/franca_vitb14_In21K.pth"] = path
    served[f"{RELEASES}/v1.0.0/franca_vitb14_In21K_rasa.pth"] = saved_bytes(head.state_dict())
    with pytest.warns(UserWarning, match="no SHA-256 is recorded"):
        loaded = load_backbone("franca_vitb14:IN21K", use_rasa_head=True)
    assert requested == [
        f"{RELEASES}/v1.0.0/franca_vitb14_In21K.pth",
        f"{RELEASES}/v1.0.0/franca_vitb14_In21K_rasa.pth",
    ]
    assert loaded.rasa_head.n_pos_layers == 8
    torch.testing.assert_close(loaded.rasa_head.pos_pred.weight, head.pos_pred.weight, rtol=0, atol=0)
    assert_same_outputs(source, loaded, torch.randn(1, 3, 42, 56))


def test_split_release_is_joined_and_extracted(hub_cache):
    served, _, cache = hub_cache
    archive = io.BytesIO()
    payload = saved_bytes({"teacher": {"backbone.cls_token": torch.ones(1, 1, 4)}})
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("release/franca_test.pth")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    data = archive.getvalue()
    cut = len(data) // 3
    urls = [f"https://example.org/franca_test_chunked.tar.gz.part_{s}" for s in ("aa", "ab", "ac")]
    for url, part in zip(urls, (data[:cut], data[cut : 2 * cut], data[2 * cut :]), strict=True):
        served[url] = part
    with pytest.warns(UserWarning, match="no SHA-256"):
        loaded = load_multipart_checkpoint(urls, "franca_test.pth")
    torch.testing.assert_close(loaded["teacher"]["backbone.cls_token"], torch.ones(1, 1, 4))
    assert (cache / "franca_test.pth").is_file()


def test_split_release_with_unsafe_member_is_refused(hub_cache, tmp_path):
    served, _, _ = hub_cache
    archive = io.BytesIO()
    payload = saved_bytes({"w": torch.zeros(1)})
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.pth")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    served["https://example.org/bad.part_aa"] = archive.getvalue()
    with pytest.warns(UserWarning), pytest.raises(tarfile.FilterError):
        load_multipart_checkpoint(["https://example.org/bad.part_aa"], "bad.pth")
    assert not list(tmp_path.rglob("escaped.pth"))


# ---------------------------------------------------------------------------------------------------------------------
# Registry: the assets of the v1.0.0 and v1.1.0 releases

RELEASE_TABLE = {
    ("vit_base", "IN21K"): (518, "v1.0.0/franca_vitb14_In21K.pth", "v1.0.0/franca_vitb14_In21K_rasa.pth"),
    ("vit_base", "IN21K_224"): (224, "v1.1.0/franca_vitb14_In21K_224.pth", None),
    ("vit_base", "DINOV2_IN21K"): (224, "v1.1.0/franca_vitb14_Dinov2_In21K.pth", None),
    ("vit_base", "DINOV2_IN21K_518"): (
        518,
        "v1.1.0/franca_vitb14_Dinov2_In21K_518.pth",
        "v1.1.0/franca_vitb14_Dinov2_In21K_518_rasa.pth",
    ),
    ("vit_large", "LAION"): (518, "v1.0.0/franca_vitl14_Laion600M.pth", "v1.0.0/franca_vitl14_Laion600M_rasa.pth"),
    ("vit_large", "LAION_224"): (224, "v1.1.0/franca_vitl14_Laion600M_224.pth", None),
    ("vit_large", "DINOV2_IN21K"): (224, "v1.1.0/franca_vitl14_Dinov2_In21K.pth", None),
    ("vit_large", "DINOV2_IN21K_518"): (
        518,
        "v1.1.0/franca_vitl14_Dinov2_In21K_518.pth",
        "v1.1.0/franca_vitl14_Dinov2_In21K_518_rasa.pth",
    ),
    ("vit_large", "LAION_518"): (518, "v1.1.0/franca_vitl14_Laion_518.pth", "v1.1.0/franca_vitl14_Laion_518_rasa.pth"),
}


def test_registry_matches_the_release_tables():
    assert set(REGISTRY) == set(RELEASE_TABLE) | {("vit_giant2", "LAION")}
    for (arch, name), (img_size, asset, rasa) in RELEASE_TABLE.items():
        entry = get_weights(arch, name)
        assert (entry.img_size, entry.urls) == (img_size, [f"{RELEASES}/{asset}"])
        assert (entry.rasa.url if entry.rasa else None) == (rasa and f"{RELEASES}/{rasa}")
    giant = get_weights("vit_giant2", "laion")
    assert giant.img_size == 224 and giant.checkpoint_file == "franca_vitg14_Laion600M.pth"
    assert giant.urls == [
        f"{RELEASES}/v1.0.0/franca_vitg14_Laion600M_chunked.tar.gz.part_{s}" for s in ("aa", "ab", "ac")
    ]
    assert giant.rasa.url == f"{RELEASES}/v1.0.0/franca_vitg14_Laion600M_rasa.pth"


@pytest.mark.parametrize(
    "arch, name, listed",
    [
        ("vit_large", "IN21K", "'LAION_518'"),
        ("vit_base", "LAION", "'DINOV2_IN21K_518'"),
        ("vit_giant2", "IN21K", "'LAION'"),
    ],
)
def test_unreleased_combinations_list_the_available_names(arch, name, listed):
    with pytest.raises(ValueError, match=rf"weights '{name}' were not released for {arch}; available .*{listed}"):
        get_weights(arch, name)


def test_random_init_uses_the_registry_image_size():
    with torch.device("meta"):
        assert franca_vitl14(pretrained=False, weights="LAION_224").pos_embed.shape[1] == 257
        assert franca_vitb14(pretrained=False).pos_embed.shape[1] == 1370
    with pytest.raises(ValueError, match=r"give arch= too, or use a hub name such as 'franca_vitb14:IN21K'"):
        load_backbone("in21k")


def test_the_upstream_card_name_in21k_518_is_an_alias():
    from franca.hub.registry import is_weights_name, release_of

    assert is_weights_name("in21k_518")
    assert get_weights("vit_base", "IN21K_518") is get_weights("vit_base", "IN21K")
    assert release_of("franca_vitb14:IN21K_518") is get_weights("vit_base", "IN21K")
    with pytest.raises(ValueError, match=r"weights 'IN21K_518' \(another name of IN21K\) were not released for vit_l"):
        get_weights("vit_large", "IN21K_518")
    with torch.device("meta"):
        assert franca_vitb14(pretrained=False, weights="IN21K_518").pos_embed.shape[1] == 1370
    assert release_of(get_weights("vit_large", "LAION").urls[0]).name == "LAION"
    assert release_of("IN21K_224", arch="vit_base").name == "IN21K_224"
    assert release_of("/some/own/teacher_checkpoint.pth") is None
