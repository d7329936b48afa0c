"""The shared surface of the evaluation commands: every command runs at the size its checkpoint was trained at
without size flags, every results file says what it measured, old flag names still work, one feature read-out."""

import hashlib
import json

import pytest
import torch
from eval_data import make_photo_folders, make_tile_segfolder
from PIL import Image
from skimage import data as skdata

from franca import __version__, demo
from franca.eval import hummingbird, knn, linear, linear_seg, log_regression, matryoshka, ood, pca
from franca.eval.lib import common
from franca.eval.lib.common import CLASSIFICATION_PROTOCOLS, default_num_workers, resolve_image_size
from franca.eval.lib.models import FeatureModel, read_out
from franca.eval.lib.provenance import folder_sha256, resolve_weights_file
from franca.models.vision_transformer import build_vit

TRAINED_SIZE, PATCH = 28, 4
LOADER = ["--batch-size", "8", "--num-workers", "0"]
LINEAR_OPTIONS = (
    "--epochs 1 --iterations-per-epoch 2 --train-batch-size 4 --learning-rates 0.01 --n-last-blocks 1 "
    "--precompute-features"
)
METADATA_KEYS = {"command", "franca_version", "git_revision", "weights", "rasa_weights", "datasets", "sizes", "seed"}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> str:
    """A random patch-4 ViT trained at 28 px, in the release format ``{"teacher": {"backbone.<key>": ...}}``."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny", depth=1, patch_size=PATCH, img_size=TRAINED_SIZE)
    path = tmp_path_factory.mktemp("export") / "teacher_checkpoint.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in model.state_dict().items()}}, path)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[str, str]:
    return make_photo_folders(tmp_path_factory.mktemp("photos"), n_train=4, n_val=2)


@pytest.fixture(scope="module")
def segfolder(tmp_path_factory) -> str:
    return str(make_tile_segfolder(tmp_path_factory.mktemp("seg"), tile=16, n_train=2, n_val=1))


def classification_commands(train: str, val: str) -> dict:
    """Each classification command with its cheapest settings (no size flags)."""
    datasets = ["--train-dataset", train, "--val-dataset", val]
    return {
        "knn": (knn, datasets + ["--nb-knn", "2"]),
        "linear": (linear, datasets + LINEAR_OPTIONS.split()),
        "log_regression": (log_regression, datasets + ["--c-grid-size", "2", "--max-iter", "20", "--backend", "torch"]),
        "matryoshka": (matryoshka, datasets + ["--nb-knn", "2", "--dims", "192", "96"]),
        "ood": (
            ood,
            ["--train-dataset", train, "--test-dataset", val, "--ood-dataset", val, "--knn-k", "2", "--no-probe"],
        ),
    }


def dense_commands(seg_root: str, image: str) -> dict:
    datasets = ["--train-dataset", f"SegFolder:root={seg_root}:split=train"]
    datasets += ["--val-dataset", f"SegFolder:root={seg_root}:split=val"]
    return {
        "hummingbird": (hummingbird, datasets + ["--augmentation-epochs", "0", "--nn-backend", "torch"]),
        "linear_seg": (linear_seg, datasets + ["--epochs", "1"]),
        "pca": (pca, ["--images", image]),
    }


@pytest.mark.slow
def test_every_command_runs_at_the_trained_size_and_records_what_it_measured(
    tiny_export, photos, segfolder, tmp_path, capsys
):
    image = tmp_path / "rocket.png"
    Image.fromarray(skdata.rocket()[::8, ::8]).save(image)
    commands = {**classification_commands(*photos), **dense_commands(segfolder, str(image))}
    weights_sha256 = hashlib.sha256(open(tiny_export, "rb").read()).hexdigest()
    for name, (module, argv) in commands.items():
        out = tmp_path / name
        module.main(["--weights", tiny_export, "--output-dir", str(out), *LOADER, *argv])
        printed = capsys.readouterr().out
        assert f"sizes: image {TRAINED_SIZE}x{TRAINED_SIZE} (the checkpoint's img_size)" in printed, name
        metadata = json.loads((out / f"results_eval_{name}.json").read_text())["metadata"]
        assert METADATA_KEYS <= set(metadata) and metadata["wall_time_s"] >= 0, name
        assert metadata["command"].startswith(f"python -m franca.eval.{name} --weights {tiny_export}"), name
        assert metadata["franca_version"] == __version__
        assert metadata["weights"] == {"source": tiny_export, "path": tiny_export, "sha256": weights_sha256}, name
        assert metadata["rasa_weights"] is None and metadata["seed"] == 0
        assert metadata["sizes"]["image_size"] == [TRAINED_SIZE, TRAINED_SIZE], name
        assert all(isinstance(v, (str, list)) for v in metadata["datasets"].values()) and metadata["datasets"], name
        if name in classification_commands("", ""):
            assert metadata["sizes"]["resize_size"] == round(TRAINED_SIZE * 256 / 224) == 32
    seg = json.loads((tmp_path / "linear_seg" / "results_eval_linear_seg.json").read_text())
    assert seg["protocol"]["input_size"] == [TRAINED_SIZE, TRAINED_SIZE] and seg["protocol"]["name"] == "franca"
    assert seg["metadata"]["sizes"]["eval_mask_size"] == [TRAINED_SIZE, TRAINED_SIZE]  # 100 px capped at the input


def test_old_flag_names_still_work_and_print_a_note(tiny_export, photos, tmp_path, capsys):
    train, val = photos
    out = tmp_path / "knn"
    argv = ["--weights", tiny_export, "--out", str(out), "--crop-size", "24", "--resize-size", "30", *LOADER]
    knn.main(argv + ["--train-dataset", train, "--val-dataset", val, "--nb-knn", "2"])
    captured = capsys.readouterr()
    assert "note: --out is deprecated; use --output-dir" in captured.err
    assert "note: --crop-size is deprecated; use --image-size" in captured.err
    assert "note: --resize-size is deprecated" in captured.err
    sizes = "sizes: image 24x24 (--image-size), resize shorter side to 30; decoding alpha background white"
    assert sizes in captured.out
    metadata = json.loads((out / "results_eval_knn.json").read_text())["metadata"]
    assert metadata["sizes"] == {"image_size": [24, 24], "image_size_from": "--image-size", "resize_size": 30}
    parser = pca.get_args_parser()
    args = parser.parse_args(["--weights", "w", "--output-dir", "o", "--images", "x", "--input-size", "32", "48"])
    assert args.image_size == [32, 48] and "--input-size is deprecated" in capsys.readouterr().err


def test_demo_follows_the_checkpoint_size_and_keeps_its_old_flags(tiny_export, tmp_path, capsys):
    shapes = demo.main(["--weights", tiny_export, "--output-dir", str(tmp_path)])
    assert shapes["x_norm_patchtokens"] == (1, (TRAINED_SIZE // PATCH) ** 2, 192)
    side = TRAINED_SIZE * 8  # 28 px panels enlarged 8x (nearest) to at least 224 px
    width, height = Image.open(tmp_path / demo.PICTURE_NAME).size
    assert width >= 2 * side and side < height < side + 40
    assert "sizes: image 28x28 (the checkpoint's img_size)" in capsys.readouterr().out
    demo.main(["--weights", tiny_export, "--size", "16", "--out", str(tmp_path / "old.png")])
    assert side < Image.open(tmp_path / "old.png").size[1] < side + 40  # 16 px enlarged 14x
    assert "--size is deprecated" in capsys.readouterr().err


def test_sizes_from_the_model_a_named_protocol_or_the_flag():
    vit = build_vit("vit_tiny", depth=1, patch_size=PATCH, img_size=TRAINED_SIZE)
    assert resolve_image_size(None, None, None, vit) == ((28, 28), "the checkpoint's img_size")
    assert resolve_image_size(None, "dinov2", CLASSIFICATION_PROTOCOLS, vit) == ((224, 224), "protocol dinov2")
    assert resolve_image_size([32, 16], "dinov2", CLASSIFICATION_PROTOCOLS, vit) == ((32, 16), "--image-size")
    with pytest.raises(ValueError, match="not divisible by the backbone's patch size 4"):
        resolve_image_size([30], None, None, vit)
    assert common.classification_resize(224) == 256 and common.classification_resize(28) == 32


@pytest.mark.parametrize(("cpus", "workers"), [(None, 0), (1, 0), (2, 1), (3, 2), (64, 4)])
def test_default_workers_fit_the_machine(monkeypatch, cpus, workers):
    monkeypatch.setattr(common.os, "cpu_count", lambda: cpus)
    assert default_num_workers() == workers


def test_one_feature_read_out():
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", depth=1, patch_size=PATCH, img_size=TRAINED_SIZE).eval()
    x = torch.randn(3, 3, TRAINED_SIZE, TRAINED_SIZE)
    with torch.no_grad():
        out = vit.forward_features(x)
        cls, patches = out["x_norm_clstoken"].double(), out["x_norm_patchtokens"].double()
        n = patches.shape[1]
        mean_patch = torch.stack([sum(patches[i, j] for j in range(n)) / n for i in range(len(x))])
        torch.testing.assert_close(FeatureModel(vit)(x).double(), cls)
        torch.testing.assert_close(FeatureModel(vit, readout="mean_patch")(x).double(), mean_patch)
        both = FeatureModel(vit, readout="cls_mean_patch")(x).double()
        torch.testing.assert_close(both, torch.cat([cls, mean_patch], dim=1))
    rasa = {"patch_token_rasa": torch.arange(12.0).reshape(1, 4, 3)}
    assert read_out(rasa, "rasa_mean_patch").tolist() == [[4.5, 5.5, 6.5]]
    with pytest.raises(ValueError, match="read-out 'max' is unknown"):
        FeatureModel(vit, readout="max")


def test_weights_are_identified_by_their_bytes(tmp_path, monkeypatch):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    line = f"model.safetensors {hashlib.sha256(b'weights').hexdigest()}\n"
    assert folder_sha256(folder) == hashlib.sha256(line.encode()).hexdigest()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = resolve_weights_file("franca_vitb14")
    assert cached.parent == tmp_path / "torch" / "hub" / "checkpoints" and cached.suffix == ".pth"
    assert resolve_weights_file("https://example.org/a/b.pth") == cached.parent / "b.pth"
