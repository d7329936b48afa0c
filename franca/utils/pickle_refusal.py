"""Telling a file that ``torch.load(weights_only=True)`` refused from a damaged one.

The weights-only reader reports both as ``UnpicklingError: Weights only load failed``: random bytes give "Unsupported
operand" as does a well-formed pickle using an operation it does not allow (e.g. the text opcodes of a legacy
protocol-0 pickle of arbitrary objects), and a pickle naming a function gives "Unsupported global". The difference is
whether the file holds a well-formed pickle: :func:`refused_pickle` walks its opcodes with ``pickletools.genops``
(which reads, never executes) and only then calls it a refusal.
"""

import os
import pickle
import pickletools
import re
import zipfile
from typing import BinaryIO

_OPERAND = re.compile(r"Unsupported operand (\d+)")
_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}


def _pickle_stream(path: str | os.PathLike) -> BinaryIO:
    """The pickle torch.load reads first: ``*/data.pkl`` of a zip checkpoint, else the file from its start."""
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        member = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
        if member is not None:
            return archive.open(member)
        archive.close()
    return open(path, "rb")


def _well_formed(path: str | os.PathLike) -> list[str] | None:
    """The globals a file's first pickle names, when it is a well-formed pickle; None when it is not."""
    try:
        with _pickle_stream(path) as stream:
            return [str(arg) for op, arg, _ in pickletools.genops(stream) if op.name == "GLOBAL"]
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        return None


def refused_pickle(path: str | os.PathLike, err: BaseException) -> str | None:
    """Why the weights-only reader refused ``path`` ("a pickle ... the weights-only reader refuses ..."), or None when
    ``err`` is no refusal or the file is not a well-formed pickle (damage)."""
    if not isinstance(err, pickle.UnpicklingError) or "Weights only load failed" not in str(err):
        return None
    names = _well_formed(path)
    if names is None:
        return None
    blocked = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
    operand = _OPERAND.search(str(err))
    if blocked:
        what = blocked
    elif names:
        what = f"it names {', '.join(sorted(set(names))[:3])}"
    elif operand:
        what = f"it uses the pickle operation {_OPCODE_NAMES.get(int(operand[1]), operand[1])}"
    else:
        what = "it holds objects other than tensors"
    return (
        f"a pickle that the weights-only reader refuses ({what}): not a plain tensor checkpoint, and unpickling it "
        "could run arbitrary code"
    )
