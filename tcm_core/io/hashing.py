"""File digests, read in chunks: the sha256 that pins checkpoints, datasets and feature nets, and CIFAR's md5.

A pin recorded beside a file lives in ``FILE.sha256`` (``sha256sum`` format): ``fetch`` writes it on a first
download, and ``fetch`` and ``load_network`` enforce it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tcm_core.errors import RefusedFileError
from tcm_core.io.atomic import write_text_atomic

SHA256_SUFFIX = ".sha256"
_HEX = set("0123456789abcdef")
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


def sha256_sidecar(path: str | Path) -> Path:
    """``FILE.sha256``: where the first download records the hash of ``FILE``."""
    path = Path(path)
    return path.with_name(path.name + SHA256_SUFFIX)


def is_sha256(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


def recorded_sha256(path: str | Path) -> str | None:
    """The hash recorded beside ``path`` (``sha256sum`` format), or None."""
    sidecar = sha256_sidecar(path)
    if not sidecar.is_file():
        return None
    words = sidecar.read_text(errors="replace").split()
    if not words:
        return None
    if not is_sha256(words[0].lower()):
        raise RefusedFileError("malformed sha256 record (not 64 hexadecimal digits)", str(sidecar),
                               "delete it and fetch the file again")
    return words[0].lower()


def record_sha256(path: Path, digest: str) -> None:
    write_text_atomic(sha256_sidecar(path), f"{digest}  {path.name}\n")


def pin_file(path: str | Path, expected: str | None = None, digest: str | None = None) -> tuple[str, bool]:
    """Check ``path`` against ``expected`` (a known sha256, which wins) or else its ``FILE.sha256`` record, and
    record its hash there; return ``(sha256, recorded for the first time)``. ``digest``: the hash, if known.

    Raises ``RefusedFileError`` when the file differs from the expected hash (nothing is recorded then).
    """
    path = Path(path)
    recorded = recorded_sha256(path)
    expected = expected.strip().lower() if expected else recorded
    actual = digest or sha256_file(path)
    if expected is not None and actual != expected:
        source = "the known sha256" if expected != recorded else f"the sha256 recorded in {sha256_sidecar(path).name}"
        raise RefusedFileError(f"checksum mismatch: expected sha256 {expected} ({source}), actual {actual}",
                               str(path), "put back the file first used (or delete the .sha256 record if you "
                               "replaced it on purpose)")
    if recorded != actual:
        record_sha256(path, actual)
    return actual, recorded is None


def verify_file(path: str | Path, sha256: str | None = None) -> str:
    """Check ``path`` against ``sha256`` or, without one, against ``FILE.sha256``; return its hash.

    Raises ``RefusedFileError`` on a mismatch. A file with neither is accepted and its hash returned.
    """
    path = Path(path)
    expected = sha256.strip().lower() if sha256 else recorded_sha256(path)
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        raise RefusedFileError(f"checksum mismatch: expected sha256 {expected}, actual {actual}", str(path),
                               "fetch the file again")
    return actual
