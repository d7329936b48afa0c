"""SHA-256 of files: the one digest routine of checkpoint records, the hub's download cache and eval provenance."""

import hashlib
import os
import re

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
