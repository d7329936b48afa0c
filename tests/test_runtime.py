"""``Runtime.resolve``: the "auto" settings resolved once per device and process count, and their validation.

CUDA resolution is checked with a ``torch.device("cuda")`` object, which needs no GPU.
"""

import pytest
import torch

from franca.train.config import load_config
from franca.train.parallel import SHARDING_STRATEGIES
from franca.train.runtime import Runtime, resolve_distributed_mode, resolve_loss_chunk_size, resolve_switch
from franca.utils.config_schema import ConfigError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_settings_resolve_per_device():
    cfg = load_config(None, [])
    on_cpu, on_cuda = Runtime.resolve(cfg, CPU), Runtime.resolve(cfg, CUDA, world_size=4)
    assert on_cpu == Runtime(CPU, None, False, None, False, "none")
    assert on_cuda == Runtime(CUDA, torch.bfloat16, True, 256, True, "fsdp")
    assert on_cpu.describe() == (
        "device cpu, dtype float32, compile off, losses plain, photometric augmentation per image in the loader, "
        "data parallel none"
    )
    assert "dtype bfloat16, compile on, losses chunked by 256 rows" in on_cuda.describe()


def test_explicit_settings_override_auto():
    overrides = [
        "compute_precision.dtype=fp16",
        "compute_precision.compile=false",
        "compute_precision.chunked_losses=true",
        "compute_precision.loss_chunk_size=8",
        "compute_precision.distributed=ddp",
        "crops.batched_photometric=true",
    ]
    runtime = Runtime.resolve(load_config(None, overrides), CUDA, world_size=2)
    assert runtime == Runtime(CUDA, torch.float16, False, 8, True, "ddp")
    assert Runtime.resolve(load_config(None, ["compute_precision.dtype=fp32"]), CUDA).autocast_dtype is None


def test_runtime_autocast_context():
    fp32 = Runtime.resolve(load_config(None, []), CPU)
    bf16 = Runtime.resolve(load_config(None, ["compute_precision.dtype=bf16"]), CPU)
    x = torch.ones(2, 2)
    with fp32.autocast():
        assert (x @ x).dtype == torch.float32
    with bf16.autocast():
        assert (x @ x).dtype == torch.bfloat16


def test_resolvers_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match="crops.batched_photometric='on'; use auto, true or false"):
        resolve_switch("crops.batched_photometric", "on", CPU)
    with pytest.raises(ValueError, match="loss_chunk_size=0"):
        resolve_loss_chunk_size("true", 0, CPU)
    assert resolve_distributed_mode("none", 1) == "none" and resolve_distributed_mode("auto", 1) == "none"
    with pytest.raises(ValueError, match="unrelated"):
        resolve_distributed_mode("none", 2)


@pytest.mark.parametrize("strategy", sorted(SHARDING_STRATEGIES))
def test_schema_accepts_the_sharding_strategies_parallelize_supports(strategy):
    cfg = load_config(None, [f"compute_precision.student.backbone.sharding_strategy={strategy}"])
    assert cfg.compute_precision.student.backbone.sharding_strategy == strategy


def test_schema_refuses_no_shard_which_parallelize_cannot_apply():
    with pytest.raises(ConfigError, match=r"sharding_strategy has value 'NO_SHARD'.*'FULL_SHARD'"):
        load_config(None, ["compute_precision.teacher.dino_head.sharding_strategy=NO_SHARD"])
