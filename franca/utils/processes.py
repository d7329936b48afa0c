"""Telling processes apart when pids are reused: a process's start time, and a token naming one process on one boot.

A pid alone does not name a process: pids are reused (containers restart with the same ones), and a pid written on
another machine means nothing here. On Linux, ``/proc`` gives each process's start (clock ticks since boot) and the
boot's id; :func:`process_token` hashes the two, so a token matches exactly one process of one boot of one machine.
Elsewhere the functions return None and callers fall back to the pid alone.
"""

import hashlib
import os
from pathlib import Path

_PROC = Path("/proc")
TOKEN_LENGTH = 8


def _start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (the process start, in clock ticks since boot); None when unknown."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name (field 2) may hold spaces and parentheses
    return int(fields[19]) if len(fields) > 19 else None


def _boot_id() -> str | None:
    try:
        return (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return None


def _boot_time() -> float | None:
    """The boot time in seconds since the epoch (``btime`` of ``/proc/stat``)."""
    try:
        lines = (_PROC / "stat").read_text().splitlines()
    except OSError:
        return None
    return next((float(line.split()[1]) for line in lines if line.startswith("btime ")), None)


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` of this machine started, in seconds since the epoch (to the second); None when unknown."""
    ticks, boot = _start_ticks(pid), _boot_time()
    if ticks is None or boot is None:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def process_token(pid: int) -> str | None:
    """A short hex token of (boot id, start time) of process ``pid``: equal only for the same process of the same
    boot of the same machine; None where ``/proc`` does not say."""
    ticks, boot_id = _start_ticks(pid), _boot_id()
    if ticks is None or boot_id is None:
        return None
    return hashlib.sha256(f"{boot_id}:{ticks}".encode()).hexdigest()[:TOKEN_LENGTH]
