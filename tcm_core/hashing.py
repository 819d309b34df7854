"""File digests, read in chunks: the sha256 that pins checkpoints, datasets and feature nets, and CIFAR's md5."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK_BYTES = 1 << 20
_HASHED: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime ns) -> sha256, for this process


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (``algorithm`` is any hashlib name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    return file_digest(path, "sha256")


def cached_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, hashed once per (path, size, mtime) in this process (a changed file is rehashed)."""
    path = Path(path).resolve()
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]
