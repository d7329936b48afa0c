"""High-resolution finetuning from a released-format checkpoint: the recipe runs end to end at a tiny size, from a
checkpoint whose position grid was resized by scripts/modify_ckpt_highres.py or at load time (the same numbers)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from franca.models import build_vit
from franca.train import train as trainer
from franca.train.pretrained import load_pretrained
from franca.train.ssl_meta_arch import SSLMetaArch

REPO = Path(__file__).resolve().parents[1]
TINY_FINETUNE = [
    "train.dataset_path=FashionMNIST:root=bundled:split=train",
    "train.batch_size_per_gpu=4",
    "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=2",
    "optim.epochs=1",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "student.arch=vit_tiny",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=4",
    "student.block_chunks=2",
    "crops.global_crops_size=24",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
]


def _highres_script():
    spec = importlib.util.spec_from_file_location("modify_ckpt_highres", REPO / "scripts" / "modify_ckpt_highres.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _released_checkpoint(path: Path) -> torch.nn.Module:
    """A 16 px ViT saved as a v1.0.0-style teacher (chunked keys, ``backbone.`` prefix, head keys alongside)."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny", embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16).eval()
    teacher = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":  # chunked naming with 2 chunks of 1 block: blocks.{c}.{i}
            key = ".".join(["blocks", parts[1], parts[1], *parts[2:]])
        teacher[f"backbone.{key}"] = value
    teacher["dino_head.mlps.0.0.weight"] = torch.randn(8, 2)
    torch.save({"teacher": teacher, "backbone_config": model.build_config()}, path)
    return model


@pytest.mark.slow
def test_finetune_recipe_runs_from_a_highres_converted_release_checkpoint(tmp_path):
    source = _released_checkpoint(tmp_path / "release_16px.pth")
    converted = tmp_path / "release_24px.pth"
    assert (
        _highres_script().main(
            [
                "--checkpoint-path",
                str(tmp_path / "release_16px.pth"),
                "--output-path",
                str(converted),
                "--target-img-size",
                "24",
                "--patch-size",
                "4",
            ]
        )
        == 0
    )

    recipe = str(REPO / "configs" / "finetune" / "vitb14_finetune.yaml")
    out = tmp_path / "finetune"
    argv = ["--config-file", recipe, "--output-dir", str(out), *TINY_FINETUNE]
    cfg, _ = trainer.setup_run(trainer.get_args_parser().parse_args(argv + [f"student.pretrained_weights={converted}"]))
    model = SSLMetaArch(cfg)
    load_pretrained(cfg, model)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected = source(x)  # the 16 px model run at 24 px interpolates its grid at run time
        for name in ("student", "teacher"):
            backbone = getattr(model, name)["backbone"].eval()
            assert backbone.pos_embed.shape[1] == 1 + 6 * 6
            assert torch.equal(backbone(x), expected)

    # Loading the 16 px file directly resizes the grid at load time with the same interpolation.
    cfg_direct, _ = trainer.setup_run(
        trainer.get_args_parser().parse_args(
            [
                "--config-file",
                recipe,
                "--output-dir",
                str(tmp_path / "direct"),
                *TINY_FINETUNE,
                f"student.pretrained_weights={tmp_path / 'release_16px.pth'}",
            ]
        )
    )
    direct = SSLMetaArch(cfg_direct)
    load_pretrained(cfg_direct, direct)
    assert torch.equal(direct.student["backbone"].pos_embed, model.student["backbone"].pos_embed)

    record = trainer.main(argv + [f"student.pretrained_weights={converted}"])
    assert torch.isfinite(torch.tensor(record["total_loss"]))
    assert (out / "eval" / "training_2" / "teacher_checkpoint.pth").is_file()
