"""The one error path: expected failures become one line and a documented exit code; bugs keep tracebacks."""

from __future__ import annotations

import errno

import pytest

from tcm_core import errors


def test_line_is_one_line_with_what_where_and_todo():
    error = errors.ConfigError("invalid value", "presets.tiny.stage2.rho = 0.01\n(batch 32)", "use rho >= 0.04")
    assert error.line() == "tcm: error: invalid value, presets.tiny.stage2.rho = 0.01 (batch 32), use rho >= 0.04"
    assert "\n" not in error.line()


@pytest.mark.parametrize("cls, code, builtin", [
    (errors.ConfigError, 2, ValueError), (errors.RefusedFileError, 3, None), (errors.MissingFileError, 4,
    FileNotFoundError), (errors.StorageError, 5, None), (errors.NonFiniteTrainingError, 6, None),
    (errors.OfflineError, 7, None)])
def test_exit_codes_and_builtin_types(cls, code, builtin):
    error = cls("x")
    assert error.exit_code == code and isinstance(error, errors.TcmError)
    if builtin is not None:
        assert isinstance(error, builtin)


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_storage_oserrors_are_expected_and_name_the_file(number):
    found = errors.as_expected(OSError(number, "boom", "/some/out/file"))
    assert isinstance(found, errors.StorageError) and "/some/out/file" in found.line()


def test_other_exceptions_are_bugs():
    assert errors.as_expected(OSError(errno.EIO, "io")) is None
    assert errors.as_expected(KeyError("x")) is None
