"""The one error path: expected failures are :class:`TcmError` subclasses, printed by the CLI as one line.

    tcm: error: <what failed>, <which file or key>, <what to do>

and the process exits with the class's code. Unexpected exceptions (bugs) keep their traceback.

| exit code | class | meaning |
|---|---|---|
| 2 | ``ConfigError`` | a bad command line, config key or value |
| 3 | ``RefusedFileError`` | a file that is corrupt, inconsistent or refused (unsafe pickle, hash mismatch) |
| 4 | ``MissingFileError`` | a file or folder that does not exist |
| 5 | ``StorageError`` | disk full, permission denied, read-only file system or database |
| 6 | ``NonFiniteTrainingError`` | training produced non-finite losses, gradients or weights |
| 7 | ``OfflineError`` | a download that cannot reach its host or cannot complete (redirect loop, manual only) |

``ConfigError`` is also a ``ValueError`` and ``MissingFileError`` a ``FileNotFoundError``, so library callers
can catch the built-in types.
"""

from __future__ import annotations

import errno

PREFIX = "tcm: error: "


class TcmError(Exception):
    """An expected failure. ``what`` failed, at ``where`` (a file or config key), and ``todo`` fixes it."""

    exit_code = 1

    def __init__(self, what: str, where: str | None = None, todo: str | None = None) -> None:
        self.what, self.where, self.todo = what, where, todo
        super().__init__(", ".join(part for part in (what, where, todo) if part))

    def at(self, where: object) -> TcmError:
        """This error with ``where`` filled in, if it names no file or key yet (for errors raised deep inside)."""
        if self.where is not None:
            return self
        return type(self)(self.what, str(where), self.todo)

    def line(self) -> str:
        """The single line the CLI prints (newlines folded, so a message is always one line)."""
        return PREFIX + one_line(self)


def one_line(text: object) -> str:
    """``str(text)`` with every run of whitespace (newlines included) folded into one space."""
    return " ".join(str(text).split())


class ConfigError(TcmError, ValueError):
    exit_code = 2


class RefusedFileError(TcmError):
    exit_code = 3


class MissingFileError(TcmError, FileNotFoundError):
    exit_code = 4


class StorageError(TcmError):
    exit_code = 5


class NonFiniteTrainingError(TcmError):
    exit_code = 6


class OfflineError(TcmError):
    exit_code = 7


# errno values that mean "the machine's storage refused", not "the program is wrong"
_STORAGE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free disk space and rerun (the last good files are intact)"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota and rerun"),
    errno.EFBIG: ("file too large for the file system or the file-size limit", "free space or raise the limit"),
    errno.EACCES: ("permission denied", "give this user access (write access for outputs) or choose another path"),
    errno.EPERM: ("operation not permitted", "give this user access (write access for outputs) or choose another path"),
    errno.EROFS: ("read-only file system", "choose an output path on a writable file system"),
}


def storage_error(error: OSError, path: object = None) -> StorageError | None:
    """The :class:`StorageError` for an ``OSError`` caused by the storage (full, read-only, no permission)."""
    known = _STORAGE_ERRNOS.get(error.errno or -1)
    if known is None:
        return None
    what, todo = known
    where = str(path if path is not None else (error.filename or "an output file"))
    return StorageError(what, where, todo)


def as_expected(error: BaseException) -> TcmError | None:
    """The expected-failure form of ``error`` (itself if a TcmError), or None for a bug."""
    if isinstance(error, TcmError):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOENT, errno.ENOTDIR) and error.filename:
        return MissingFileError("no such file or folder", str(error.filename), "check the path")
    if isinstance(error, OSError):
        return storage_error(error)
    return None
