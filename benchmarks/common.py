"""Shared helpers of the benchmark scripts: device clocks, matmul peak, environment record, JSON and Markdown output.

Timings on CUDA use CUDA events recorded in the current stream (what the GPU did between two marks, including idle
gaps); on CPU they use ``time.perf_counter`` (CPU ops are synchronous).
"""

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from franca.utils.atomic import atomic_write


def resolve_device(name: str | None) -> torch.device:
    """``cuda`` / ``cpu`` / None (= cuda when available); a clear error when CUDA is asked for but absent."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: this machine has no CUDA GPU visible to torch; use --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeviceClock:
    """Named marks on the device timeline; ``intervals()`` gives the milliseconds between consecutive marks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def intervals(self) -> list[tuple[str, float]]:
        """``[(name of the later mark, ms since the previous mark), ...]``; synchronises the device first."""
        synchronize(self.device)
        result = []
        for (_, start), (name, end) in zip(self.marks[:-1], self.marks[1:], strict=True):
            ms = start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1000.0
            result.append((name, ms))
        return result


def summarize_ms(values: Sequence[float]) -> dict[str, float]:
    """Mean, median, min, max and standard deviation of a list of durations in ms."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.pstdev(values),
    }


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 8192, iters: int = 20) -> dict:
    """Dense ``size``³ matmul throughput in FLOP/s (2·size³ per product): the denominator of MFU.

    Measured rather than taken from a datasheet, so MFU compares against what this device, clock and torch build can
    reach on the best-case kernel. With ``allow_tf32`` as the trainer sets it for fp32.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    clock = DeviceClock(device)
    clock.mark("start")
    for _ in range(iters):
        torch.mm(a, b)
    clock.mark("end")
    ms = clock.intervals()[0][1]
    flops = 2.0 * size**3 * iters / (ms / 1000.0)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "iters": iters, "flops_per_s": flops}


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, versions, CPU count and date, recorded with every result."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON via a temporary file in the same folder and a rename; returns the path."""
    return atomic_write(path, json.dumps(payload, indent=2) + "\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results_section(path: str | os.PathLike, title: str, env: dict, command: str, table: str) -> Path:
    """Append a dated section (device, versions, command, table) to a Markdown results file, atomically."""
    path = Path(path)
    previous = path.read_text() if path.exists() else "# Benchmark results\n"
    section = (
        f"\n## {title} — {env['date'][:10]}\n\n"
        f"Device: {env['device']} · torch {env['torch']} (CUDA {env['cuda']}) · {env['cpu_count']} CPUs\n\n"
        f"```\n{command}\n```\n\n{table}\n"
    )
    return atomic_write(path, previous.rstrip("\n") + "\n" + section)
