"""Downloads: the checkpoint registry, ``fetch`` with resume and sha256 pins, and the ``fetch`` CLI.

``fetch`` downloads (http/https, ``file://`` or a local path) into a temporary file beside the target,
resumes broken transfers with HTTP Range requests, retries with exponential backoff, verifies sha256 and
only then moves the file into place with ``os.replace``. A file whose sha256 is not pinned gets it recorded
in ``FILE.sha256`` (the sidecar) on first download; later fetches and loads enforce it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tcm_core.atomic import file_mode, write_text_atomic
from tcm_core.errors import one_line
from tcm_core.hashing import CHUNK_BYTES, sha256_file

NET_CHUNK_BYTES = 1 << 16  # smaller: a broken connection loses at most one partly read chunk
SHA256_SUFFIX = ".sha256"


class FetchError(RuntimeError):
    """A download, copy or verification failed; the message is one line meant for the user."""


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


# --- sha256 pins: the FILE.sha256 sidecar --------------------------------------------------------------------


def sha256_sidecar(path: str | Path) -> Path:
    """``FILE.sha256``: where the first download records the hash of ``FILE``."""
    path = Path(path)
    return path.with_name(path.name + SHA256_SUFFIX)


def recorded_sha256(path: str | Path) -> str | None:
    """The hash recorded beside ``path`` (``sha256sum`` format), or None."""
    sidecar = sha256_sidecar(path)
    if not sidecar.is_file():
        return None
    words = sidecar.read_text().split()
    return _normalise_sha256(words[0], f"recorded hash in {sidecar}") if words else None


def _normalise_sha256(value: str, what: str = "sha256") -> str:
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{what} must be 64 hexadecimal digits, got {value!r}")
    return value


def _record_sha256(path: Path, digest: str) -> None:
    write_text_atomic(sha256_sidecar(path), f"{digest}  {path.name}\n")


def verify_file(path: str | Path, sha256: str | None = None) -> str:
    """Check ``path`` against ``sha256`` or, without one, against ``FILE.sha256``; return its hash.

    Raises ``FetchError`` on a mismatch. A file with neither is accepted and its hash returned.
    """
    path = Path(path)
    expected = _normalise_sha256(sha256) if sha256 else recorded_sha256(path)
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        raise FetchError(f"checksum mismatch for {path}: expected sha256 {expected}, actual {actual}")
    return actual


# --- messages ------------------------------------------------------------------------------------------------


def _pin_hint(name: str | None, digest: str, out: Path) -> str:
    key = f"name: {name}" if name else f"path: {out}"
    return (
        f"recorded sha256 {digest} in {sha256_sidecar(out)}; pin it in config.yaml with "
        f"`init: {{kind: checkpoint, {key}, sha256: {digest}}}`"
    )


def _manual_error(name: str, entry: dict[str, Any], out: Path | None) -> FetchError:
    target = out or Path(entry.get("filename") or f"{name}.pkl")
    return FetchError(
        f"checkpoint '{name}' cannot be downloaded automatically (Google Drive): open {entry['url']} in a "
        f"browser, download it by hand, then give the path: `python -m tcm_core fetch --path FILE --out {target}` "
        f"or `init: {{kind: checkpoint, path: FILE}}` in config.yaml"
    )


def _offline_hint(url: str, out: Path) -> str:
    return (
        f"cannot reach {url}; if this machine is offline, download the file elsewhere, place it by hand "
        f"and pass its path: `python -m tcm_core fetch --path FILE --out {out}` "
        f"(or `init: {{kind: checkpoint, path: FILE}}` in config.yaml)"
    )


def _progress(total: int | None, initial: int, label: str):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in logs and under pytest.
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=None)


# --- http(s) transfer ----------------------------------------------------------------------------------------


class _Retryable(Exception):
    """A transient failure of one attempt (connection dropped, 5xx, short body)."""


class _Received:
    """The bytes of one download written so far into ``file``, and their running sha256."""

    def __init__(self, file: Any) -> None:
        self.file, self.digest, self.count = file, hashlib.sha256(), 0

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.digest, self.count = hashlib.sha256(), 0

    def add(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.digest.update(chunk)
        self.count += len(chunk)


def _check_status(resp: Any, received: _Received, url: str) -> None:
    """Accept a full (200) or resumed (206) response, restarting ``received`` when needed; else raise."""
    status = resp.status_code
    if status == 206 and received.count:
        start = _content_range_start(resp.headers.get("Content-Range"))
        if start != received.count:
            raise _Retryable(f"server resumed at byte {start}, expected {received.count}")
    elif status == 200:
        if received.count:  # the server ignored the Range header: start over
            received.restart()
    elif status == 416 and received.count:
        received.restart()
        raise _Retryable("server refused the resume range")
    elif status == 404:
        raise FetchError(f"HTTP 404 Not Found: {url} (check the URL or registry name)")
    elif 500 <= status < 600 or status == 429:
        raise _Retryable(f"HTTP {status} {resp.reason}")
    else:
        raise FetchError(f"HTTP {status} {resp.reason} from {url}")


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


def _download_http(url: str, tmp: Path, retries: int, backoff: float, timeout: float, out: Path) -> str:
    """Download ``url`` into ``tmp`` (resuming with Range); return the sha256 of the whole file."""
    import requests

    last_error: BaseException | None = None
    ever_connected = False
    attempts = max(1, int(retries))
    with requests.Session() as session, open(tmp, "wb") as f:
        received = _Received(f)
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
            headers = {"Accept-Encoding": "identity"}
            if received.count:
                headers["Range"] = f"bytes={received.count}-"
            try:
                with session.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True) as resp:
                    ever_connected = True
                    _check_status(resp, received, url)
                    _receive_body(resp, received, out.name)
                    return received.digest.hexdigest()
            except (_Retryable, requests.exceptions.RequestException) as exc:
                if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
                    raise FetchError(f"invalid URL {url}: {exc}") from None
                last_error = exc
                # Keep what arrived: write the buffered bytes so the next Range starts at `received.count`.
                f.flush()
    if not ever_connected:
        raise FetchError(_offline_hint(url, out))
    raise FetchError(f"download of {url} failed after {attempts} attempts: {_one_line(last_error)}")


def _content_range_start(value: str | None) -> int | None:
    # "bytes START-END/TOTAL"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def _one_line(exc: BaseException | None) -> str:
    return one_line(exc) if exc is not None else "unknown error"


# --- local sources -------------------------------------------------------------------------------------------


def _copy_local(src: Path, tmp: Path, out: Path) -> str:
    if not src.is_file():
        raise FetchError(f"no such file: {src} (place the checkpoint there by hand or fix the path)")
    digest = hashlib.sha256()
    total = src.stat().st_size
    with open(src, "rb") as fin, open(tmp, "wb") as fout, _progress(total, 0, out.name) as bar:
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
            raise FetchError(f"file:// URL with a remote host is not supported: {source}")
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise FetchError(f"unsupported URL scheme '{parsed.scheme}' in {source} (use http, https, file or a path)")
    return Path(source).expanduser()


# --- fetch ---------------------------------------------------------------------------------------------------


def _resolve_source(source: str, out: Path, sha256: str | None) -> tuple[str, str | None, str | None]:
    """``(source URL or path, registry name or None, expected sha256 or None)`` for a fetch request."""
    name = None
    if source in REGISTRY and not Path(source).exists():
        name, entry = source, REGISTRY[source]
        if entry["manual"]:
            raise _manual_error(name, entry, out)
        source = entry["url"]
        sha256 = sha256 or entry.get("sha256")
    try:
        expected = _normalise_sha256(sha256) if sha256 else recorded_sha256(out)
    except ValueError as exc:
        raise FetchError(str(exc)) from None
    return source, name, expected


def fetch(
    source: str,
    out: str | Path,
    sha256: str | None = None,
    retries: int = 5,
    *,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> Path:
    """Place ``source`` at ``out`` verified, atomically; return ``out``.

    ``source`` is a REGISTRY name, an http(s) or ``file://`` URL, or a local path. The expected hash is
    ``sha256``, else the registry's, else the one recorded in ``out.sha256`` by an earlier fetch. Without
    any, the hash is computed, recorded in ``out.sha256`` and a hint on pinning it is printed. If ``out``
    already exists and matches the expected hash, nothing is transferred. On any failure the temporary
    file is removed and ``FetchError`` raised; ``out`` is only ever replaced by a complete, verified file.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    if backoff < 0:
        raise ValueError(f"backoff must be >= 0, got {backoff}")
    out = Path(out)
    source, name, expected = _resolve_source(source, out, sha256)
    src_path = _local_path_of(source)
    present = None
    if out.is_file():
        present = sha256_file(out)
        if expected is None:
            # Placed by hand (or by an earlier run) and nothing to compare with: adopt it and record its hash.
            print(f"using the existing {out}", file=sys.stderr)
            return _finish_in_place(out, present, None, name)
        if present == expected:
            return out  # already in place and verified
    if src_path is not None and src_path.exists() and out.exists() and os.path.samefile(src_path, out):
        actual = sha256_file(out)  # the file was placed by hand at the target itself
        return _finish_in_place(out, actual, expected, name)
    actual = _transfer(source, src_path, out, expected, present, retries=retries, backoff=backoff, timeout=timeout)
    return _finish_in_place(out, actual, expected, name)


def _transfer(source: str, src_path: Path | None, out: Path, expected: str | None, present: str | None,
              **http: Any) -> str:
    """Download or copy into a temporary file beside ``out``, verify, move it into place; return its hash."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        os.close(fd)
    except OSError as exc:
        raise FetchError(f"cannot write into {out.parent}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        try:
            if src_path is None:
                actual = _download_http(source, tmp, http["retries"], http["backoff"], http["timeout"], out)
            else:
                actual = _copy_local(src_path, tmp, out)
        except OSError as exc:
            raise FetchError(f"disk error while writing {out}: {exc.strerror or exc}") from None
        if expected is not None and actual != expected:
            raise FetchError(
                f"checksum mismatch for {source}: expected sha256 {expected}, actual {actual}; "
                f"the downloaded file was deleted"
            )
        try:
            os.chmod(tmp, file_mode())  # mkstemp's 0600 -> what a plain open() would give
            os.replace(tmp, out)
        except OSError as exc:
            raise FetchError(f"disk error while moving the download to {out}: {exc.strerror or exc}") from None
    except FetchError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if present is not None and present != expected:
            raise FetchError(
                f"{exc}; the existing {out} does not match either: expected sha256 {expected}, actual {present}"
            ) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return actual


def _finish_in_place(out: Path, actual: str, expected: str | None, name: str | None) -> Path:
    if expected is not None and actual != expected:
        raise FetchError(f"checksum mismatch for {out}: expected sha256 {expected}, actual {actual}")
    first_time = recorded_sha256(out) is None
    try:
        _record_sha256(out, actual)
    except OSError as exc:
        raise FetchError(f"disk error while writing {sha256_sidecar(out)}: {exc.strerror or exc}") from None
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
    try:
        if args.name is not None:
            if args.name not in REGISTRY:
                raise FetchError(f"unknown checkpoint name '{args.name}'; known names: {', '.join(REGISTRY)}")
            source = args.name
        else:
            source = args.url if args.url is not None else args.path
            if args.path is not None and not Path(args.path).is_file():
                raise FetchError(f"no such file: {args.path} (place the checkpoint there by hand or fix the path)")
        out = fetch(source, args.out, sha256=args.sha256, retries=args.retries)
    except (FetchError, ValueError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(out)
    return 0
