"""Rank-aware console output: rank 0 prints (and keeps ``logs/log.txt``), other ranks write ``logs/log.rank<r>.txt``.

As in valeoai/Franca ``franca/logging/``, printing is restricted to rank 0 and every rank keeps a log file. Other ranks'
stderr is left alone so that a traceback on any rank still reaches the console.
"""

import atexit
import os
import sys
from pathlib import Path
from typing import TextIO

from franca.utils.atomic import disk_full_message, is_disk_full


class _Tee:
    """A text stream that writes to several streams; a full disk under a log file raises ``OSError`` naming it."""

    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            try:
                stream.write(text)
            except OSError as err:
                if not is_disk_full(err) or not isinstance(getattr(stream, "name", None), str):
                    raise
                raise OSError(err.errno, disk_full_message(stream.name, len(text.encode()), code=err.errno)) from err
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def log_file_path(output_dir: str | os.PathLike, rank: int) -> Path:
    logs = Path(output_dir) / "logs"
    return logs / ("log.txt" if rank == 0 else f"log.rank{rank}.txt")


def setup_rank_output(output_dir: str | os.PathLike, rank: int, world_size: int) -> Path | None:
    """Route ``print`` of this rank as described above; one process (world size 1) keeps stdout untouched.

    Returns the log file, or None when nothing was redirected.
    """
    if world_size <= 1:
        return None
    path = log_file_path(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1)
    previous = sys.stdout
    sys.stdout = _Tee(previous, log) if rank == 0 else _Tee(log)

    def restore() -> None:  # before the interpreter's last flush of sys.stdout, which must not hit a closed file
        sys.stdout = previous
        log.close()

    atexit.register(restore)
    return path
