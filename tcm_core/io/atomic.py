"""Atomic file output: write to a temporary file beside the target, then rename it into place.

A killed job therefore leaves either the old file or the new one, never a torn one, and Snakemake never sees
a half-written output. Every module that writes results goes through here. A write the storage refuses (disk
full, file-size limit, no permission, read-only file system) removes the temporary file, leaves the old file
as it was and raises one :class:`tcm_core.errors.StorageError` naming the target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tcm_core.errors import storage_error


def file_mode() -> int:
    """Mode of a file that a plain open() would create here (0666 minus the umask)."""
    # mkstemp creates 0600 files; results should be readable like any other output.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def storage_errors(path: str | Path) -> Iterator[None]:
    """Raise the storage's refusals while writing ``path`` (or creating its folders) as a StorageError naming it.

    Only errors of the target, its folder or an ancestor folder (or of a plain ``write``, which names no file)
    are converted; an unreadable input file raised in the same block keeps its own type.
    """
    path = Path(path)
    try:
        yield
    except OSError as error:
        named = error.filename
        ours = named is None or path.is_relative_to(Path(os.fsdecode(named)).parent)
        converted = storage_error(error, path) if ours else None
        if converted is None:
            raise
        raise converted from error


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` if the block succeeds, else it is removed."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    try:
        with storage_errors(path):
            yield Path(tmp)
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class _KeepsWriteError:
    """A binary file that remembers why a write failed: ``torch.save`` turns that OSError (disk full) into a
    RuntimeError without the errno."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.error = handle, None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_torch_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically and synced to disk (a full disk is a StorageError)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        sink = _KeepsWriteError(handle)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None
        handle.flush()
        os.fsync(handle.fileno())
