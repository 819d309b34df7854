"""Network files: our own format, the one loader for every checkpoint format, and ``inspect``.

* ``save_network`` writes ``X.safetensors`` (the weights, fp32 as held) and ``X.json`` (``arch``, ``iteration``,
  ``provenance``), both atomically (both written in full before either replaces an older one) and byte-for-byte
  deterministic (sorted header, tensors in a fixed order).
* ``load_network`` reads ours, EDM/EDM2/ECT/TCM pickles and plain state dicts (the last two through
  :mod:`tcm_core.io.foreign_checkpoints`) and returns our ``Precond`` plus a ``meta`` dict. A ``FILE.sha256``
  record beside the file (:mod:`tcm_core.io.downloads`) is enforced.
* ``inspect_checkpoint`` (CLI ``inspect``) describes a checkpoint without running anything from it.

A file is never trusted with memory: the network its architecture describes is first built on the meta
device (no memory), and that build stops as soon as it registers more tensors or elements than the file
holds (``num_blocks: 100000`` or ``model_channels: 1000000`` fail at once); only when every name and shape
matches the file's tensors is it materialised. Weights that are not finite are refused. Every failure is a
:class:`tcm_core.errors.TcmError` naming the file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tcm_core.errors import ConfigError, MissingFileError, TcmError, one_line
from tcm_core.io.atomic import atomic_path
from tcm_core.io.foreign_checkpoints import (
    CheckpointError,
    describe_pickle,
    describe_state_dict,
    map_state_dict,
    read_pickle_checkpoint,
    read_state_dict_checkpoint,
    refusing,
)
from tcm_core.io.hashing import cached_sha256, recorded_sha256, sha256_file, sha256_sidecar

MODEL_TYPES = ("SongUNet", "EDM2UNet")
_FORMATS = "use .safetensors, .pkl, .pt or .pth"

# --- building a network for a file's weights -------------------------------------------------------------------


# Errors a malformed arch dict can raise from the network constructors (wrong types, zero sizes, ...).
_BAD_ARCH = (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, AssertionError, OverflowError,
             AttributeError, RuntimeError)


def _check_arch(arch: Any) -> None:
    if not isinstance(arch, dict):
        raise CheckpointError(f"the architecture is a {type(arch).__name__}, not a dict")
    if arch.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"architecture model_type {arch.get('model_type')!r} is not one of {MODEL_TYPES}")


def build_on_meta(arch: dict[str, Any], tensors: int, numel: int) -> Any:
    """The network for ``arch`` on the meta device (no memory), refused once it outgrows a file of ``tensors``
    tensors holding ``numel`` elements."""
    import torch

    from tcm_core.networks import OverBudget, build_precond, registration_budget

    _check_arch(arch)
    try:
        # twice the file's tensors and elements: an early stop for absurd sizes (the exact match is checked after)
        with registration_budget(2 * tensors + 16, 2 * numel + 4096), torch.device("meta"):
            return build_precond(arch)
    except OverBudget:
        raise CheckpointError(f"the architecture needs far more than the file's {tensors} tensors / {numel} "
                              "weights (its sizes are wrong or absurd)") from None
    except _BAD_ARCH as exc:
        raise CheckpointError(f"cannot build the architecture: {type(exc).__name__}: {one_line(exc)[:300]}") from None


def _check_matches(net: Any, state: dict[str, Any]) -> None:
    """Every name, shape and dtype of ``net``'s state dict equals the file's (after the name mapping)."""
    expected = {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the architecture: missing {_abbrev(missing)}, unexpected {_abbrev(unexpected)}"
        )
    wrong = [f"{k} {list(state[k].shape)} {state[k].dtype} (expected {list(shape)} {dtype})"
             for k, (shape, dtype) in expected.items() if (tuple(state[k].shape), state[k].dtype) != (shape, dtype)]
    if wrong:
        raise CheckpointError(f"weights do not match the architecture: {_abbrev(wrong)}")


def _build_loaded(arch: dict[str, Any], state: dict[str, Any], device: Any) -> Any:
    """Build the network for ``arch`` on meta, check it against ``state``, then materialise it with ``state``."""
    from tcm_core.networks import build_precond

    net = build_on_meta(arch, len(state), sum(t.numel() for t in state.values()))
    _check_matches(net, state)
    net.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
        # Something outside the state dict (a non-persistent buffer) stayed unmaterialised: build for real,
        # which the match above justifies.
        net = build_precond(arch)
        net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def _check_finite(state: dict[str, Any]) -> None:
    import torch

    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"weight {name!r} is not finite (NaN or inf)",
                                  todo="use a checkpoint saved before training diverged, or download it again")


def _abbrev(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# --- X.json, the record beside a network file ---------------------------------------------------------------------


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _check_record(record: dict[str, Any]) -> None:
    if "arch" in record:
        _check_arch(record["arch"])
    iteration = record.get("iteration")
    if iteration is not None and (not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0):
        raise CheckpointError(f"'iteration' is {iteration!r}, not an integer >= 0")
    if not isinstance(record.get("provenance", {}), dict):
        raise CheckpointError("'provenance' is not an object")


def read_record(path: Path) -> dict[str, Any]:
    """``X.json`` beside ``path`` (``{"arch": {...}, "iteration": int, "provenance": {...}}``, or the arch alone),
    checked; ``{}`` when there is none."""
    sidecar = _json_path(path)
    if not sidecar.is_file():
        return {}
    with refusing(sidecar, "not a readable network record"):
        record = json.loads(sidecar.read_bytes())
        if not isinstance(record, dict):
            raise CheckpointError(f"the network record is a JSON {type(record).__name__}, not an object")
        record = record if "arch" in record or "model_type" not in record else {"arch": record}
        _check_record(record)
    return record


# --- our own format ---------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _write_safetensors(tensors: dict[str, Any], metadata: dict[str, str], path: Path) -> None:
    """The safetensors layout with deterministic bytes: the JSON header sorted and space-padded to 8 bytes,
    tensors ordered by (widest element first, name) so every one is aligned. safetensors' own writer orders
    the metadata by a hash seeded per process, so two saves of equal weights would differ."""
    import torch

    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host is not supported")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            f.write(memoryview(tensors[name].reshape(-1).view(torch.uint8).numpy()))


def save_network(net: Any, path: str | Path, *, iteration: int, provenance: dict[str, Any]) -> None:
    """Write ``X.safetensors`` (weights, fp32 as held) and ``X.json`` (arch, iteration, provenance), atomically;
    equal weights, arch, iteration and provenance give equal bytes."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError("a network file must end in .safetensors", str(path))
    if int(iteration) < 0:
        raise ConfigError(f"iteration must be >= 0, got {iteration}", str(path))
    arch = getattr(net, "arch", None)
    if not arch:
        raise ConfigError("net has no .arch dict", str(path), "build it with tcm_core.networks.build_precond")
    record = {"arch": arch, "iteration": int(iteration), "provenance": dict(provenance)}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"  # fails early on non-JSON provenance
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    # both written in full before either is renamed into place: a failed write leaves no new half of the pair
    with atomic_path(path) as tmp:
        _write_safetensors(tensors, {"format": "tcm-network", "arch": json.dumps(arch, sort_keys=True)}, tmp)
        with atomic_path(_json_path(path)) as tmp_json:
            tmp_json.write_text(text)


def _header_arch(path: Path) -> dict[str, Any] | None:
    """The arch in a safetensors file's header metadata (our files carry it), or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if "arch" not in header:
        return None
    arch = json.loads(header["arch"])
    _check_arch(arch)
    return arch


def read_own_checkpoint(path: Path, digest: str, arch: dict[str, Any] | None,
                        record: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``(state, arch, meta)`` of our ``.safetensors`` + ``.json`` pair (or a safetensors file with ``arch``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with refusing(path, "not a readable safetensors file", SafetensorError):
        base_arch = arch or record.get("arch") or _header_arch(path)
        if not base_arch:
            raise CheckpointError(f"no architecture ({_json_path(path).name} missing)",
                                  todo="give the architecture (--arch) or restore the .json beside it")
        state = load_file(str(path), device="cpu")
    meta = {"format": "safetensors", "class_name": "Precond", "iteration": record.get("iteration"),
            "provenance": record.get("provenance", {})}
    return state, base_arch, meta


def describe_own(path: Path, record: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """``inspect`` facts of our format, its number of tensor elements and its arch."""
    from safetensors import SafetensorError, safe_open

    with refusing(path, "not a readable safetensors file", SafetensorError):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            numel = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
        found = record.get("arch") or _header_arch(path)
    info = {"format": "safetensors", "class_name": "Precond", "tensors": len(names),
            "iteration": record.get("iteration"), "provenance": record.get("provenance")}
    return info, numel, found


# --- every format ---------------------------------------------------------------------------------------------------

_READERS = {".safetensors": read_own_checkpoint, ".pkl": read_pickle_checkpoint,
            ".pt": read_state_dict_checkpoint, ".pth": read_state_dict_checkpoint}
_DESCRIBERS = {".safetensors": describe_own, ".pkl": describe_pickle,
               ".pt": describe_state_dict, ".pth": describe_state_dict}


def _checked_file(path: Path, handlers: dict[str, Any]) -> Any:
    """The handler for ``path``'s format; a missing file or an unknown suffix is an error naming it."""
    if not path.is_file():
        raise MissingFileError("no such checkpoint", str(path), "check the path, or fetch the checkpoint first")
    handler = handlers.get(path.suffix.lower())
    if handler is None:
        raise CheckpointError(f"unknown checkpoint format {path.suffix!r}", str(path), _FORMATS)
    return handler


def _check_recorded(path: Path, digest: str) -> None:
    recorded = recorded_sha256(path)
    if recorded is not None and recorded != digest:
        raise CheckpointError(
            f"checksum mismatch: expected sha256 {recorded} (from {sha256_sidecar(path).name}), actual {digest}",
            str(path), "fetch the checkpoint again (or delete the .sha256 record if you replaced it on purpose)"
        )


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
    ``meta``: ``format``, ``arch``, ``iteration``, ``provenance``, ``sha256`` (+ details). ``iteration`` is the
    int our format records, and ``None`` for a checkpoint that records none (foreign pickles, plain state dicts
    without an ``iteration`` in their ``X.json``). Failures raise a ``TcmError`` naming the file.
    """
    path = Path(path)
    reader = _checked_file(path, _READERS)
    digest = cached_sha256(path)  # Stage 2 loads one Stage-1 file twice (init and boundary): hash it once
    _check_recorded(path, digest)
    record = read_record(path) if reader is not read_pickle_checkpoint else {}
    state, base_arch, found = reader(path, digest, arch, record)
    meta: dict[str, Any] = {"sha256": digest, "iteration": None, **found}
    with _naming(path):
        _check_arch(base_arch)
        arch_final = {**base_arch, **(arch_overrides or {})}
        state = map_state_dict(state, arch_final)
        _check_finite(state)
        net = _build_loaded(arch_final, state, device)
    meta["arch"] = net.arch
    return net, meta


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    try:
        yield
    except TcmError as exc:
        raise exc.at(path) from None


# --- inspect -------------------------------------------------------------------------------------------------------


def inspect_checkpoint(path: str | Path, arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe a checkpoint without running anything from it: format, class, arch, parameter count, sha256."""
    from tcm_core.networks import count_parameters

    path = Path(path)
    describe = _checked_file(path, _DESCRIBERS)
    info: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path), "recorded_sha256": recorded_sha256(path)}
    record = read_record(path) if describe is not describe_pickle else {}
    facts, numel, found = describe(path, record)
    info.update(facts)
    info["arch"] = arch or found
    if info["arch"]:
        with _naming(path):
            net = build_on_meta(info["arch"], info["tensors"], numel)
        info["parameter_count"] = count_parameters(net)
    else:
        info["parameter_count"] = None
    return info


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="checkpoint: .safetensors (ours), .pkl (EDM/EDM2/ECT/TCM), .pt/.pth")
    parser.add_argument("--arch", default=None, help="architecture as JSON (plain state dicts without X.json)")


def run_inspect(args: argparse.Namespace) -> int:
    try:
        arch = json.loads(args.arch) if args.arch else None
    except ValueError as exc:
        raise ConfigError(f"--arch is not JSON ({one_line(exc)})", "--arch") from None
    info = inspect_checkpoint(args.file, arch=arch)
    print(json.dumps(info, indent=2, sort_keys=True, allow_nan=False))
    return 0
