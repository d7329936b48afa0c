"""Human-readable progress lines with ETA, and the JSON-lines metrics file."""

import json
import math
import os
import sys
import time
from pathlib import Path

from franca.utils.atomic import atomic_write, disk_full_message, is_disk_full


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
    """Appends one JSON object a line to a metrics file such as ``training_metrics.json``.

    On resume the file is made consistent with the checkpoint: lines whose ``key`` (the iteration, or RASA's round)
    is at or past the restart are dropped (the resumed run writes them again), and so is a line that is not valid JSON
    (a kill during an append tears the last line), with a warning naming it.
    """

    def __init__(self, path: str | os.PathLike, resume_iteration: int = 0, key: str = "iteration"):
        self.path = Path(path)
        if self.path.exists():
            kept = []
            for number, line in enumerate(self.path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    print(
                        f"WARNING: dropped line {number} of {self.path}, cut short by an interrupted write", flush=True
                    )
                    continue
                if record.get(key, -1) < resume_iteration:
                    kept.append(line)
            atomic_write(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append ``record``; a full disk raises ``OSError`` naming the file, the line's size and the free space."""
        line = json.dumps(record) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as err:
            if is_disk_full(err):
                raise OSError(err.errno, disk_full_message(self.path, len(line.encode()), code=err.errno)) from err
            raise


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
