"""Consolidation of a single-process checkpoint, checkpoint selection and its errors (the 2-rank DCP case is in
test_train_distributed.py)."""

import pytest
import torch
from helpers import TINY_MODEL

from franca.checkpoint import TrainingCheckpointer
from franca.checkpoint.consolidate import consolidate, find_checkpoints, main
from franca.hub import load_backbone
from franca.train.config import load_config
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.config_schema import save_config

TINY = [*TINY_MODEL, "student.block_chunks=2"]


@pytest.fixture
def run_dir(tmp_path):
    cfg = load_config(None, TINY)
    save_config(cfg, tmp_path / "config.yaml")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    with torch.no_grad():  # a teacher that differs from the student, so a mix-up would show
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.student.parameters())
    checkpointer = TrainingCheckpointer(tmp_path, keep=2)
    for iteration in (3, 6):
        checkpointer.save(iteration, model, optimizer)
    return tmp_path, model


def test_single_file_checkpoint_consolidates_to_the_teacher(run_dir, tmp_path):
    run, model = run_dir
    out = consolidate(run, tmp_path / "release")
    release = torch.load(out / "teacher_checkpoint.pth", weights_only=True)
    assert "backbone.blocks.1.1.attn.qkv.weight" in release["teacher"]  # chunked release naming, 2 chunks
    expected = model.teacher["backbone"].state_dict()
    for loaded in (load_backbone(out / "teacher_checkpoint.pth"), load_backbone(out / "backbone")):
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    head = model.teacher["dino_head"].state_dict()
    assert all(torch.equal(release["teacher"][f"dino_head.{k}"], v) for k, v in head.items())


def test_checkpoint_selection_and_errors(run_dir, tmp_path, capsys):
    run, _ = run_dir
    assert [p.name for p in find_checkpoints(run)] == ["model_0000006.pth", "model_0000003.pth"]
    assert [p.name for p in find_checkpoints(run, 3)] == ["model_0000003.pth"]
    with pytest.raises(FileNotFoundError, match="available: 3, 6"):
        find_checkpoints(run, 4)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert "no training checkpoint" in capsys.readouterr().err
