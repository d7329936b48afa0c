"""Recognising a full disk behind a failed checkpoint write, and saying how much space the checkpoint needs.

``torch.save`` reports a short write as ``RuntimeError: ... unexpected pos``, and DCP wraps each rank's error in a
``CheckpointException``; the ``OSError`` that says ENOSPC (or EDQUOT, an exceeded quota) may sit anywhere in the
chain, or nowhere when torch swallowed it. :func:`checkpoint_disk_full_error` looks through the whole chain, and takes
a short write with less free space than the checkpoint needs for a full disk too.
"""

import errno
from collections.abc import Iterator
from pathlib import Path

from franca.utils.atomic import disk_full_words, format_bytes, free_bytes, is_disk_full


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, its causes and contexts, and the per-rank exceptions of a DCP ``CheckpointException``."""
    seen = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__]
        for failure in getattr(current, "failures", {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)


def checkpoint_disk_full_error(
    err: BaseException, folder: Path, iteration: int, needed: int, previous_size: int | None
) -> OSError | None:
    """The ``OSError`` (ENOSPC or EDQUOT) to raise for a checkpoint write that failed with ``err``, naming the folder,
    the space the checkpoint ``needed``, the free space and the ``previous_size`` checkpoint's size; None when ``err``
    is not a full disk."""
    code = next((e.errno for e in _chain(err) if is_disk_full(e)), None)
    free = free_bytes(folder)
    short_write = any("unexpected pos" in str(e) for e in _chain(err))
    if code is None and not (short_write and free < needed):
        return None
    code = code or errno.ENOSPC
    took = f"; the previous checkpoint took {format_bytes(previous_size)}" if previous_size else ""
    what, fix = disk_full_words(code)
    return OSError(
        code,
        f"{what} writing the checkpoint of iteration {iteration} to {folder}: it needs about {format_bytes(needed)} "
        f"(model and optimizer state) and {format_bytes(free)} are free there{took}. {fix} (or point --output-dir "
        "elsewhere) and rerun the same command",
    )
