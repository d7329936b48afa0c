"""transformers and timm folders out and in (franca.export.hf, franca.interop): every released architecture's shape
(depth cut to one block) and the quickstart model export to both formats and load in the libraries with their
tokens equal to ours at the native size; at other sizes the libraries equal ours run with their own position
interpolation (the documented difference); DINOv2 folders of both libraries load into franca; the errors."""

import subprocess
import sys

import pytest
import torch
from interop_helpers import max_differences, randomise_

from franca.export.hf import export_hf
from franca.hub import load_backbone
from franca.interop.model_card import Licence
from franca.interop.renaming import ForeignFormatError
from franca.models import ViTConfig
from franca.models.vision_transformer import DinoVisionTransformer

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from timm.models._hub import save_for_hf  # noqa: E402

# Released Franca architectures at one block, on a 4×4 position grid, and the quickstart model (configs/train/
# quickstart.yaml: width 128, 4 blocks, 4 heads, patch 4, 28 px, LayerScale 0.1).
SHAPES = {
    "B/14": ViTConfig.for_arch("vit_base", depth=1, img_size=56),
    "L/14": ViTConfig.for_arch("vit_large", depth=1, img_size=56),
    "g/14": ViTConfig.for_arch("vit_giant2", depth=1, img_size=56),
    "quickstart": ViTConfig.for_arch(
        "vit_tiny", embed_dim=128, depth=4, num_heads=4, patch_size=4, img_size=28, layerscale=0.1
    ),
    "B/14+registers": ViTConfig.for_arch("vit_base", depth=1, img_size=56, num_register_tokens=4),
}
FORMATS = ("transformers", "timm")
NATIVE_TOLERANCE = 1e-5
OWN = Licence("apache-2.0")


def our_model(config: ViTConfig, seed: int = 0) -> DinoVisionTransformer:
    return randomise_(DinoVisionTransformer(config), seed).eval()


def library_tokens(fmt: str, folder):
    """The folder loaded by its library, as images → normed tokens [B, 1 + R + N, D]."""
    if fmt == "transformers":
        model = transformers.AutoModel.from_pretrained(folder).eval()
        return model, lambda x: model(pixel_values=x).last_hidden_state
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    return model, model.forward_features


def library_interpolation(fmt: str, config: ViTConfig) -> ViTConfig:
    """What the library does at other sizes, as franca settings: ``size=`` resize (no offset), antialiased in timm
    and in transformers' registers model (their ``interpolate_pos_encoding`` / ``resample_abs_pos_embed``)."""
    antialias = fmt == "timm" or config.num_register_tokens > 0
    return config.with_overrides(interpolate_offset=0.0, interpolate_antialias=antialias)


@torch.no_grad()
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "shape", [name if name == "quickstart" else pytest.param(name, marks=pytest.mark.slow) for name in SHAPES]
)
def test_export_round_trip(shape, fmt, tmp_path):
    config = SHAPES[shape]
    model = our_model(config)
    export_hf(model, tmp_path, fmt, OWN, source="test", log=lambda _: None)
    library_model, theirs = library_tokens(fmt, tmp_path)
    expected_class = "Dinov2WithRegistersModel" if config.num_register_tokens else "Dinov2Model"
    assert type(library_model).__name__ == (expected_class if fmt == "transformers" else "VisionTransformer")
    native, other = config.img_size, config.img_size + 2 * config.patch_size
    x = torch.randn(2, 3, native, native, generator=torch.Generator().manual_seed(1))
    tokens = theirs(x)
    assert max(max_differences(tokens, model.forward_features(x), config.num_register_tokens)) <= NATIVE_TOLERANCE
    # another size: the library equals franca run with the library's interpolation, not franca's own
    y = torch.randn(2, 3, other, other, generator=torch.Generator().manual_seed(2))
    as_library = DinoVisionTransformer(library_interpolation(fmt, config))
    as_library.load_state_dict(model.state_dict())
    tokens = theirs(y)
    assert max(max_differences(tokens, as_library.eval().forward_features(y), config.num_register_tokens)) <= 1e-5
    assert max(max_differences(tokens, model.forward_features(y), config.num_register_tokens)) > 1e-4
    # back into franca: the same configuration and the same outputs at both sizes
    loaded = load_backbone(tmp_path).eval()
    assert loaded.config == config.inference()
    for images in (x, y):
        torch.testing.assert_close(
            loaded.forward_features(images)["x_prenorm"], model.forward_features(images)["x_prenorm"], atol=1e-6, rtol=0
        )


# ---------------------------------------------------------------------------------------------------------------------
# DINOv2 folders written by the libraries


def transformers_dinov2(folder, registers: int, swiglu: bool):
    cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    extra = {"num_register_tokens": registers} if registers else {}
    config = cls(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        use_swiglu_ffn=swiglu,
        **extra,
    )
    model_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    model = randomise_(model_cls(config)).eval()
    model.save_pretrained(folder)
    return lambda x: model(pixel_values=x).last_hidden_state


def timm_dinov2(folder, name: str, **overrides):
    model = timm.create_model(
        name, pretrained=False, num_classes=0, img_size=56, depth=2, dynamic_img_size=True, **overrides
    )
    model = randomise_(model).eval()
    save_for_hf(model, folder)
    return model.forward_features


@torch.no_grad()
@pytest.mark.parametrize(
    "make, registers",
    [
        (lambda folder: transformers_dinov2(folder, 0, swiglu=False), 0),
        (lambda folder: transformers_dinov2(folder, 4, swiglu=True), 4),
        (lambda folder: timm_dinov2(folder, "vit_small_patch14_dinov2"), 0),
        (lambda folder: timm_dinov2(folder, "vit_small_patch14_reg4_dinov2"), 4),
        (
            lambda folder: timm_dinov2(
                folder, "vit_giant_patch14_dinov2", embed_dim=64, num_heads=4, mlp_ratio=352.5 / 64
            ),
            0,
        ),
    ],
    ids=["transformers", "transformers-registers-swiglu", "timm", "timm-registers", "timm-swiglu"],
)
def test_dinov2_folders_load_with_the_library_outputs_at_every_size(make, registers, tmp_path):
    theirs = make(tmp_path)
    ours = load_backbone(tmp_path).eval()
    assert ours.num_register_tokens == registers and ours.config.interpolate_offset == 0.0
    for size in ((56, 56), (84, 70)):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        tokens = theirs(x)
        assert tokens.abs().max() > 0.5
        assert max(max_differences(tokens, ours.forward_features(x), registers)) <= 1e-5, size


def test_an_export_initialises_student_pretrained_weights(tiny_config, tmp_path):
    from franca.train import train as trainer
    from franca.train.ssl_meta_arch import SSLMetaArch

    args = ["--config-file", str(tiny_config), "--output-dir", str(tmp_path / "run")]
    cfg, _ = trainer.setup_run(trainer.get_args_parser().parse_args(args))
    student = SSLMetaArch(cfg).student["backbone"]
    source = our_model(student.config.inference())
    export_hf(source, tmp_path / "hf", "transformers", OWN, log=lambda _: None)
    cfg.student.pretrained_weights = str(tmp_path / "hf")
    model = SSLMetaArch(cfg)
    trainer.load_pretrained(cfg, model)
    for name in ("student", "teacher"):
        own = getattr(model, name)["backbone"].state_dict()
        assert all(torch.equal(own[key], value) for key, value in source.state_dict().items())


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_exported_folder_gives_the_model_its_image_decoding_back(fmt, tmp_path):
    model = our_model(SHAPES["quickstart"])
    model.input_decoding = {"alpha_background": "black", "image_max_value": 4095.0}
    export_hf(model, tmp_path / "hf", fmt, OWN, log=lambda _: None)
    assert load_backbone(tmp_path / "hf").input_decoding == model.input_decoding
    model.input_decoding = None
    export_hf(model, tmp_path / "plain", fmt, OWN, log=lambda _: None)
    assert load_backbone(tmp_path / "plain").input_decoding is None


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_library_names_the_extra(monkeypatch, tmp_path):
    model = our_model(SHAPES["quickstart"])
    export_hf(model, tmp_path / "hf", "transformers", OWN, log=lambda _: None)
    export_hf(model, tmp_path / "timm", "timm", OWN, log=lambda _: None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    for fmt, extra in (("transformers", "hf"), ("timm", "timm")):
        with pytest.raises(ImportError, match=rf"needs the '{fmt}' package.*pip install 'franca\[{extra}\]'"):
            export_hf(model, tmp_path / "new", fmt, OWN, log=lambda _: None)
        with pytest.raises(ImportError, match=rf"reading the {fmt} folder .*pip install 'franca\[{extra}\]'"):
            load_backbone(tmp_path / ("hf" if fmt == "transformers" else "timm"))


@pytest.mark.slow
def test_the_core_imports_neither_library():
    code = (
        "import sys, franca, franca.hub, franca.interop.folders; "
        "print(sorted(m for m in ('transformers', 'timm', 'huggingface_hub') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_folders_of_other_architectures_are_refused(tmp_path):
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
        )
    )
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ForeignFormatError, match=r"is a transformers 'vit' model; franca reads dinov2, .*dinov3_vit"):
        load_backbone(tmp_path / "vit")
    save_for_hf(timm.create_model("resnet18", pretrained=False, num_classes=0), tmp_path / "resnet")
    with pytest.raises(ForeignFormatError, match=r"is a timm ResNet; franca reads DINOv2-style VisionTransformer"):
        load_backbone(tmp_path / "resnet")
    qk_norm = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, qk_norm=True, num_classes=0)
    save_for_hf(qk_norm, tmp_path / "qknorm")
    with pytest.raises(ForeignFormatError, match=r"the timm model has a query norm \(LayerNorm\)"):
        load_backbone(tmp_path / "qknorm")
    classifier = transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    )
    classifier.save_pretrained(tmp_path / "classifier")
    with pytest.raises(ForeignFormatError, match=r"holds tensors this backbone layout does not have: \['classifier"):
        load_backbone(tmp_path / "classifier")


def test_exports_franca_cannot_write_are_refused(tmp_path):
    rope = our_model(
        ViTConfig(embed_dim=64, depth=1, num_heads=4, patch_size=16, img_size=32, position_encoding="rope")
    )
    with pytest.raises(ForeignFormatError, match="exporting a RoPE \\(DINOv3\\) backbone is not supported"):
        export_hf(rope, tmp_path / "rope", "timm", OWN, log=lambda _: None)
    odd = our_model(ViTConfig(embed_dim=64, depth=1, num_heads=4, img_size=28, mlp_ratio=2.5))
    with pytest.raises(ForeignFormatError, match="takes an integer mlp_ratio.*export it with --format timm"):
        export_hf(odd, tmp_path / "odd", "transformers", OWN, log=lambda _: None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"already holds \['pytorch_model.bin'\].*choose an empty folder"):
        export_hf(our_model(SHAPES["quickstart"]), tmp_path / "busy", "timm", OWN, log=lambda _: None)
