"""The model card and licence files of ``python -m franca.export.hf``: metadata, the research-only licence of
released weights, a user's own licence, training recipe from the run's config, evaluation numbers from results files,
and the RASA head's two-line use."""

import json

import pytest
import torch
import yaml
from interop_helpers import randomise_
from omegaconf import OmegaConf

from franca.checkpoint.release import save_teacher_release
from franca.export import hf
from franca.export.hf import choose_licence, export_hf
from franca.hub import get_weights, load_backbone
from franca.interop.model_card import RESEARCH_ONLY, Licence
from franca.models import ViTConfig
from franca.models.rasa_head import RASAHead
from franca.models.vision_transformer import DinoVisionTransformer

pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TINY = ViTConfig.for_arch("vit_tiny", embed_dim=64, depth=1, num_heads=4, patch_size=4, img_size=16)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def tiny_model(seed: int = 0) -> DinoVisionTransformer:
    return randomise_(DinoVisionTransformer(TINY), seed).eval()


def test_own_weights_carry_the_licence_given(tmp_path):
    export_hf(tiny_model(), tmp_path, "timm", Licence("apache-2.0"), source="mine.pth", log=lambda _: None)
    card = (tmp_path / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "timm"
    assert meta["pipeline_tag"] == "image-feature-extraction" and "franca" in meta["tags"]
    assert not (tmp_path / "LICENSE_MODEL").exists()
    assert json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]["license"] == "apache-2.0"
    for heading in ("## Architecture", "## Use", "## Parity with franca", "## Training", "## Evaluation"):
        assert heading in card
    assert "| width / depth / heads | 64 / 1 / 4 |" in card and "SwiGLU, hidden 176" in card
    assert "The checkpoint does not record its training data or recipe." in card
    assert "native 16 px the largest difference of the CLS and patch tokens was 0.0e+00 / 0.0e+00" in card


@pytest.mark.slow
def test_released_weights_are_research_only(tmp_path):
    release = get_weights("vit_base", "IN21K_518")  # the upstream model card's name of the IN21K release
    assert release.name == "IN21K"
    assert choose_licence(None, release).research_only
    with pytest.raises(ValueError, match="research-only licence \\(LICENSE_MODEL\\); leave --license out"):
        choose_licence("mit", release)
    with pytest.raises(ValueError, match="--license is required for your own weights"):
        choose_licence(None, None)
    export_hf(tiny_model(), tmp_path, "transformers", Licence(RESEARCH_ONLY), "franca_vitb14", release, log=print)
    card = (tmp_path / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "other" and meta["license_link"] == "LICENSE_MODEL"
    assert meta["license_name"] == "franca-research-only-rail-ams"
    assert (tmp_path / "LICENSE_MODEL").read_text() == hf.licence_text()
    assert "RESEARCH-ONLY RAIL-AMS" in (tmp_path / "LICENSE_MODEL").read_text()
    assert "trained on ImageNet-21K, then 518 px finetuning on ImageNet-1k" in card
    # a later export of the user's own weights into the same folder drops the licence file
    export_hf(tiny_model(), tmp_path, "transformers", Licence("mit"), log=lambda _: None)
    assert not (tmp_path / "LICENSE_MODEL").exists()


def test_run_recipe_and_results_reach_the_card(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    settings = {
        "train": {"dataset_path": "ImageFolder:root=/data/photos", "batch_size_per_gpu": 32},
        "optim": {"epochs": 5},
        "crops": {"global_crops_size": 16, "local_crops_size": 8},
    }
    OmegaConf.save(OmegaConf.create(settings), run / "config.yaml")
    model = tiny_model()
    teacher = {"backbone." + key: value for key, value in model.state_dict().items()}
    checkpoint = save_teacher_release(
        teacher, model.build_config(), run / "eval" / "training_150" / "teacher_checkpoint.pth", block_chunks=0
    )
    results = tmp_path / "results" / "knn"
    results.mkdir(parents=True)
    record = {
        "10": {"top1": 71.25, "top5": 93.5},
        "metadata": {
            "datasets": {"train": "ImageFolder:root=/data/train", "val": "ImageFolder:root=/data/val"},
            "sizes": {"image_size": [16, 16]},
            "weights": {"source": str(checkpoint)},
        },
    }
    (results / "results_eval_knn.json").write_text(json.dumps(record))
    argv = ["--weights", str(checkpoint), "--format", "timm", "--out", str(tmp_path / "out"), "--license", "mit"]
    assert hf.main([*argv, "--results-dir", str(tmp_path / "results")]) == 0
    printed = capsys.readouterr().out
    assert "[1/3] loading" in printed and "[3/3] loading it with timm" in printed and "matches franca to" in printed
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| training data | `ImageFolder:root=/data/photos` |" in card
    assert "| global / local crop size | `16 / 8` |" in card and "| iteration of these weights | `150` |" in card
    assert "### knn (`knn/results_eval_knn.json`)" in card
    assert "| 10.top1 | 71.25 |" in card and "train: `ImageFolder:root=/data/train`" in card
    with pytest.raises(SystemExit):
        hf.main([*argv, "--results-dir", str(tmp_path / "run")])  # a folder without results files
    assert "holds no results_eval_*.json" in capsys.readouterr().err


@torch.no_grad()
def test_rasa_head_file_and_its_two_line_use(tmp_path):
    model = tiny_model()
    head = RASAHead(TINY.embed_dim, n_pos_layers=3)
    torch.nn.init.normal_(head.pos_pred.weight)
    for layer in head.pre_pos_layers:
        torch.nn.init.normal_(layer.weight)
    model.attach_rasa_head(head)
    export_hf(model, tmp_path, "timm", Licence("mit"), log=lambda _: None)
    from safetensors.torch import load_file

    x = torch.randn(2, 3, 16, 16)
    tokens = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval().forward_features(x)
    patches = tokens[:, 1:]
    patches_rasa = patches @ load_file(tmp_path / "rasa_head.safetensors")["folded_matrix"].T
    expected = model.forward_features(x, use_rasa_head=True)["patch_token_rasa"]
    torch.testing.assert_close(patches_rasa, expected, atol=1e-5, rtol=0)
    reloaded = load_backbone(tmp_path, rasa_weights=tmp_path / "rasa_head.safetensors")
    torch.testing.assert_close(reloaded.forward_features(x, use_rasa_head=True)["patch_token_rasa"], expected)
    assert "## RASA head" in (tmp_path / "README.md").read_text()
    export_hf(tiny_model(), tmp_path, "timm", Licence("mit"), log=lambda _: None)
    assert not (tmp_path / "rasa_head.safetensors").exists()
