"""Downloads: the checkpoint registry, ``fetch`` with resume and sha256 pins, and the ``fetch`` CLI.

``fetch(source, out)`` places a verified file at ``out``; ``source`` is a REGISTRY name, an http(s) or
``file://`` URL, or a local path.

* The bytes arrive in ``OUT.part`` beside the target and are moved into place (``os.replace``) only when
  complete and verified. ``OUT.lock`` is held (``flock``) while a fetch of ``out`` runs: a second fetch of the
  same output waits, then finds the file in place. A killed fetch leaves ``OUT.part`` and ``OUT.lock``, which
  records the URL and the server's validator (ETag or Last-Modified); the next fetch resumes from the
  partial's length with an HTTP Range request (``If-Range``: a file changed upstream restarts from byte 0; a
  server without Range support sends it whole). Broken transfers are retried with exponential backoff.
* The expected sha256 is ``sha256``, else the registry's, else the one recorded in ``OUT.sha256`` (the
  sidecar of :mod:`tcm_core.io.hashing`) by an earlier fetch. Without one, the download's hash is recorded and a
  hint on pinning it is printed. A file already at ``out`` is used only when it matches the expected hash, or
  when it is itself the source (``--path OUT``): an unverified file is never adopted, so a truncated leftover
  cannot get pinned.
* Failures are :mod:`tcm_core.errors` classes: ``ConfigError`` (bad arguments), ``MissingFileError`` (no such
  local file, HTTP 404/410), ``RefusedFileError`` (checksum mismatch), ``OfflineError`` (unreachable host,
  redirect loop, retries used up, Google Drive), ``StorageError`` (disk full, no permission).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tcm_core.errors import (
    ConfigError,
    MissingFileError,
    OfflineError,
    RefusedFileError,
    one_line,
    storage_error,
)
from tcm_core.io.atomic import file_mode
from tcm_core.io.hashing import (
    CHUNK_BYTES,
    is_sha256,
    record_sha256,
    recorded_sha256,
    sha256_file,
    sha256_sidecar,
)

NET_CHUNK_BYTES = 1 << 16  # smaller: a broken connection loses at most one partly read chunk


# --- registry (reference §4.1) ------------------------------------------------------------------------------

_GDRIVE_HOWTO = (
    "Google Drive needs a browser: download it by hand, then give the path "
    "(`python -m tcm_core fetch --path FILE --out OUT`, or `init: {kind: checkpoint, path: FILE}` in config.yaml)"
)

# No sha256 is pinned: none can be computed offline and none is published. The first download records it
# in FILE.sha256 and prints how to pin it.
REGISTRY: dict[str, dict[str, Any]] = {
    "edm-cifar10-uncond-vp": {
        "url": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
        "filename": "edm-cifar10-32x32-uncond-vp.pkl",
        "sha256": None,
        "format": "edm-pickle",
        "manual": False,
        "note": "EDM CIFAR-10 unconditional DDPM++ (EDM preconditioning), the TCM/ECT CIFAR-10 initialisation",
    },
    "edm2-img64-s": {
        "url": "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img64-s-1073741-0.075.pkl",
        "filename": "edm2-img64-s-1073741-0.075.pkl",
        "sha256": None,
        "format": "edm2-pickle",
        "manual": False,
        "note": "EDM2 ImageNet-64 S, post-hoc EMA 0.075 (FID 1.58)",
    },
    "edm2-img64-xl": {
        "url": "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img64-xl-0671088-0.040.pkl",
        "filename": "edm2-img64-xl-0671088-0.040.pkl",
        "sha256": None,
        "format": "edm2-pickle",
        "manual": False,
        "note": "EDM2 ImageNet-64 XL, post-hoc EMA 0.040 (FID 1.33)",
    },
    "ect-cifar10": {
        "url": "https://drive.google.com/file/d/1WN_eLTrcl-vB7fMc1HADpacgcO4SNJ_1/view?usp=sharing",
        "filename": None,
        "sha256": None,
        "format": "edm-pickle",
        "manual": True,
        "note": "ECT CIFAR-10 release (FD_DINOv2 checkpoint). " + _GDRIVE_HOWTO,
    },
    "ect-img64-xl": {
        "url": "https://drive.google.com/drive/folders/137l1CdsC25Ez7CCIfN4XuqrNmYbOscWD?usp=sharing",
        "filename": None,
        "sha256": None,
        "format": "edm2-pickle",
        "manual": True,
        "note": "ECT ImageNet-64 ECM-XL (batch 1024, 100k iterations), a Drive folder. " + _GDRIVE_HOWTO,
    },
    "tcm-cifar10": {
        "url": "https://drive.google.com/file/d/1M9djFtf03acsmeAlseaOu2Z2AjQDE1Uz/view",
        "filename": "cifar-stage2-2.46.pkl",
        "sha256": None,
        "format": "edm-pickle",
        "manual": True,
        "note": "TCM CIFAR-10 Stage-2 release. " + _GDRIVE_HOWTO,
    },
    "tcm-img64-edm2-s": {
        "url": "https://drive.google.com/file/d/1RhM0f-SHb_qpiMV9Br2fjE5w2CVYiHFE/view",
        "filename": "imgnet-stage2-edm2s-2.88.pkl",
        "sha256": None,
        "format": "edm2-pickle",
        "manual": True,
        "note": "TCM ImageNet-64 EDM2-S Stage-2 release. " + _GDRIVE_HOWTO,
    },
    "tcm-img64-edm2-xl": {
        "url": "https://drive.google.com/file/d/1XE1RzrTI_dZq-jE0aZ6A5-5naslGaA_F/view",
        "filename": None,
        "sha256": None,
        "format": "edm2-pickle",
        "manual": True,
        "note": "TCM ImageNet-64 EDM2-XL Stage-2 release. " + _GDRIVE_HOWTO,
    },
    "tcm-folder": {
        "url": "https://drive.google.com/drive/folders/1gw6OMKCKaEe3LxSSlJKNhwG-M92u9DsW?usp=sharing",
        "filename": None,
        "sha256": None,
        "format": "folder",
        "manual": True,
        "note": "TCM Drive folder with TCM, EDM and EDM2 checkpoints (e.g. edm2-imgnet64-s.pth). " + _GDRIVE_HOWTO,
    },
}




def _user_sha256(value: str) -> str:
    value = value.strip().lower()
    if not is_sha256(value):
        raise ConfigError(f"sha256 must be 64 hexadecimal digits, got {value!r}", "--sha256")
    return value


# --- messages ------------------------------------------------------------------------------------------------


def _pin_hint(name: str | None, digest: str, out: Path) -> str:
    key = f"name: {name}" if name else f"path: {out}"
    return (
        f"recorded sha256 {digest} in {sha256_sidecar(out)}; pin it in config.yaml with "
        f"`init: {{kind: checkpoint, {key}, sha256: {digest}}}`"
    )


def _by_hand(out: Path) -> str:
    return (f"download it elsewhere, place it by hand and pass its path: `python -m tcm_core fetch --path FILE "
            f"--out {out}` (or `init: {{kind: checkpoint, path: FILE}}` in config.yaml)")


def _manual_error(name: str, entry: dict[str, Any], out: Path) -> OfflineError:
    return OfflineError(f"checkpoint '{name}' cannot be downloaded automatically (Google Drive): open "
                        f"{entry['url']} in a browser", str(out), _by_hand(out))


def _progress(total: int | None, initial: int, label: str):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in logs and under pytest.
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=None)


# --- OUT.part and OUT.lock -------------------------------------------------------------------------------------


class _Partial:
    """``OUT.part`` (the bytes received so far) and ``OUT.lock`` (held while a fetch of OUT runs; it records
    the URL and validator of the bytes in OUT.part, so that a fetch killed mid-way can be resumed)."""

    def __init__(self, out: Path, fd: int) -> None:
        self.out, self.fd = out, fd
        self.part = out.with_name(out.name + ".part")
        self.keep = False  # keep OUT.part (and OUT.lock) for a later resume

    def record(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(os.pread(self.fd, 1 << 16, 0) or b"{}")
            if isinstance(record, dict):
                return record
        return {}

    def write_record(self, record: dict[str, Any]) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(record, sort_keys=True).encode(), 0)

    def size(self) -> int:
        return self.part.stat().st_size if self.part.is_file() else 0


def _lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def _holds(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (a fetch that finished removes its lock file)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[_Partial]:
    """Hold ``OUT.lock`` (waiting for another fetch of ``out``); on exit remove ``OUT.part`` unless it is kept
    for a resume, and ``OUT.lock`` with it."""
    lock = _lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another fetch of {out}", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _holds(fd, lock):
                break
            os.close(fd)
    except OSError as exc:
        raise storage_error(exc, lock) or exc from None
    partial = _Partial(out, fd)
    try:
        yield partial
    finally:
        if not (partial.keep and partial.size()):
            with contextlib.suppress(FileNotFoundError):
                partial.part.unlink()
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # while still held: a waiter notices (_holds) and locks a fresh file
        os.close(fd)


# --- http(s) transfer ----------------------------------------------------------------------------------------


class _Retryable(Exception):
    """A transient failure of one attempt (connection dropped, 5xx, short body)."""


def _validator(resp: Any) -> str | None:
    """The response's strong ETag, else its Last-Modified: what ``If-Range`` may name."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


class _Received:
    """The bytes of one download in ``OUT.part``, their running sha256, and the validator they came with.

    A partial left by an earlier (killed) fetch of the same URL is resumed when its validator is known, or
    when the expected hash will check the result; otherwise it starts over."""

    def __init__(self, partial: _Partial, url: str, expected: str | None) -> None:
        self.partial, self.url = partial, url
        record = partial.record()
        size = partial.size()
        resume = size > 0 and record.get("url") == url and bool(record.get("validator") or expected)
        self.file = open(partial.part, "r+b" if resume else "w+b")
        self.digest, self.count = hashlib.sha256(), 0
        self.validator = record.get("validator") if resume else None
        if resume:
            for chunk in iter(lambda: self.file.read(CHUNK_BYTES), b""):
                self.digest.update(chunk)
                self.count += len(chunk)

    def headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if self.count:
            headers["Range"] = f"bytes={self.count}-"
            if self.validator:
                headers["If-Range"] = self.validator
        return headers

    def restart(self, validator: str | None) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.digest, self.count, self.validator = hashlib.sha256(), 0, validator
        self.partial.write_record({"url": self.url, "validator": validator})

    def add(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.digest.update(chunk)
        self.count += len(chunk)

    def close(self) -> None:
        self.file.close()


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` of a Content-Range header (``bytes START-END/TOTAL`` or ``bytes */TOTAL``)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.split("-", 1)[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _accept(resp: Any, received: _Received, url: str, out: Path) -> bool:
    """Whether the response carries (the rest of) the body; restarts ``received`` on a full (200) response.
    Raises ``_Retryable`` for transient failures and a TcmError for permanent ones."""
    status = resp.status_code
    if status == 206:
        start, _ = _content_range(resp.headers.get("Content-Range"))
        if start != received.count:
            raise _Retryable(f"server resumed at byte {start}, expected {received.count}")
        return True
    if status == 200:  # a fresh body: the server ignored the Range, or the file changed (If-Range)
        received.restart(_validator(resp))
        return True
    if status == 416 and received.count:
        if _content_range(resp.headers.get("Content-Range"))[1] == received.count:
            return False  # OUT.part already holds the whole file
        received.restart(None)
        raise _Retryable("server refused the resume range")
    if status in (404, 410):
        raise MissingFileError(f"HTTP {status} {resp.reason}: {url}", str(out), "check the URL or registry name")
    if 500 <= status < 600 or status == 429:
        raise _Retryable(f"HTTP {status} {resp.reason}")
    raise OfflineError(f"HTTP {status} {resp.reason} from {url}", str(out), _by_hand(out))


def _receive_body(resp: Any, received: _Received, label: str) -> None:
    """Append the response body to ``received``; a body shorter than announced is retryable."""
    length = resp.headers.get("Content-Length")
    total = received.count + int(length) if length is not None and length.isdigit() else None
    with _progress(total, received.count, label) as bar:
        for chunk in resp.iter_content(NET_CHUNK_BYTES):
            if chunk:
                received.add(chunk)
                bar.update(len(chunk))
    received.file.flush()
    if total is not None and received.count != total:
        raise _Retryable(f"connection closed after {received.count} of {total} bytes")


def _attempts(session: Any, url: str, received: _Received, out: Path, http: dict[str, Any]) -> str:
    """Up to ``retries`` requests (backoff between them) until the whole body is in; return its sha256."""
    import requests

    errors: list[BaseException] = []
    for attempt in range(http["retries"]):
        if attempt:
            time.sleep(min(http["backoff"] * 2 ** (attempt - 1), 60.0))
        try:
            with session.get(url, stream=True, timeout=http["timeout"], headers=received.headers()) as resp:
                if _accept(resp, received, url, out):
                    _receive_body(resp, received, out.name)
                return received.digest.hexdigest()
        except requests.exceptions.TooManyRedirects:
            raise OfflineError(f"{url} redirects in a loop (more than {session.max_redirects} redirects)", str(out),
                               "check the URL; the server is misconfigured or needs a browser: " + _by_hand(out)
                               ) from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise ConfigError(f"invalid URL {url} ({one_line(exc)})", "--url") from None
        except (_Retryable, requests.exceptions.RequestException) as exc:
            errors.append(exc)
            received.file.flush()  # keep what arrived: the next Range starts at received.count
    raise _incomplete(url, out, errors, received)


def _incomplete(url: str, out: Path, errors: list[BaseException], received: _Received) -> OfflineError:
    import requests

    connected = any(not isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.ConnectTimeout))
                    for e in errors) or received.count > 0
    if not connected:
        return OfflineError(f"cannot reach {url} ({type(errors[-1]).__name__})", str(out),
                            "if this machine is offline, " + _by_hand(out))
    received.partial.keep = received.count > 0
    kept = f"{received.count} bytes are kept in {received.partial.part.name}: rerun to resume" if received.count \
        else "check the connection and rerun"
    return OfflineError(f"download of {url} did not complete after {len(errors)} attempts "
                        f"({one_line(errors[-1])[:200]})", str(out), kept)


def _download_http(url: str, partial: _Partial, expected: str | None, http: dict[str, Any]) -> str:
    """Download ``url`` into ``OUT.part`` (resuming it when possible); return the sha256 of the whole file."""
    import requests

    with requests.Session() as session, contextlib.closing(_Received(partial, url, expected)) as received:
        try:
            return _attempts(session, url, received, partial.out, http)
        except KeyboardInterrupt:
            partial.keep = True
            raise


# --- local sources -------------------------------------------------------------------------------------------


def _copy_local(src: Path, part: Path, out: Path) -> str:
    if not src.is_file():
        raise MissingFileError("no such file", str(src), "place the checkpoint there by hand or fix the path")
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(part, "wb") as fout, _progress(src.stat().st_size, 0, out.name) as bar:
        for chunk in iter(lambda: fin.read(CHUNK_BYTES), b""):
            fout.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _local_path_of(source: str) -> Path | None:
    """The filesystem path of a ``file://`` URL or a plain path; None for http(s)."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"file:// URL with a remote host is not supported: {source}", "--url")
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise ConfigError(f"unsupported URL scheme '{parsed.scheme}' in {source}", "--url",
                          "use http, https, file or a path")
    return Path(source).expanduser()


# --- fetch ---------------------------------------------------------------------------------------------------


def _resolve_source(source: str, out: Path, sha256: str | None) -> tuple[str, str | None, str | None]:
    """``(source URL or path, registry name or None, pinned sha256 or None)`` for a fetch request."""
    name = None
    if source in REGISTRY and not Path(source).exists():
        name, entry = source, REGISTRY[source]
        if entry["manual"]:
            raise _manual_error(name, entry, out)
        source = entry["url"]
        sha256 = sha256 or entry.get("sha256")
    return source, name, _user_sha256(sha256) if sha256 else None


def _in_place(out: Path, src_path: Path | None, expected: str | None, name: str | None) -> tuple[Path | None, str]:
    """``(out, "")`` when ``out`` is already the verified file; else ``(None, its hash or "")``."""
    if not out.is_file():
        return None, ""
    if src_path is not None and src_path.is_file() and os.path.samefile(src_path, out):
        return _finish(out, sha256_file(out), expected, name), ""  # the file named as source is the target
    present = sha256_file(out)
    if expected is not None and present == expected:
        return out, ""
    return None, present  # unverified or mismatching: only a verified download replaces it


def fetch(
    source: str,
    out: str | Path,
    sha256: str | None = None,
    retries: int = 5,
    *,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> Path:
    """Place ``source`` at ``out`` verified, atomically; return ``out`` (see the module docstring)."""
    if retries < 1:
        raise ConfigError(f"retries must be >= 1, got {retries}", "--retries")
    if backoff < 0:
        raise ConfigError(f"backoff must be >= 0, got {backoff}", "backoff")
    out = Path(out)
    source, name, pinned = _resolve_source(source, out, sha256)
    src_path = _local_path_of(source)
    with _locked(out) as partial:
        expected = pinned or recorded_sha256(out)  # read under the lock: a fetch we waited for may have pinned it
        done, present = _in_place(out, src_path, expected, name)
        if done is not None:
            return done
        actual = _transfer(source, src_path, partial, expected, present,
                           {"retries": int(retries), "backoff": backoff, "timeout": timeout})
        return _finish(out, actual, expected, name)


def _transfer(source: str, src_path: Path | None, partial: _Partial, expected: str | None, present: str,
              http: dict[str, Any]) -> str:
    """Download or copy into ``OUT.part``, verify, move it into place; return its hash."""
    out = partial.out
    try:
        if src_path is None:
            actual = _download_http(source, partial, expected, http)
        else:
            actual = _copy_local(src_path, partial.part, out)
        if expected is not None and actual != expected:
            also = f"; the existing {out.name} does not match either (sha256 {present})" if present else ""
            raise RefusedFileError(f"checksum mismatch for {source}: expected sha256 {expected}, actual {actual}"
                                   f"{also}", str(out), "the download was deleted; check the pinned sha256 or the URL")
        os.chmod(partial.part, file_mode())
        os.replace(partial.part, out)
    except OfflineError as exc:
        if not present:
            raise
        if expected is None:  # an unverified file at out, and nothing to compare it with
            note = (f"{out.name} exists but is unverified: if it is complete, adopt it with "
                    f"`python -m tcm_core fetch --path {out} --out {out}`")
        else:
            note = f"the existing {out.name} does not match the expected sha256 either (it has {present})"
        raise OfflineError(exc.what, exc.where, f"{exc.todo}; {note}") from None
    except OSError as exc:
        partial.keep = False
        raise storage_error(exc, partial.part) or exc from None
    if present and present != actual:
        print(f"replaced the unverified {out} (sha256 {present}) with the download", file=sys.stderr)
    return actual


def _finish(out: Path, actual: str, expected: str | None, name: str | None) -> Path:
    if expected is not None and actual != expected:
        raise RefusedFileError(f"checksum mismatch: expected sha256 {expected}, actual {actual}", str(out),
                               "fetch the file again or check the pinned sha256")
    first_time = recorded_sha256(out) is None
    try:
        record_sha256(out, actual)
    except OSError as exc:
        raise storage_error(exc, sha256_sidecar(out)) or exc from None
    if expected is None and first_time:
        print(_pin_hint(name, actual, out), file=sys.stderr)
    return out


# --- CLI: fetch ----------------------------------------------------------------------------------------------


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--name", help=f"registry name: {', '.join(REGISTRY)}")
    src.add_argument("--url", help="http(s):// or file:// URL")
    src.add_argument("--path", help="a local file (e.g. a checkpoint downloaded by hand)")
    parser.add_argument("--sha256", default=None, help="expected sha256 (hex); default: registry or FILE.sha256")
    parser.add_argument("--out", required=True, type=Path, help="where to place the verified file")
    parser.add_argument("--retries", type=int, default=5, help="download attempts (default 5)")


def run_fetch(args: argparse.Namespace) -> int:
    if args.name is not None:
        if args.name not in REGISTRY:
            raise ConfigError(f"unknown checkpoint name '{args.name}'", "--name", f"known names: {', '.join(REGISTRY)}")
        source = args.name
    else:
        source = args.url if args.url is not None else args.path
        if args.path is not None and not Path(args.path).is_file():
            raise MissingFileError("no such file", args.path, "place the checkpoint there by hand or fix the path")
    print(fetch(source, args.out, sha256=args.sha256, retries=args.retries))
    return 0
