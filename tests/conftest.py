import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


# A tiny Franca run on the shipped Fashion-MNIST subset: 3 iterations an epoch, checkpoints every epoch.
TINY = """
dino: {head_n_prototypes: 64, head_bottleneck_dim: 16, head_hidden_dim: 32, mrl_l2_norm: true}
ibot: {separate_head: true, head_n_prototypes: 64, head_bottleneck_dim: 16, head_hidden_dim: 32}
train: {batch_size_per_gpu: 8, dataset_path: "FashionMNIST:root=bundled:split=train", OFFICIAL_EPOCH_LENGTH: 3,
        num_workers: 0, log_period: 1, seed: 3}
student: {arch: vit_tiny, embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4, drop_path_rate: 0.1,
          ffn_layer: swiglufused, block_chunks: 2}
teacher: {momentum_teacher: 0.9, warmup_teacher_temp_epochs: 1}
optim: {epochs: 3, warmup_epochs: 1, base_lr: 0.01, freeze_last_layer_epochs: 1}
crops: {global_crops_size: 16, local_crops_size: 8, local_crops_number: 2}
evaluation: {eval_period_iterations: 6}
"""


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path
