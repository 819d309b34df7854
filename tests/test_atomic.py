"""Atomic outputs: the target is replaced only on success, leaves no temporary behind, and is not 0600."""

import os
import stat

import pytest

from tcm_core.io.atomic import atomic_path, write_bytes_atomic, write_text_atomic


def test_success_replaces_the_target_with_a_normal_mode(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    old_umask = os.umask(0o022)
    try:
        write_bytes_atomic(target, b"again")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"again"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
