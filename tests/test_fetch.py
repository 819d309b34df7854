"""fetch(): loopback HTTP server with resume, 404, checksum errors, offline hosts, file:// and local paths; and
under hostile conditions: leftovers at the output, partial files, servers that cut, loop or lack Range, a
killed download, two fetches of one output. One deterministic OUT.part, one OUT.lock, nothing else left."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fault_helpers as fh
import pytest
from checkpoint_helpers import FileServer, closed_port

from tcm_core.errors import MissingFileError, OfflineError, RefusedFileError
from tcm_core.io.downloads import REGISTRY, fetch
from tcm_core.io.hashing import recorded_sha256, sha256_file, sha256_sidecar, verify_file


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment must not intercept loopback traffic.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def payload() -> bytes:
    return os.urandom(3 * (1 << 20) + 12345)  # > 1 chunk, so a cut lands mid-stream


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part") or p.name.startswith("."))


def test_resume_after_dropped_connection(tmp_path, payload):
    with FileServer() as srv:
        srv.files["/ckpt.pkl"] = payload
        srv.drop_first["/ckpt.pkl"] = len(payload) // 2
        out = fetch(f"{srv.url}/ckpt.pkl", tmp_path / "ckpt.pkl", sha256=_sha(payload), backoff=0)
    assert out.read_bytes() == payload
    assert sha256_file(out) == _sha(payload)
    ranges = [r for _, r in srv.requests]
    assert ranges[0] is None
    # The second request resumed from the bytes kept (those of whole chunks read before the cut).
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(payload) // 2
    assert len(srv.requests) == 2
    assert _leftovers(tmp_path) == []


def test_server_ignoring_range_restarts_cleanly(tmp_path, payload):
    with FileServer() as srv:
        srv.files["/x.bin"] = payload
        srv.drop_first["/x.bin"] = len(payload) // 2
        srv.ignore_range.add("/x.bin")
        out = fetch(f"{srv.url}/x.bin", tmp_path / "x.bin", sha256=_sha(payload), backoff=0)
    assert out.read_bytes() == payload  # 200 after a Range request: the partial bytes were discarded
    assert srv.requests[1][1] is not None and srv.requests[1][1].startswith("bytes=")


def test_404_is_a_clear_error_and_leaves_nothing(tmp_path):
    with FileServer() as srv:
        url = f"{srv.url}/missing.pkl"
        with pytest.raises(MissingFileError, match="404") as err:
            fetch(url, tmp_path / "m.pkl", backoff=0)
    assert url in str(err.value)
    assert len(srv.requests) == 1  # 404 is not retried
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_deletes_and_names_both_hashes(tmp_path, payload):
    wrong = _sha(b"something else")
    with FileServer() as srv:
        srv.files["/c.pkl"] = payload
        with pytest.raises(RefusedFileError) as err:
            fetch(f"{srv.url}/c.pkl", tmp_path / "c.pkl", sha256=wrong, backoff=0)
    msg = str(err.value)
    assert wrong in msg and _sha(payload) in msg and "mismatch" in msg
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_names_the_url_and_the_manual_route(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/edm.pkl"
    with pytest.raises(OfflineError) as err:
        fetch(url, tmp_path / "edm.pkl", retries=2, backoff=0, timeout=5)
    msg = str(err.value)
    assert url in msg and "--path" in msg and "offline" in msg
    assert list(tmp_path.iterdir()) == []


def test_file_url_and_local_path(tmp_path, payload):
    src = tmp_path / "src" / "hand placed.pkl"
    src.parent.mkdir()
    src.write_bytes(payload)
    a = fetch(src.as_uri(), tmp_path / "a.pkl", sha256=_sha(payload))
    b = fetch(str(src), tmp_path / "b.pkl")
    assert a.read_bytes() == payload and b.read_bytes() == payload
    with pytest.raises(MissingFileError, match="no such file"):
        fetch(str(tmp_path / "nope.pkl"), tmp_path / "c.pkl")
    assert not (tmp_path / "c.pkl").exists()


def test_first_download_records_hash_then_enforces_it(tmp_path, payload, capsys):
    out = tmp_path / "first.pkl"
    with FileServer() as srv:
        srv.files["/f.pkl"] = payload
        fetch(f"{srv.url}/f.pkl", out, backoff=0)
        assert recorded_sha256(out) == _sha(payload)
        err = capsys.readouterr().err
        assert _sha(payload) in err and "sha256:" in err and "config.yaml" in err
        # Second fetch: already in place and matching the record -> no transfer.
        n = len(srv.requests)
        fetch(f"{srv.url}/f.pkl", out, backoff=0)
        assert len(srv.requests) == n
        assert verify_file(out) == _sha(payload)
        # The file is damaged; the server now serves different bytes: the record is enforced.
        out.write_bytes(b"damaged")
        with pytest.raises(RefusedFileError, match="mismatch"):
            verify_file(out)
        srv.files["/f.pkl"] = b"changed upstream"
        with pytest.raises(RefusedFileError, match="mismatch") as exc:
            fetch(f"{srv.url}/f.pkl", out, backoff=0)
    assert _sha(payload) in str(exc.value) and _sha(b"changed upstream") in str(exc.value)
    assert out.read_bytes() == b"damaged"  # never replaced by an unverified file
    assert _leftovers(tmp_path) == []


_DISK_FULL_SCRIPT = """
import resource, signal, sys
from tcm_core.io.downloads import fetch
from tcm_core.errors import StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG (an OSError)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    fetch(sys.argv[1], sys.argv[2])
except StorageError as exc:
    print(exc.line())
    sys.exit(3)
"""


def test_disk_error_is_clear_and_removes_temp_file(tmp_path, payload):
    src = tmp_path / "s.pkl"
    src.write_bytes(payload)
    (tmp_path / "out").mkdir()
    with FileServer() as srv:
        srv.files["/big.pkl"] = payload
        for source in (str(src), f"{srv.url}/big.pkl"):
            res = subprocess.run([sys.executable, "-c", _DISK_FULL_SCRIPT, source, str(tmp_path / "out" / "x.pkl")],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 3, res.stderr
            assert res.stdout.startswith("tcm: error: file too large") and ".part" in res.stdout
            assert list((tmp_path / "out").iterdir()) == []


def test_manual_registry_entries_explain_what_to_do(tmp_path):
    manual = [n for n, e in REGISTRY.items() if e["manual"]]
    assert manual and all(not REGISTRY[n]["sha256"] for n in REGISTRY)
    for name in manual:
        with pytest.raises(OfflineError) as err:
            fetch(name, tmp_path / "x.pkl")
        assert REGISTRY[name]["url"] in str(err.value) and "--path" in str(err.value)
    assert {"edm-cifar10-uncond-vp", "edm2-img64-s", "edm2-img64-xl"} <= set(REGISTRY)
    assert REGISTRY["edm2-img64-xl"]["url"].endswith("edm2-img64-xl-0671088-0.040.pkl")


@pytest.mark.slow
def test_cli_fetch_success_and_one_line_errors(tmp_path, payload):
    cmd = [sys.executable, "-m", "tcm_core", "fetch"]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    src = tmp_path / "s.pkl"
    src.write_bytes(payload)
    ok = subprocess.run([*cmd, "--path", str(src), "--out", str(tmp_path / "o.pkl")], capture_output=True, text=True,
                        env=env)
    assert ok.returncode == 0, ok.stderr
    assert sha256_sidecar(tmp_path / "o.pkl").read_text().split()[0] == _sha(payload)
    bad = subprocess.run([*cmd, "--url", f"http://127.0.0.1:{closed_port()}/x.pkl", "--retries", "1",
                          "--out", str(tmp_path / "x.pkl")], capture_output=True, text=True, env=env)
    assert bad.returncode == OfflineError.exit_code
    assert "Traceback" not in bad.stderr and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("tcm: error: cannot reach")
    manual = subprocess.run([*cmd, "--name", "tcm-cifar10", "--out", str(tmp_path / "t.pkl")], capture_output=True,
                            text=True, env=env)
    assert manual.returncode == OfflineError.exit_code and "drive.google.com" in manual.stderr
    assert "Traceback" not in manual.stderr


def test_unverified_file_at_out_is_never_adopted(tmp_path, payload, capsys):
    out = tmp_path / "edm.pkl"
    out.write_bytes(payload)
    url = f"http://127.0.0.1:{closed_port()}/edm.pkl"
    with pytest.raises(OfflineError, match="unverified") as err:  # nothing vouches for it: not pinned
        fetch(url, out, retries=1)
    assert f"--path {out} --out {out}" in str(err.value) and recorded_sha256(out) is None
    assert fetch(str(out), out) == out  # the explicit route: the file itself is the source
    assert recorded_sha256(out) == _sha(payload) and _sha(payload) in capsys.readouterr().err
    assert fetch(url, out, retries=1) == out  # now verified by its record: no network needed
    with pytest.raises(OfflineError, match="does not match"):  # a pinned hash that does not match is enforced
        fetch(url, out, sha256=_sha(b"other"), retries=1)
    assert out.read_bytes() == payload


# --- hostile conditions ------------------------------------------------------------------------------------


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
