"""The run's "auto" settings, resolved once for the device and process count into a frozen :class:`Runtime`.

``compute_precision.{dtype, compile, chunked_losses, distributed}`` and ``crops.batched_photometric`` accept ``auto``
(the defaults of ``franca/configs/ssl_default_config.yaml``). The trainer resolves them at the start of ``do_train``
and hands the result to ``parallelize``, ``SSLMetaArch.forward_backward``, the data builder and the benchmarks, so
every part of a run sees the same choices. The allowed values defined here are also the config schema's
(``franca.train.config.CHOICES``).
"""

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, "fp64": None}
DTYPE_SETTINGS = ("auto", *AUTOCAST_DTYPES)
# fp64: parameters and batches in float64, no autocast: a reference-precision run (the golden test), not for training.
PARAM_DTYPES = {"fp64": torch.float64}
SWITCH_SETTINGS = ("auto", "true", "false")
DISTRIBUTED_MODES = ("auto", "fsdp", "ddp", "none")


def resolve_autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``compute_precision.dtype``: auto = bf16 on CUDA and fp32 (None: no autocast) elsewhere."""
    if setting not in DTYPE_SETTINGS:
        raise ValueError(f"compute_precision.dtype={setting!r}; use one of {', '.join(DTYPE_SETTINGS)}")
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AUTOCAST_DTYPES[setting]


def resolve_param_dtype(setting: str) -> torch.dtype:
    """The dtype of the model's parameters and of the batch: float64 for ``compute_precision.dtype=fp64``, else fp32."""
    return PARAM_DTYPES.get(setting, torch.float32)


def resolve_switch(key: str, setting: str, device: torch.device) -> bool:
    """An auto | true | false setting ``key``: auto = on CUDA (where it pays), off elsewhere."""
    if setting not in SWITCH_SETTINGS:
        raise ValueError(f"{key}={setting!r}; use auto, true or false")
    return device.type == "cuda" if setting == "auto" else setting == "true"


def resolve_loss_chunk_size(chunked_losses: str, chunk_size: int, device: torch.device) -> int | None:
    """Rows per chunk of the chunked losses, or None for the plain path (``compute_precision.chunked_losses``).

    auto = chunked on CUDA, where the fp32 [tokens × K] tensors of the plain path cost memory and time.
    """
    if chunk_size < 1:
        raise ValueError(f"compute_precision.loss_chunk_size={chunk_size} must be >= 1 (rows per chunk, e.g. 256)")
    enabled = resolve_switch("compute_precision.chunked_losses", chunked_losses, device)
    return chunk_size if enabled else None


def resolve_distributed_mode(setting: str, world_size: int) -> str:
    """``compute_precision.distributed``: auto = FSDP2 with more than one process; "none" with one process."""
    if setting not in DISTRIBUTED_MODES:
        raise ValueError(f"compute_precision.distributed={setting!r}; use one of {', '.join(DISTRIBUTED_MODES)}")
    if world_size <= 1:
        return "none"
    if setting == "none":
        raise ValueError(
            f"compute_precision.distributed=none with {world_size} processes would train {world_size} unrelated "
            "models; use auto, fsdp or ddp, or run one process"
        )
    return "fsdp" if setting == "auto" else setting


@dataclass(frozen=True)
class Runtime:
    """What the "auto" settings of one run resolved to on its device and process count.

    ``autocast_dtype`` None means no autocast (fp32, or fp64 with ``param_dtype`` float64); ``loss_chunk_size`` None
    means the plain loss path; ``data_parallel`` is "fsdp", "ddp" or "none".
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    loss_chunk_size: int | None
    batched_photometric: bool
    data_parallel: str
    param_dtype: torch.dtype = torch.float32

    @classmethod
    def resolve(cls, cfg: DictConfig, device: torch.device, world_size: int = 1) -> "Runtime":
        precision = cfg.compute_precision
        return cls(
            device=device,
            autocast_dtype=resolve_autocast_dtype(precision.dtype, device),
            compile=resolve_switch("compute_precision.compile", precision.compile, device),
            loss_chunk_size=resolve_loss_chunk_size(precision.chunked_losses, precision.loss_chunk_size, device),
            batched_photometric=resolve_switch("crops.batched_photometric", cfg.crops.batched_photometric, device),
            data_parallel=resolve_distributed_mode(precision.distributed, world_size),
            param_dtype=resolve_param_dtype(precision.dtype),
        )

    def autocast(self) -> torch.autocast:
        """The forward's autocast context: ``autocast_dtype`` on the device, or disabled for fp32."""
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)

    def describe(self) -> str:
        """One line for the trainer's start message."""
        dtype = str(self.autocast_dtype or self.param_dtype).removeprefix("torch.")
        losses = f"chunked by {self.loss_chunk_size} rows" if self.loss_chunk_size else "plain"
        photometric = "batched on the device" if self.batched_photometric else "per image in the loader"
        return (
            f"device {self.device}, dtype {dtype}, compile {'on' if self.compile else 'off'}, losses {losses}, "
            f"photometric augmentation {photometric}, data parallel {self.data_parallel}"
        )
