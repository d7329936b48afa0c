"""The trainer's progress line: the uniform value of each clustering loss (the formula of training.md) against the
losses of a real step whose teacher targets and student predictions are held uniform, and the line's format."""

import math

import pytest
import torch
from helpers import TINY_STEP, make_batch, step_losses, with_mask_lists

from franca.layers.heads import WeightNormLinear
from franca.train.config import load_config
from franca.train.progress import format_losses, masked_global_share, model_uniform_values
from franca.train.runtime import Runtime
from franca.train.ssl_meta_arch import SSLMetaArch

# make_batch: 4 images, so 8 global crops, of which 2 carry masked tokens; with p = 0.25 the collate masks
# int(8 · 0.25) = 2 of them, the share the formula assumes.
STEP = [
    *TINY_STEP,
    "train.batch_size_per_gpu=4",
    "ibot.mask_sample_probability=0.25",
    "dino.nesting_list=[8,16,32]",
    "dino.level_weights=[0.5,1.0,2.0]",
    "ibot.level_weights=[1.5,0.25,1.0]",
    "dino.loss_weight=0.7",
    "ibot.loss_weight=1.3",
]


def uniform_step_losses(cfg) -> tuple[dict[str, float], SSLMetaArch]:
    """The losses of one step of ``cfg``'s model with every prototype layer's gain at 0: all logits are 0, so the
    teacher's Sinkhorn-Knopp targets and the student's predictions are uniform."""
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).double()
    for module in model.modules():
        if isinstance(module, WeightNormLinear):
            module.weight_g.data.zero_()
    batch = with_mask_lists(make_batch(torch.Generator().manual_seed(0)))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    runtime = Runtime.resolve(cfg, torch.device("cpu"), 1)
    with torch.no_grad():
        losses = step_losses(model, batch, 0.04, runtime.loss_chunk_size)
    return {k: float(v) for k, v in losses.items()}, model


def test_uniform_values_equal_the_losses_of_a_step_at_uniform_targets():
    cfg = load_config(None, STEP)
    losses, model = uniform_step_losses(cfg)
    uniform = model_uniform_values(model, world_size=1)
    assert set(uniform) == {"dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss"}
    for term, value in uniform.items():
        assert losses[term] == pytest.approx(value, rel=1e-6), term  # masks_weight is float32 1/n
    # written out: K = 32 · d / 32 prototypes per level d, L = 2 local crops (6 pairs), 2 of 8 global crops masked
    dino_levels = 0.5 * math.log(8) + 1.0 * math.log(16) + 2.0 * math.log(32)
    assert uniform["dino_local_crops_loss"] == pytest.approx(0.7 * dino_levels * 4 / 6)
    assert uniform["dino_global_crops_loss"] == pytest.approx(0.7 * dino_levels * 2 / 6)
    ibot_levels = 1.5 * math.log(8) + 0.25 * math.log(16) + 1.0 * math.log(32)
    assert uniform["ibot_loss"] == pytest.approx(1.3 * ibot_levels * 2 / 8)


def test_without_local_crops_or_ibot_the_terms_follow():
    cfg = load_config(None, [*STEP, "crops.local_crops_number=0", "ibot.mask_sample_probability=0.0"])
    losses, model = uniform_step_losses(cfg)
    uniform = model_uniform_values(model, world_size=1)
    assert set(uniform) == {"dino_global_crops_loss"} == set(losses)
    assert losses["dino_global_crops_loss"] == pytest.approx(uniform["dino_global_crops_loss"], rel=1e-9)


def test_masked_share_is_that_of_the_global_batch():
    assert masked_global_share(64, 1, 0.5) == 0.5
    assert masked_global_share(3, 2, 0.5) == 6 / 12
    assert masked_global_share(5, 1, 0.25) == 2 / 10  # int(10 · 0.25) = 2 crops


def test_each_loss_is_shown_beside_its_uniform_value():
    losses = {"dino_local_crops_loss": 15.84, "dino_global_crops_loss": 4.0, "koleo_loss": -0.1, "ibot_loss": 9.9}
    uniform = {"dino_local_crops_loss": 19.4081, "dino_global_crops_loss": 4.852, "ibot_loss": 12.13}
    line = format_losses(losses, uniform)
    assert line == "dino_local 15.8400/19.41 dino_global 4.0000/4.85 koleo -0.1000 ibot 9.9000/12.13"
