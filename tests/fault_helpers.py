"""Hostile checkpoint inputs for the fault tests, and the real CLI run under a memory limit.

Every builder writes one file (plus its siblings) from a small valid checkpoint of the micro network and
returns the path the command is given. Bombs are small files whose contents claim gigabytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from checkpoint_helpers import Persistent, module_state, persistent_tree, write_pickle
from training_helpers import REPO, cli_env, micro_network, save_micro_checkpoint

MEMORY_LIMIT = 3 << 30  # address space of a CLI child: a bomb fails the test, not the machine
ERROR_PREFIX = "tcm: error: "

# --- the real CLI, memory-limited ----------------------------------------------------------------------------

# `python -m tcm_core ARGS` after setrlimit(RLIMIT_AS) in the child itself (a preexec_fn is not safe while the
# test process runs server threads).
_LIMITED_MAIN = (
    "import resource, runpy, sys; limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); sys.argv[0] = 'tcm_core'; "
    "runpy.run_module('tcm_core', run_name='__main__', alter_sys=True)"
)


def _limited_command(args: list[str], limit: int) -> list[str]:
    return [sys.executable, "-c", _LIMITED_MAIN, str(limit), *args]


def _env() -> dict[str, str]:
    env = {**cli_env(), "NO_PROXY": "127.0.0.1,localhost"}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(var, None)
    return env


def run_limited(args: list[str], timeout: float = 180, limit: int = MEMORY_LIMIT) -> subprocess.CompletedProcess:
    """``python -m tcm_core ARGS`` in a child limited to ``limit`` bytes of address space."""
    return subprocess.run(_limited_command(args, limit), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def popen_limited(args: list[str], limit: int = MEMORY_LIMIT) -> subprocess.Popen:
    """The same, started in the background (stdout/stderr to pipes)."""
    return subprocess.Popen(_limited_command(args, limit), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


_CHILD = Path(__file__).with_name("child_limits.py")


def run_restricted(args: list[str], *, file_size: int = 0, drop_dac: bool = False, limit: int = MEMORY_LIMIT,
                   timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m tcm_core ARGS`` under a memory limit, optionally with writes past ``file_size`` bytes failing
    as on a full disk (EFBIG) and permission bits binding even for root (``tests/child_limits.py``)."""
    command = [sys.executable, str(_CHILD), str(limit), str(file_size), str(int(drop_dac)), "--", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    """The single ``tcm: error:`` line of a failed command: the last stderr line, no traceback, no other error."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert lines and lines[-1].startswith(ERROR_PREFIX) and errors == [lines[-1]], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (to show the last good outputs are untouched)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a failed command (asserting there is exactly one, and no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"rc {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files (atomic-write temps, fetch partials and locks) anywhere below ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith((".part", ".tmp", ".lock")) or p.name.startswith("."))


# --- valid sources --------------------------------------------------------------------------------------------


def own_checkpoint(path: Path) -> Path:
    """Our format: X.safetensors + X.json of the micro network (iteration 7)."""
    return save_micro_checkpoint(path, iteration=7)


def _edm_kwargs(arch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = {k: arch[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")}
    model["augment_dim"] = 0
    outer = {"img_resolution": arch["img_resolution"], "img_channels": arch["img_channels"], "label_dim": 0,
             "use_fp16": False, "sigma_data": 0.5, "model_type": "SongUNet", **model}
    inner = {"img_resolution": arch["img_resolution"], "in_channels": arch["img_channels"],
             "out_channels": arch["img_channels"], "label_dim": 0, **model}
    return outer, inner


def edm_snapshot(path: Path, outer_overrides: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
                 ) -> Path:
    """An EDM training snapshot ``{ema, ...}`` of the micro network in the persistence format."""
    net = micro_network()
    outer, inner = _edm_kwargs(net.arch)
    outer.update(outer_overrides or {})
    children = OrderedDict(model=persistent_tree(net.model, "SongUNet", inner))
    snapshot = {"ema": Persistent("EDMPrecond", module_state(net, children, outer)), **(extra or {})}
    return write_pickle(snapshot, path)


# --- tensors that claim more than they hold -------------------------------------------------------------------


class _Rebuild:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` with any claims."""

    def __init__(self, storage: Any, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> None:
        self.storage, self.size, self.stride, self.offset = storage, size, stride, offset

    def __reduce__(self) -> tuple:
        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                                 OrderedDict())


class _StoragePayload:
    """Pickles as ``torch.storage._load_from_bytes(payload)``, with a hand-written payload."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple:
        return torch.storage._load_from_bytes, (self.payload,)


class _RecordPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj if isinstance(obj, tuple) and obj[:1] == ("storage",) else None


def legacy_storage_payload(claimed: int, data: bytes) -> bytes:
    """torch's legacy storage format for float32, whose record and count claim ``claimed`` elements."""
    out = io.BytesIO()
    for value in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                 "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(value, out, protocol=2)
    _RecordPickler(out, protocol=2).dump(("storage", torch.FloatStorage, "k", "cpu", claimed, None))
    pickle.dump(["k"], out, protocol=2)
    return out.getvalue() + struct.pack("<q", claimed) + data


def _holder_with(parameters: dict[str, Any]) -> Path:
    net = micro_network()
    outer, _ = _edm_kwargs(net.arch)
    state = module_state(torch.nn.Module(), OrderedDict(), outer)
    state["_parameters"] = OrderedDict(parameters)
    return {"ema": Persistent("EDMPrecond", state)}


def rebuild_bomb(path: Path) -> Path:
    """~1 KB: a tensor of 2e9 elements over a 4-element storage (torch would grow the storage to 8 GB)."""
    storage = torch.arange(4, dtype=torch.float32).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    return write_pickle(_holder_with({"w": _Rebuild(typed, (2_000_000_000,), (1,))}), path)


def storage_count_bomb(path: Path) -> Path:
    """A storage payload whose record claims 2e9 elements over 16 bytes (torch.load allocates 8 GB first)."""
    payload = _StoragePayload(legacy_storage_payload(2_000_000_000, bytes(16)))
    return write_pickle(_holder_with({"w": _Rebuild(payload, (4,), (1,))}), path)


def shared_view_bomb(path: Path, views: int = 1200) -> Path:
    """~2 MB: one fp16 storage of 1M elements, viewed whole by ``views`` tensors (the fp32 cast: ~5 GB)."""
    storage = torch.zeros(1 << 20, dtype=torch.float16).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float16, _internal=True)
    return write_pickle(_holder_with({f"w{i}": _Rebuild(typed, (1 << 20,), (1,)) for i in range(views)}), path)


def raw_pickle(path: Path, body: bytes) -> Path:
    path.write_bytes(b"\x80\x04" + body)
    return path


def binbytes8_bomb(path: Path) -> Path:
    return raw_pickle(path, b"\x8e" + (1 << 62).to_bytes(8, "little") + b"tiny")  # BINBYTES8 of 4 EiB


def frame_bomb(path: Path) -> Path:
    return raw_pickle(path, b"\x95" + (1 << 40).to_bytes(8, "little") + b"N.")  # FRAME of 1 TiB


def memo_bomb(path: Path) -> Path:
    return raw_pickle(path, b"N" + b"r" + (2**32 - 1).to_bytes(4, "little") + b".")  # LONG_BINPUT 4294967295


# --- our format, damaged ---------------------------------------------------------------------------------------


def _header(path: Path) -> tuple[int, dict[str, Any], bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def rewrite_header(path: Path, edit: Any) -> Path:
    """Re-encode the safetensors header after ``edit(header)`` (tensor data unchanged)."""
    _, header, body = _header(path)
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


def first_tensor(header: dict[str, Any]) -> dict[str, Any]:
    return header[next(k for k in sorted(header) if k != "__metadata__")]


def damaged_bytes(path: Path, kind: str) -> Path:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    variants = {
        "empty": b"",
        "seven bytes": data[:7],
        "truncated data": data[: len(data) - 100],
        "truncated header": data[: 8 + n // 2],
        "random bytes": os.urandom(4096),
        "huge header length": struct.pack("<Q", 2**63 - 1) + data[8:],
        "overrunning header length": struct.pack("<Q", len(data)) + data[8:],
        "non-JSON header": struct.pack("<Q", n) + b"\xff" * n + data[8 + n:],
    }
    path.write_bytes(variants[kind])
    return path


def set_sidecar(path: Path, text: str) -> Path:
    path.with_suffix(".json").write_text(text)
    return path


def edit_sidecar_arch(path: Path, **arch: Any) -> Path:
    record = json.loads(path.with_suffix(".json").read_text())
    record["arch"].update(arch)
    return set_sidecar(path, json.dumps(record))


def poison_weight(path: Path, value: float) -> Path:
    """Set one element of the first float tensor in the data to ``value`` (NaN or inf)."""
    n, header, body = _header(path)
    entry = next(v for k, v in sorted(header.items()) if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + n + entry["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[start:start + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    return path


def numel_of(header: dict[str, Any]) -> int:
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


# --- datasets, damaged ------------------------------------------------------------------------------------------


def png_bytes(width: int, height: int, channels: int = 1) -> bytes:
    import numpy as np
    from PIL import Image

    array = np.zeros((height, width, channels), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if channels == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims ``width`` x ``height`` pixels (no pixel data behind it)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def dataset_zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def images(count: int, width: int = 8, height: int = 8) -> dict[str, bytes]:
    return {f"00000/img{i:08d}.png": png_bytes(width, height) for i in range(count)}


def labels_json(names: list[str], labels: list[Any]) -> bytes:
    return json.dumps({"labels": [[n, v] for n, v in zip(names, labels)]}).encode()


def claim_member_size(path: Path, size: int) -> Path:
    """Make the zip's central directory claim ``size`` uncompressed bytes for its first member."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    data[at + 24:at + 28] = struct.pack("<I", size)
    path.write_bytes(bytes(data))
    return path


def hostile_dataset(path: Path, kind: str) -> Path:
    """One damaged or hostile EDM-layout dataset (``kind`` a key of ``DATASET_KINDS``)."""
    four = images(4)
    names = sorted(four)
    builders = {
        "random bytes": lambda: path.write_bytes(os.urandom(2048)),
        "truncated zip": lambda: path.write_bytes(dataset_zip(path, four).read_bytes()[:300]),
        "an image of garbage": lambda: dataset_zip(path, {**four, names[0]: b"not a png at all"}),
        "a truncated PNG": lambda: dataset_zip(path, {**four, names[0]: png_bytes(8, 8)[:40]}),
        "a PNG claiming 100000x100000 pixels": lambda: dataset_zip(path, {**four,
                                                                         names[0]: png_claiming(10**5, 10**5)}),
        "a member claiming 4 GB": lambda: claim_member_size(dataset_zip(path, four), 2**32 - 1),
        "dataset.json not JSON": lambda: dataset_zip(path, {**four, "dataset.json": b"{labels: oops"}),
        "labels not pairs": lambda: dataset_zip(path, {**four, "dataset.json": b'{"labels": [1, 2, 3, 4]}'}),
        "a label of 1e9": lambda: dataset_zip(path, {**four, "dataset.json": labels_json(names, [0, 1, 2, 10**9])}),
        "a negative label": lambda: dataset_zip(path, {**four, "dataset.json": labels_json(names, [0, 1, 2, -1])}),
        "a label missing": lambda: dataset_zip(path, {**four, "dataset.json": labels_json(names[:3], [0, 1, 2])}),
        "non-square images": lambda: dataset_zip(path, images(4, 8, 6)),
        "images of two sizes": lambda: dataset_zip(path, {**four, names[0]: png_bytes(16, 16)}),
        "no images": lambda: dataset_zip(path, {"dataset.json": b'{"labels": null}'}),
    }
    builders[kind]()
    return path


DATASET_KINDS = {  # kind -> fragment of the one line (all RefusedFileError naming the dataset, exit 3)
    "random bytes": "not a readable dataset", "truncated zip": "not a readable dataset",
    "an image of garbage": "not a readable dataset", "a truncated PNG": "not a readable dataset",
    "a PNG claiming 100000x100000 pixels": "DecompressionBombError", "a member claiming 4 GB": "claims 4,294,967,295",
    "dataset.json not JSON": "not a readable dataset", "labels not pairs": "not a readable dataset",
    "a label of 1e9": "labels must be in", "a negative label": "labels must be in", "a label missing": "no label",
    "non-square images": "square", "images of two sizes": "differs from the first", "no images": "holds no images",
}
