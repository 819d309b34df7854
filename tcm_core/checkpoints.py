"""Checkpoints: download with resume and sha256, safe loading of foreign pickles, and our own format.

* ``fetch`` downloads (http/https, ``file://`` or a local path) into a temporary file beside the target,
  resumes broken transfers with HTTP Range requests, retries with exponential backoff, verifies sha256
  and only then moves the file into place with ``os.replace``. A file whose sha256 is not pinned gets it
  recorded in ``FILE.sha256`` on first download; later fetches and loads enforce it.
* ``load_network`` reads our ``.safetensors`` + ``.json`` pair, EDM/EDM2/ECT/TCM pickles (through the
  allow-list unpickler in :mod:`tcm_core.safe_pickle`: nothing from the file is executed) and plain
  state dicts (``.pt``/``.pth``, weights-only), and returns our ``Precond`` plus a ``meta`` dict.
* ``save_network`` writes our format atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Any

from tcm_core.atomic import atomic_path, file_mode, write_text_atomic
from tcm_core.hashing import sha256_file

CHUNK_BYTES = 1 << 20
NET_CHUNK_BYTES = 1 << 16  # smaller: a broken connection loses at most one partly read chunk
SHA256_SUFFIX = ".sha256"


class FetchError(RuntimeError):
    """A download, copy or verification failed; the message is one line meant for the user."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read into one of our networks (wrong format, unknown architecture, ...)."""


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


# --- hashing -------------------------------------------------------------------------------------------------


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


def _write_text_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _record_sha256(path: Path, digest: str) -> None:
    _write_text_atomic(sha256_sidecar(path), f"{digest}  {path.name}\n")


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


# --- fetch ---------------------------------------------------------------------------------------------------


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


class _Retryable(Exception):
    """A transient failure of one attempt (connection dropped, 5xx, short body)."""


def _download_http(url: str, tmp: Path, retries: int, backoff: float, timeout: float, out: Path) -> str:
    """Download ``url`` into ``tmp`` (resuming with Range); return the sha256 of the whole file."""
    import requests

    digest = hashlib.sha256()
    received = 0
    last_error: BaseException | None = None
    ever_connected = False
    attempts = max(1, int(retries))
    with requests.Session() as session, open(tmp, "wb") as f:
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
            headers = {"Accept-Encoding": "identity"}
            if received:
                headers["Range"] = f"bytes={received}-"
            try:
                with session.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True) as resp:
                    ever_connected = True
                    status = resp.status_code
                    if status == 206 and received:
                        start = _content_range_start(resp.headers.get("Content-Range"))
                        if start != received:
                            raise _Retryable(f"server resumed at byte {start}, expected {received}")
                    elif status == 200:
                        if received:  # the server ignored the Range header: start over
                            f.seek(0)
                            f.truncate()
                            digest = hashlib.sha256()
                            received = 0
                    elif status == 416 and received:
                        f.seek(0)
                        f.truncate()
                        digest = hashlib.sha256()
                        received = 0
                        raise _Retryable("server refused the resume range")
                    elif status == 404:
                        raise FetchError(f"HTTP 404 Not Found: {url} (check the URL or registry name)")
                    elif 500 <= status < 600 or status == 429:
                        raise _Retryable(f"HTTP {status} {resp.reason}")
                    else:
                        raise FetchError(f"HTTP {status} {resp.reason} from {url}")
                    length = resp.headers.get("Content-Length")
                    total = received + int(length) if length is not None and length.isdigit() else None
                    with _progress(total, received, out.name) as bar:
                        for chunk in resp.iter_content(NET_CHUNK_BYTES):
                            if not chunk:
                                continue
                            f.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
                    f.flush()
                    if total is not None and received != total:
                        raise _Retryable(f"connection closed after {received} of {total} bytes")
                    return digest.hexdigest()
            except (_Retryable, requests.exceptions.RequestException) as exc:
                if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
                    raise FetchError(f"invalid URL {url}: {exc}") from None
                last_error = exc
                # Keep what arrived: write the buffered bytes so the next Range starts at `received`.
                f.flush()
                continue
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
    return " ".join(str(exc).split()) if exc is not None else "unknown error"


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
                actual = _download_http(source, tmp, retries, backoff, timeout, out)
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
    return _finish_in_place(out, actual, expected, name)


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


# --- architecture from foreign constructor kwargs ------------------------------------------------------------

_PRECOND_ARCH_KEYS = ("img_resolution", "img_channels", "label_dim", "sigma_data")
# Constructor kwargs with no counterpart in our networks (fp16 is a storage choice; the logvar head is
# not built; sigma_min/max only bound EDM's own sampler).
_IGNORED_KWARGS = {"use_fp16", "sigma_min", "sigma_max", "logvar_channels", "class_name", "out_channels"}
_SONGUNET_VARIANT_KEYS = ("embedding_type", "encoder_type", "decoder_type")
_EDM2_BACKBONE_NAMES = ("UNet", "EDM2UNet")


def _jsonable(value: Any) -> Any:
    """Plain JSON data from pickled kwargs (numpy scalars -> Python numbers, tuples -> lists)."""
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # strict JSON has no inf/nan
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _backbone_keys(model_type: str) -> set[str]:
    from tcm_core.networks import EDM2UNet, SongUNet

    backbone = SongUNet if model_type == "SongUNet" else EDM2UNet
    keys = set(inspect.signature(backbone.__init__).parameters) - {"self", "img_resolution", "img_channels"}
    keys -= {"in_channels", "out_channels", "label_dim"}
    if model_type == "SongUNet":
        keys |= set(_SONGUNET_VARIANT_KEYS)
    return keys


def arch_from_pickle(ema: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our ``arch`` dict from a pickled EDM/ECT/TCM (SongUNet) or EDM2 precond holder.

    Returns ``(arch, ignored)`` where ``ignored`` holds constructor kwargs with no counterpart here.
    ``augment_dim`` is mapped to 0 (ECT/TCM train without augmentation labels; ``map_augment`` is dropped).
    """
    from tcm_core.safe_pickle import PersistentHolder, find_submodule

    if not isinstance(ema, PersistentHolder):
        raise CheckpointError("the pickle's network is not a persistent network object")
    outer = _jsonable(ema.init_kwargs)
    if find_submodule(ema, "unet") is not None:
        inner_holder, model_type = find_submodule(ema, "unet"), "EDM2UNet"
    else:
        inner_holder = find_submodule(ema, "model")
        inner_name = inner_holder.class_name if inner_holder is not None else None
        declared = outer.get("model_type", inner_name)
        if inner_name in _EDM2_BACKBONE_NAMES or declared in _EDM2_BACKBONE_NAMES:
            model_type = "EDM2UNet"
        elif declared == "SongUNet" or inner_name == "SongUNet":
            model_type = "SongUNet"
        else:
            raise CheckpointError(
                f"unsupported backbone {declared or inner_name!r} in {ema.class_name} "
                f"(supported: SongUNet (DDPM++) and the EDM2 UNet)"
            )
    inner = _jsonable(inner_holder.init_kwargs) if inner_holder is not None else {}
    if "in_channels" in inner:
        if inner.get("out_channels", inner["in_channels"]) != inner["in_channels"]:
            raise CheckpointError("backbone with in_channels != out_channels is not supported")
        inner["img_channels"] = inner.pop("in_channels")
        inner.pop("out_channels", None)
    merged = {**inner, **outer}  # the precond's kwargs were passed down; they win on a conflict
    merged.pop("model_type", None)
    allowed = _backbone_keys(model_type)
    arch: dict[str, Any] = {"model_type": model_type}
    ignored: dict[str, Any] = {}
    for key, value in merged.items():
        if key in _PRECOND_ARCH_KEYS or key in allowed:
            arch[key] = value
        else:
            ignored[key] = value
    for key in ("img_resolution", "img_channels"):
        if key not in arch:
            raise CheckpointError(f"the pickle's constructor kwargs lack {key!r}; cannot tell the architecture")
    arch.setdefault("label_dim", 0)
    arch.setdefault("sigma_data", 0.5)
    if model_type == "SongUNet":
        arch["augment_dim"] = 0
    return arch, ignored


def map_state_dict(state: dict[str, Any], arch: dict[str, Any]) -> OrderedDict[str, Any]:
    """EDM/EDM2/ECT/TCM names -> ours: ``unet.`` -> ``model.``, drop the logvar head and (when
    ``augment_dim`` is 0) ``model.map_augment.*``, cast floating tensors to fp32."""
    import torch

    out: OrderedDict[str, Any] = OrderedDict()
    for name, tensor in state.items():
        if name.startswith("unet."):
            name = "model." + name[len("unet.") :]
        if name.startswith(("logvar_fourier.", "logvar_linear.")):
            continue
        if name.startswith("model.map_augment.") and not arch.get("augment_dim"):
            continue
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state entry {name!r} is not a tensor")
        out[name] = tensor.detach().to(torch.float32) if tensor.is_floating_point() else tensor.detach()
    return out


# Above this many weights, networks are built on the meta device (no memory, no random init). Smaller ones
# are built directly: cheaper than the one-off import that meta-device construction triggers in torch.
_META_BUILD_NUMEL = 20_000_000


def _build_empty(arch: dict[str, Any], numel_hint: int) -> Any:
    import torch

    from tcm_core.networks import build_precond

    try:
        if numel_hint > _META_BUILD_NUMEL:
            with torch.device("meta"):
                return build_precond(arch)
        return build_precond(arch)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot build the checkpoint's architecture: {_one_line(exc)}") from None


def _build_loaded(arch: dict[str, Any], state: dict[str, Any], device: Any) -> Any:
    """Build the network for ``arch`` and load ``state`` strictly."""
    from tcm_core.networks import build_precond

    net = _build_empty(arch, sum(t.numel() for t in state.values()))
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the architecture: missing {_abbrev(missing)}, unexpected {_abbrev(unexpected)}"
        )
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not match the architecture: {_one_line(exc)[:600]}") from None
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
        # Something outside the state dict (a non-persistent buffer) stayed unmaterialised: build for real.
        net = build_precond(arch)
        net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def _abbrev(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# --- our own format ---------------------------------------------------------------------------------------------


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_network(net: Any, path: str | Path, *, iteration: int, provenance: dict[str, Any]) -> None:
    """Write ``X.safetensors`` (weights, fp32 as held) and ``X.json`` (arch, iteration, provenance), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path}")
    if int(iteration) < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    arch = getattr(net, "arch", None)
    if not arch:
        raise ValueError("net has no .arch dict (build it with tcm_core.networks.build_precond)")
    record = {"arch": arch, "iteration": int(iteration), "provenance": dict(provenance)}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"  # fails early on non-JSON provenance
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "tcm-network", "arch": json.dumps(arch)})
    _write_text_atomic(_json_path(path), text)


# --- loading ------------------------------------------------------------------------------------------------------


def _check_recorded(path: Path, digest: str) -> None:
    recorded = recorded_sha256(path)
    if recorded is not None and recorded != digest:
        raise CheckpointError(
            f"checksum mismatch for {path}: expected sha256 {recorded} (from {sha256_sidecar(path)}), actual {digest}"
        )


def _read_arch_json(path: Path) -> dict[str, Any] | None:
    sibling = _json_path(path)
    if not sibling.is_file():
        return None
    record = json.loads(sibling.read_text())
    return record.get("arch", record) if isinstance(record, dict) else None


def _ema_from_pickle(obj: Any) -> tuple[Any, str]:
    """The EMA network holder and the file flavour from a loaded pickle's top-level object."""
    from tcm_core.safe_pickle import PersistentHolder

    if isinstance(obj, PersistentHolder):
        return obj, "network"
    if isinstance(obj, dict) and isinstance(obj.get("ema"), PersistentHolder):
        return obj["ema"], "snapshot"
    if isinstance(obj, dict) and isinstance(obj.get("net"), PersistentHolder):
        return obj["net"], "training-state"
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"no network in the pickle (expected a dict with 'ema'); found {keys}")


def _plain_state_dict(obj: Any) -> dict[str, Any]:
    import torch

    for key in ("ema", "state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the file is not a plain state dict of tensors")
    return obj


def _read_pickle(path: Path) -> tuple[Any, Any]:
    import pickle

    from tcm_core.safe_pickle import UnsafePickleError, safe_load

    try:
        obj = safe_load(path)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable network pickle: {_one_line(exc)[:300]}") from None
    ema, _ = _ema_from_pickle(obj)
    return obj, ema


def load_network(
    path: str | Path,
    device: Any = "cpu",
    arch_overrides: dict[str, Any] | None = None,
    *,
    arch: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint into our ``Precond`` (in eval mode, fp32); return ``(net, meta)``.

    Formats by suffix: ``.safetensors`` (ours, with ``X.json``), ``.pkl`` (EDM/EDM2/ECT/TCM pickles, read by
    the allow-list unpickler: nothing in the file is executed) and ``.pt``/``.pth`` (plain state dicts read
    weights-only; the architecture comes from ``arch`` or a sibling ``X.json``). ``arch_overrides`` are applied
    to the architecture (e.g. ``{"dropout": 0.2}``). A ``FILE.sha256`` record beside the file is enforced.
    ``meta``: ``format``, ``arch``, ``iteration`` (0 for foreign files), ``provenance``, ``sha256`` (+ details).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    digest = sha256_file(path)
    _check_recorded(path, digest)
    suffix = path.suffix.lower()
    meta: dict[str, Any] = {"sha256": digest, "iteration": 0}
    if suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        record: dict[str, Any] = {}
        if _json_path(path).is_file():
            record = json.loads(_json_path(path).read_text())
        else:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            if "arch" in header:
                record = {"arch": json.loads(header["arch"])}
        base_arch = arch or record.get("arch")
        if not base_arch:
            raise CheckpointError(f"{path}: no architecture ({_json_path(path).name} missing)")
        state = load_file(str(path), device="cpu")
        meta.update(format="safetensors", class_name="Precond", iteration=int(record.get("iteration", 0)),
                    provenance=record.get("provenance", {}))
        arch_final = {**base_arch, **(arch_overrides or {})}
    elif suffix == ".pkl":
        obj, ema = _read_pickle(path)
        base_arch, ignored = arch_from_pickle(ema)
        from tcm_core.safe_pickle import state_dict_from_holder

        arch_final = {**(arch or base_arch), **(arch_overrides or {})}
        state = state_dict_from_holder(ema)
        meta.update(
            format="pickle",
            class_name=ema.class_name,
            flavour="edm2" if base_arch["model_type"] == "EDM2UNet" else "edm",
            ignored_kwargs=ignored,
            provenance={"source": str(path), "sha256": digest, "format": "pickle", "class_name": ema.class_name},
        )
        del obj
    elif suffix in (".pt", ".pth"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's weights-only unpickler refuses anything but tensors and containers
            raise CheckpointError(f"{path} is not a weights-only state dict: {_one_line(exc)[:400]}") from None
        state = _plain_state_dict(loaded)
        base_arch = arch or _read_arch_json(path)
        if not base_arch:
            raise CheckpointError(
                f"{path} is a plain state dict: give its architecture (arch=..., --arch) or a sibling "
                f"{_json_path(path).name} with {{\"arch\": {{...}}}}"
            )
        arch_final = {**base_arch, **(arch_overrides or {})}
        meta.update(format="state_dict", class_name=None,
                    provenance={"source": str(path), "sha256": digest, "format": "state_dict"})
    else:
        raise CheckpointError(f"unknown checkpoint format {path.suffix!r} (use .safetensors, .pkl, .pt or .pth)")
    net = _build_loaded(arch_final, map_state_dict(state, arch_final), device)
    meta["arch"] = net.arch
    return net, meta


# --- inspect -------------------------------------------------------------------------------------------------------


def _parameter_count(arch: dict[str, Any], numel_hint: int) -> int:
    from tcm_core.networks import count_parameters

    return count_parameters(_build_empty(arch, numel_hint))


def inspect_checkpoint(path: str | Path, arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe a checkpoint without running anything from it: format, class, arch, parameter count, sha256."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    info: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path), "recorded_sha256": recorded_sha256(path)}
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        from tcm_core.safe_pickle import parameter_count_from_holder, state_dict_from_holder

        obj, ema = _read_pickle(path)
        info["format"] = "pickle"
        info["top_level_keys"] = sorted(map(str, obj)) if isinstance(obj, dict) else None
        info["class_name"] = ema.class_name
        info["init_kwargs"] = _jsonable(ema.init_kwargs)
        tensors = state_dict_from_holder(ema)
        info["tensors"] = len(tensors)
        numel = sum(t.numel() for t in tensors.values())
        info["parameter_count_in_file"] = parameter_count_from_holder(ema)
        found, ignored = arch_from_pickle(ema)
        info["ignored_kwargs"] = ignored
    elif suffix == ".safetensors":
        from safetensors import safe_open

        info["format"] = "safetensors"
        info["class_name"] = "Precond"
        record = json.loads(_json_path(path).read_text()) if _json_path(path).is_file() else {}
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            info["tensors"] = len(names)
            numel = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
            header = f.metadata() or {}
        found = record.get("arch") or (json.loads(header["arch"]) if "arch" in header else None)
        info["iteration"] = record.get("iteration")
        info["provenance"] = record.get("provenance")
    elif suffix in (".pt", ".pth"):
        try:
            state = _plain_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path} is not a weights-only state dict: {_one_line(exc)[:400]}") from None
        info["format"] = "state_dict"
        info["class_name"] = None
        info["tensors"] = len(state)
        numel = sum(t.numel() for t in state.values())
        found = _read_arch_json(path)
    else:
        raise CheckpointError(f"unknown checkpoint format {path.suffix!r} (use .safetensors, .pkl, .pt or .pth)")
    info["arch"] = arch or found
    info["parameter_count"] = _parameter_count(info["arch"], numel) if info["arch"] else None
    return info


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="checkpoint: .safetensors (ours), .pkl (EDM/EDM2/ECT/TCM), .pt/.pth")
    parser.add_argument("--arch", default=None, help="architecture as JSON (plain state dicts without X.json)")


def run_inspect(args: argparse.Namespace) -> int:
    from tcm_core.safe_pickle import UnsafePickleError

    try:
        arch = json.loads(args.arch) if args.arch else None
        info = inspect_checkpoint(args.file, arch=arch)
    except (UnsafePickleError, CheckpointError, ValueError, OSError) as exc:
        print(f"error: {args.file}: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, sort_keys=True, allow_nan=False))
    return 0
