"""fetch under hostile conditions: leftovers at the output, partial files, servers that cut, loop or lack Range,
a killed download, two fetches of one output. One deterministic OUT.part, one OUT.lock, nothing else left."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import fault_helpers as fh
import pytest
from checkpoint_helpers import FileServer, closed_port

from tcm_core.downloads import fetch
from tcm_core.errors import MissingFileError, OfflineError, RefusedFileError
from tcm_core.hashing import recorded_sha256


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def payload() -> bytes:
    return os.urandom(3 * (1 << 20) + 4321)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ranges(srv: FileServer) -> list[str | None]:
    return [r for _, r in srv.requests]


def _cut_partial(srv: FileServer, path: str, out: Path, cut: int = 200_000) -> int:
    """A fetch whose every response is cut after ``cut`` bytes: it fails and keeps OUT.part; its size."""
    srv.drop_always[path] = cut
    with pytest.raises(OfflineError, match="rerun to resume") as err:
        fetch(f"{srv.url}{path}", out, retries=2, backoff=0)
    del srv.drop_always[path]
    part = out.with_name(out.name + ".part")
    assert part.name in str(err.value) and not out.exists()
    return part.stat().st_size


def test_truncated_leftover_without_sha256_is_replaced_not_pinned(tmp_path, payload, capsys):
    out = tmp_path / "edm.pkl"
    out.write_bytes(payload[:1000])  # an interrupted hand download
    with FileServer() as srv:
        srv.files["/edm.pkl"] = payload
        fetch(f"{srv.url}/edm.pkl", out, backoff=0)
    assert out.read_bytes() == payload and recorded_sha256(out) == _sha(payload)
    assert "replaced the unverified" in capsys.readouterr().err
    assert fh.leftovers(tmp_path) == []


def test_truncated_leftover_offline_is_refused_and_left_alone(tmp_path, payload):
    out = tmp_path / "edm.pkl"
    out.write_bytes(payload[:1000])
    with pytest.raises(OfflineError, match="exists but is unverified") as err:
        fetch(f"http://127.0.0.1:{closed_port()}/edm.pkl", out, retries=1)
    assert f"--path {out} --out {out}" in err.value.line()
    assert out.read_bytes() == payload[:1000] and recorded_sha256(out) is None
    assert fh.leftovers(tmp_path) == []


def test_redirect_loop_is_reported_as_a_loop(tmp_path):
    with FileServer() as srv:
        srv.redirects.update({"/a": "/b", "/b": "/a"})
        with pytest.raises(OfflineError, match="redirects in a loop") as err:
            fetch(f"{srv.url}/a", tmp_path / "a.pkl", backoff=0)
    assert "offline" not in err.value.line() and str(tmp_path / "a.pkl") in err.value.line()
    assert len(srv.requests) <= 31  # one attempt: a loop is not retried
    assert list(tmp_path.iterdir()) == []


def test_cut_bodies_keep_one_partial_and_the_rerun_resumes_from_its_length(tmp_path, payload):
    out = tmp_path / "x.pkl"
    with FileServer() as srv:
        srv.files["/x.pkl"] = payload
        size = _cut_partial(srv, "/x.pkl", out)
        assert 0 < size < len(payload)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pkl.lock", "x.pkl.part"]
        n = len(srv.requests)
        fetch(f"{srv.url}/x.pkl", out, backoff=0)
    assert _ranges(srv)[n] == f"bytes={size}-" and len(srv.requests) == n + 1
    assert out.read_bytes() == payload and recorded_sha256(out) == _sha(payload)
    assert fh.leftovers(tmp_path) == []


def test_server_without_range_restarts_from_zero(tmp_path, payload):
    out = tmp_path / "x.pkl"
    with FileServer() as srv:
        srv.files["/x.pkl"] = payload
        _cut_partial(srv, "/x.pkl", out)
        srv.ignore_range.add("/x.pkl")
        fetch(f"{srv.url}/x.pkl", out, backoff=0)
    assert out.read_bytes() == payload and fh.leftovers(tmp_path) == []


def test_file_changed_upstream_restarts_through_if_range(tmp_path, payload):
    out = tmp_path / "x.pkl"
    with FileServer() as srv:
        srv.files["/x.pkl"] = payload
        _cut_partial(srv, "/x.pkl", out)
        srv.files["/x.pkl"] = new = os.urandom(len(payload))  # another ETag: If-Range gets the whole file
        fetch(f"{srv.url}/x.pkl", out, backoff=0)
    assert out.read_bytes() == new and recorded_sha256(out) == _sha(new)


def test_partial_without_validator_resumes_only_with_a_pin(tmp_path, payload):
    out = tmp_path / "x.pkl"
    with FileServer() as srv:
        srv.files["/x.pkl"] = payload
        srv.no_validator.add("/x.pkl")
        _cut_partial(srv, "/x.pkl", out)
        n = len(srv.requests)
        fetch(f"{srv.url}/x.pkl", tmp_path / "x.pkl", backoff=0)  # nothing vouches for the old bytes: from 0
        assert _ranges(srv)[n] is None and out.read_bytes() == payload
        out.unlink()
        (tmp_path / "x.pkl.sha256").unlink()
        size = _cut_partial(srv, "/x.pkl", out)
        n = len(srv.requests)
        fetch(f"{srv.url}/x.pkl", out, sha256=_sha(payload), backoff=0)  # the pin checks the result: resume
        assert _ranges(srv)[n] == f"bytes={size}-" and out.read_bytes() == payload
    assert fh.leftovers(tmp_path) == []


def test_partial_of_another_url_is_not_resumed(tmp_path, payload):
    out = tmp_path / "x.pkl"
    with FileServer() as srv:
        srv.files["/x.pkl"] = srv.files["/y.pkl"] = payload
        _cut_partial(srv, "/x.pkl", out)
        n = len(srv.requests)
        fetch(f"{srv.url}/y.pkl", out, backoff=0)
    assert _ranges(srv)[n] is None and out.read_bytes() == payload


def test_mismatch_leaves_the_last_good_output(tmp_path, payload):
    out = tmp_path / "x.pkl"
    with FileServer() as srv:
        srv.files["/x.pkl"] = payload
        fetch(f"{srv.url}/x.pkl", out, backoff=0)
        srv.files["/x.pkl"] = b"a new upstream version"
        with pytest.raises(RefusedFileError, match="checksum mismatch"):
            fetch(f"{srv.url}/x.pkl", out, sha256=_sha(b"the pinned new version"), backoff=0)
    assert out.read_bytes() == payload and recorded_sha256(out) == _sha(payload)
    assert fh.leftovers(tmp_path) == []


# --- the real CLI ------------------------------------------------------------------------------------------------


def _wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_cli_fetch_killed_mid_download_resumes_from_the_partial(tmp_path, payload):
    out = tmp_path / "edm.pkl"
    part = out.with_name("edm.pkl.part")
    with FileServer() as srv:
        srv.files["/edm.pkl"] = payload
        srv.stall["/edm.pkl"] = (1 << 20, threading.Event())
        child = fh.popen_limited(["fetch", "--url", f"{srv.url}/edm.pkl", "--out", str(out)])
        _wait_for(lambda: part.is_file() and part.stat().st_size >= 1 << 19)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        _, event = srv.stall.pop("/edm.pkl")
        event.set()
        size = part.stat().st_size
        assert not out.exists() and out.with_name("edm.pkl.lock").is_file()
        rerun = fh.run_limited(["fetch", "--url", f"{srv.url}/edm.pkl", "--out", str(out)])
    assert rerun.returncode == 0, rerun.stderr
    assert _ranges(srv) == [None, f"bytes={size}-"]
    assert out.read_bytes() == payload and recorded_sha256(out) == _sha(payload)
    assert fh.leftovers(tmp_path) == []


@pytest.mark.slow
def test_cli_two_fetches_of_one_output_download_once(tmp_path, payload):
    out = tmp_path / "edm.pkl"
    with FileServer() as srv:
        srv.files["/edm.pkl"] = payload
        srv.stall["/edm.pkl"] = (1 << 20, threading.Event())
        args = ["fetch", "--url", f"{srv.url}/edm.pkl", "--out", str(out)]
        first = fh.popen_limited(args)
        _wait_for(lambda: out.with_name("edm.pkl.part").is_file())
        second = fh.popen_limited(args)
        time.sleep(3)  # the second one starts, finds the lock held and waits
        assert len(srv.requests) == 1
        srv.stall["/edm.pkl"][1].set()
        (_, err1), (_, err2) = first.communicate(timeout=120), second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert "waiting for another fetch" in err2 and len(srv.requests) == 1
    assert out.read_bytes() == payload and fh.leftovers(tmp_path) == []


@pytest.mark.slow
def test_cli_fetch_failures_are_one_line_and_leave_the_last_good_output(tmp_path, payload):
    good = tmp_path / "good.pkl"
    with FileServer() as srv:
        srv.files["/good.pkl"] = payload
        srv.redirects.update({"/a": "/b", "/b": "/a"})
        assert fh.run_limited(["fetch", "--url", f"{srv.url}/good.pkl", "--out", str(good)]).returncode == 0
        srv.files["/good.pkl"] = b"changed upstream"
        leftover = tmp_path / "left.pkl"
        leftover.write_bytes(payload[:999])
        cases = {  # args, exit code, fragment
            "redirect loop": (["--url", f"{srv.url}/a", "--out", str(tmp_path / "a.pkl")], 7, "redirects in a loop"),
            "404": (["--url", f"{srv.url}/none.pkl", "--out", str(tmp_path / "n.pkl")], MissingFileError.exit_code,
                    "404"),
            "mismatch": (["--url", f"{srv.url}/good.pkl", "--sha256", _sha(b"x"), "--out", str(good)], 3,
                         "checksum mismatch"),
            "unverified leftover, offline": (["--url", f"http://127.0.0.1:{closed_port()}/l.pkl", "--retries", "1",
                                              "--out", str(leftover)], 7, "unverified"),
        }
        runs = {name: fh.run_limited(["fetch", *args]) for name, (args, _, _) in cases.items()}
    for name, (args, code, fragment) in cases.items():
        line = fh.error_line(runs[name])
        assert runs[name].returncode == code and line.startswith(fh.ERROR_PREFIX), (name, line)
        assert fragment in line and args[-1] in line, (name, line)
    assert good.read_bytes() == payload and recorded_sha256(good) == _sha(payload)
    assert leftover.read_bytes() == payload[:999] and recorded_sha256(leftover) is None
    assert fh.leftovers(tmp_path) == []
