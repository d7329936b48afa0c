"""Human-readable progress lines with ETA, and the JSON-lines metrics file."""

import json
import math
import os
import sys
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Prints ``<name> [done/total] eta …`` lines; the rate is measured over the work done since ``start``."""

    def __init__(self, name: str, total: int, start: int = 0, stream=None):
        self.name, self.total, self.start = name, total, start
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()

    def eta(self, done: int) -> float:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 and done > self.start else 0.0
        return (self.total - done) / rate if rate > 0 else float("inf")

    def line(self, done: int, extra: str = "") -> str:
        width = len(str(self.total))
        return f"{self.name} [{done:>{width}}/{self.total}] eta {format_duration(self.eta(done))} {extra}".rstrip()

    def print(self, done: int, extra: str = "") -> None:
        print(self.line(done, extra), file=self.stream, flush=True)


class MetricsWriter:
    """Appends one JSON object a line to ``training_metrics.json``; on resume drops lines at or past the restart."""

    def __init__(self, path: str | os.PathLike, resume_iteration: int = 0):
        self.path = Path(path)
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", -1) < resume_iteration
            ]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
