"""Network files: our own format, the one loader for every checkpoint format, and ``inspect``.

* ``save_network`` writes ``X.safetensors`` (the weights, fp32 as held) and ``X.json`` (``arch``, ``iteration``,
  ``provenance``), both atomically.
* ``load_network`` reads ours, EDM/EDM2/ECT/TCM pickles and plain state dicts (the last two through
  :mod:`tcm_core.foreign_checkpoints`) and returns our ``Precond`` plus a ``meta`` dict. A ``FILE.sha256``
  record beside the file (:mod:`tcm_core.downloads`) is enforced.
* ``inspect_checkpoint`` (CLI ``inspect``) describes a checkpoint without running anything from it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from tcm_core.atomic import atomic_path, write_text_atomic
from tcm_core.downloads import recorded_sha256, sha256_sidecar
from tcm_core.errors import one_line
from tcm_core.foreign_checkpoints import (
    CheckpointError,
    describe_pickle,
    describe_state_dict,
    map_state_dict,
    read_pickle_checkpoint,
    read_state_dict_checkpoint,
    recorded_iteration,
)
from tcm_core.hashing import sha256_file

# --- building a network for a file's weights -------------------------------------------------------------------

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
        raise CheckpointError(f"cannot build the checkpoint's architecture: {one_line(exc)}") from None


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
        raise CheckpointError(f"weights do not match the architecture: {one_line(exc)[:600]}") from None
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
    write_text_atomic(_json_path(path), text)


def _own_record(path: Path) -> dict[str, Any]:
    """``X.json`` beside ``X.safetensors``, else ``{"arch": ...}`` from the file's header metadata, else ``{}``."""
    from safetensors import safe_open

    if _json_path(path).is_file():
        return json.loads(_json_path(path).read_text())
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    return {"arch": json.loads(header["arch"])} if "arch" in header else {}


def read_own_checkpoint(path: Path, digest: str, arch: dict[str, Any] | None) -> tuple[dict, dict, dict]:
    """``(state, arch, meta)`` of our ``.safetensors`` + ``.json`` pair."""
    from safetensors.torch import load_file

    record = _own_record(path)
    base_arch = arch or record.get("arch")
    if not base_arch:
        raise CheckpointError(f"{path}: no architecture ({_json_path(path).name} missing)")
    state = load_file(str(path), device="cpu")
    meta = {"format": "safetensors", "class_name": "Precond", "iteration": recorded_iteration(record),
            "provenance": record.get("provenance", {})}
    return state, base_arch, meta


def describe_own(path: Path) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """``inspect`` facts of our format, its number of tensor elements and its arch."""
    from safetensors import safe_open

    record = json.loads(_json_path(path).read_text()) if _json_path(path).is_file() else {}
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
        header = f.metadata() or {}
    found = record.get("arch") or (json.loads(header["arch"]) if "arch" in header else None)
    info = {"format": "safetensors", "class_name": "Precond", "tensors": len(names),
            "iteration": record.get("iteration"), "provenance": record.get("provenance")}
    return info, numel, found


# --- every format ---------------------------------------------------------------------------------------------------

_FORMATS = "use .safetensors, .pkl, .pt or .pth"
_READERS = {".safetensors": read_own_checkpoint, ".pkl": read_pickle_checkpoint,
            ".pt": read_state_dict_checkpoint, ".pth": read_state_dict_checkpoint}
_DESCRIBERS = {".safetensors": describe_own, ".pkl": describe_pickle,
               ".pt": describe_state_dict, ".pth": describe_state_dict}


def _check_recorded(path: Path, digest: str) -> None:
    recorded = recorded_sha256(path)
    if recorded is not None and recorded != digest:
        raise CheckpointError(
            f"checksum mismatch for {path}: expected sha256 {recorded} (from {sha256_sidecar(path)}), actual {digest}"
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
    without an ``iteration`` in their ``X.json``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    digest = sha256_file(path)
    _check_recorded(path, digest)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise CheckpointError(f"unknown checkpoint format {path.suffix!r} ({_FORMATS})")
    state, base_arch, found = reader(path, digest, arch)
    meta: dict[str, Any] = {"sha256": digest, "iteration": None, **found}
    arch_final = {**base_arch, **(arch_overrides or {})}
    net = _build_loaded(arch_final, map_state_dict(state, arch_final), device)
    meta["arch"] = net.arch
    return net, meta


# --- inspect -------------------------------------------------------------------------------------------------------


def _parameter_count(arch: dict[str, Any], numel_hint: int) -> int:
    from tcm_core.networks import count_parameters

    return count_parameters(_build_empty(arch, numel_hint))


def inspect_checkpoint(path: str | Path, arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe a checkpoint without running anything from it: format, class, arch, parameter count, sha256."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    info: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path), "recorded_sha256": recorded_sha256(path)}
    describe = _DESCRIBERS.get(path.suffix.lower())
    if describe is None:
        raise CheckpointError(f"unknown checkpoint format {path.suffix!r} ({_FORMATS})")
    facts, numel, found = describe(path)
    info.update(facts)
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
        print(f"error: {args.file}: {one_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, sort_keys=True, allow_nan=False))
    return 0
