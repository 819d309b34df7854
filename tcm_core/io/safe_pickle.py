"""Read EDM / EDM2 / ECT / TCM network pickles without executing anything they contain.

Those pickles are written through NVIDIA's ``torch_utils.persistence``: every network object is reduced to a
call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` carries the *full
source text* of the defining module, which the original loader runs with ``exec``. Plain ``pickle.load``
therefore runs arbitrary code from the file.

``SafeUnpickler`` resolves globals from a fixed allow-list only. The persistence entry point becomes a stub
that returns a :class:`PersistentHolder` (class name, constructor kwargs and the object's ``__dict__``);
the embedded source text is dropped unread. Every other global is refused with :class:`UnsafePickleError`,
which names it.

Nothing a file claims is allocated before the file's bytes back it (a claim that the bytes do not back raises
``pickle.UnpicklingError``: the file is truncated, corrupt or crafted): before unpickling, ``check_claimed_sizes``
walks the opcodes and refuses a length (``BINBYTES8``, ``FRAME``, ...) longer than the bytes that remain and a
memo index beyond the objects stored so far (the C unpickler would allocate either up front). Tensor
storages (torch's legacy ``torch.save`` format inside ``torch.storage._load_from_bytes``) are parsed here, not
by ``torch.load``, so a storage is exactly as large as its bytes in the file; a tensor rebuilt over a storage
must fit inside it (torch would grow the storage), and all tensors together may not claim more bytes than
their storages hold.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from tcm_core.errors import RefusedFileError

_TODO = "only EDM/EDM2/ECT/TCM network pickles are read: use the checkpoint from its official source"


class UnsafePickleError(RefusedFileError, pickle.UnpicklingError):
    """The pickle needs a global outside the allow-list, claims more than the file holds, or is no network pickle."""

    def __init__(self, what: str, where: str | None = None, todo: str | None = _TODO, *,
                 global_name: str | None = None) -> None:
        super().__init__(what, where, todo)
        self.global_name = global_name

    def at(self, where: object) -> UnsafePickleError:
        if self.where is not None:
            return self
        return UnsafePickleError(self.what, str(where), self.todo, global_name=self.global_name)


@dataclass
class PersistentHolder:
    """What a ``persistent_class`` object pickles as, kept as inert data.

    ``state`` is the object's ``__dict__`` (for an ``nn.Module``: ``_parameters``, ``_buffers``,
    ``_modules``, ``_init_args``, ``_init_kwargs``, ...). The module source is deliberately not kept.
    """

    class_name: str
    state: dict[str, Any]
    version: Any = None

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError("BUILD on a persistent network object (not written by torch_utils.persistence)")

    @property
    def init_kwargs(self) -> dict[str, Any]:
        kwargs = self.state.get("_init_kwargs")
        return dict(kwargs) if isinstance(kwargs, dict) else {}

    @property
    def init_args(self) -> tuple:
        args = self.state.get("_init_args")
        return tuple(args) if isinstance(args, (tuple, list)) else ()


@dataclass
class ModuleDictStub:
    """Stand-in for ``torch.nn.ModuleDict`` (EDM's ``enc``/``dec``); pickle's BUILD hands it the state."""

    state: dict[str, Any] = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected ModuleDict state of type {type(state).__name__}")
        self.state = state


# --- the allow-listed callables -------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta: Any) -> PersistentHolder:
    """Stub for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps data, never the source."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError("persistent object with an unexpected meta record (expected type='class')")
    class_name = meta.get("class_name")
    state = meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise UnsafePickleError("persistent object without a class_name string and a state dict")
    # meta["module_src"] is ignored on purpose: running it is exactly what this loader exists to avoid.
    return PersistentHolder(class_name=class_name, state=state, version=meta.get("version"))


# torch's legacy ``torch.save`` of one storage (what ``TypedStorage.__reduce__`` writes): magic number,
# protocol, sys_info, the storage record ('storage', <X>Storage, key, location, numel, view), [key], then
# the int64 element count and the raw little-endian bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@dataclass
class _StorageRecord:
    dtype: torch.dtype
    key: str
    numel: int


class _DataUnpickler(pickle.Unpickler):
    """Plain data only (numbers, strings, containers): every global and persistent id is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"refused global '{module}.{name}' in a tensor storage record",
                                global_name=f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("unexpected persistent id in a tensor storage payload")


class _StorageRecordUnpickler(_DataUnpickler):
    """The storage record of a legacy payload: ``torch.<X>Storage`` types and one 'storage' persistent id."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage")):
            raise UnsafePickleError("tensor storage payload without a storage record")
        _, dtype, key, _location, numel, view = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not _is_count(numel):
            raise UnsafePickleError("malformed tensor storage record")
        if view is not None:
            raise UnsafePickleError("storage views (torch < 0.4) are not supported")
        return _StorageRecord(dtype, key, numel)


def _load_bounded(stream: io.BytesIO, unpickler: type[pickle.Unpickler]) -> Any:
    check_claimed_sizes(stream)
    return unpickler(stream).load()


def _load_storage_from_bytes(data: Any) -> Any:
    """``torch.storage._load_from_bytes``: parse the legacy storage payload; it allocates exactly its bytes."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("storage payload is not bytes")
    stream = io.BytesIO(bytes(data))
    magic, protocol, sys_info = (_load_bounded(stream, _DataUnpickler) for _ in range(3))
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
        raise UnsafePickleError("storage payload is not in torch's storage format")
    if sys_info.get("little_endian") is not True:
        raise UnsafePickleError("big-endian tensor storages are not supported")
    record = _load_bounded(stream, _StorageRecordUnpickler)
    if not isinstance(record, _StorageRecord) or _load_bounded(stream, _DataUnpickler) != [record.key]:
        raise UnsafePickleError("storage payload with an unexpected storage list")
    numel = int.from_bytes(stream.read(8), "little", signed=True)
    nbytes = numel * record.dtype.itemsize
    if numel != record.numel or nbytes != len(data) - stream.tell():
        raise pickle.UnpicklingError(f"tensor storage claims {record.numel} elements, but its payload holds "
                                     f"{max(len(data) - stream.tell(), 0)} bytes")
    untyped = torch.UntypedStorage.from_buffer(stream.read(), dtype=torch.uint8) if nbytes else torch.UntypedStorage()
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=record.dtype, _internal=True)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_view(storage: torch.storage.TypedStorage, offset: Any, size: Any, stride: Any) -> None:
    """Refuse a tensor whose (offset, size, stride) reaches past its storage (torch would grow the storage)."""
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise pickle.UnpicklingError("tensor size and stride are not tuples of one length")
    if not all(_is_count(v) for v in (offset, *size, *stride)):
        raise pickle.UnpicklingError("tensor offset, size or stride is not a non-negative integer")
    if math.prod(size) == 0:
        return
    extent = offset + sum((n - 1) * step for n, step in zip(size, stride)) + 1
    if extent > storage._size():
        raise pickle.UnpicklingError(f"a tensor of shape {list(size)} needs {extent} elements, but its storage "
                                     f"in the file holds {storage._size()}")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError("tensor rebuilt from something that is not a tensor storage")
    if metadata is not None and not isinstance(metadata, dict):
        raise UnsafePickleError("tensor metadata is not a dict")
    _check_view(storage, storage_offset, size, stride)
    # Backward hooks are never restored: weights need none, and they would be callables from the file.
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, bool(requires_grad), OrderedDict(), metadata
    )


def _rebuild_parameter(data, requires_grad, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("parameter rebuilt from something that is not a tensor")
    # Hooks and extra Python attributes (``_rebuild_parameter_with_state``) are dropped: not weights.
    return torch.nn.Parameter(data, bool(requires_grad))


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy scalar with a non-numeric dtype")
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("numpy scalar payload is not bytes")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, str):
        raise UnsafePickleError("numpy dtype from something that is not a type string")
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.hasobject:
        raise UnsafePickleError("numpy object dtype refused")
    return dtype


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictStub,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("dnnlib.util", "EasyDict"): dict,
    # Plain containers: protocol <= 3 pickles spell sets as a call of the builtin type.
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}

ALLOWED_GLOBALS: tuple[str, ...] = tuple(sorted(f"{m}.{n}" for m, n in _ALLOWED))


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only answers from the allow-list above."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            qualified = f"{module}.{name}"
            raise UnsafePickleError(
                f"refused global '{qualified}': not on the allow-list of network pickles "
                f"(nothing from the file was executed)",
                global_name=qualified,
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id: not a network pickle of the EDM/EDM2/ECT/TCM kind")


def safe_load(source: str | Path | IO[bytes]) -> Any:
    """Unpickle ``source`` (a path or a seekable binary file) with the allow-list; raises ``UnsafePickleError``."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            try:
                return _load_bounded(f, SafeUnpickler)
            except UnsafePickleError as exc:
                raise exc.at(source) from None
    return _load_bounded(source, SafeUnpickler)


# --- claimed sizes: what the C unpickler would allocate before reading -----------------------------------------

_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_LINE_LIMIT = 1 << 20  # protocol-0 text arguments (GLOBAL names, decimal numbers) are short in network pickles
_COUNT_WIDTH = {  # counted arguments: (bytes of the length prefix, signed)
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}
_INDEX_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "FRAME"}  # opcodes whose argument check_claimed_sizes reads


def _read_exact(stream: IO[bytes], n: int, at: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise pickle.UnpicklingError(f"pickle data truncated at byte {at}")
    return data


def _skip_argument(stream: IO[bytes], op: pickletools.OpcodeInfo, pos: int, end: int) -> tuple[int | None, int]:
    """Move past the argument of ``op`` (read at ``pos``); return ``(its value for the memo and frame opcodes,
    the position after it)``. Refuses a counted length that reaches past ``end``."""
    arg, at = op.arg, pos - 1
    if arg is None:
        return None, pos
    if arg.n >= 0:
        data = _read_exact(stream, arg.n, at)
        return (int.from_bytes(data, "little") if op.name in _INDEX_OPS else None), pos + arg.n
    if arg.n == pickletools.UP_TO_NEWLINE:
        for _ in range(2 if arg.name == "stringnl_noescape_pair" else 1):
            line = stream.readline(_LINE_LIMIT)
            if not line.endswith(b"\n"):
                raise pickle.UnpicklingError(f"{op.name} at byte {at} has an unterminated or over-long text argument")
            pos += len(line)
        return (int(line) if op.name in _INDEX_OPS and line.strip().isdigit() else None), pos
    width, signed = _COUNT_WIDTH[arg.n]
    length = int.from_bytes(_read_exact(stream, width, at), "little", signed=signed)
    pos += width
    if not 0 <= length <= end - pos:
        raise pickle.UnpicklingError(f"{op.name} at byte {at} claims {length} bytes, but only {end - pos} remain")
    stream.seek(length, io.SEEK_CUR)
    return None, pos + length


def check_claimed_sizes(stream: IO[bytes]) -> None:
    """Walk the pickle at ``stream``'s position up to STOP and refuse any length or memo index the stream
    cannot back (a ``BINBYTES8`` of 2**60 bytes, a ``FRAME`` past the end, ``LONG_BINPUT 2**32-1``).
    The position is restored; nothing is allocated beyond one argument prefix at a time."""
    start = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    pos, stored = start, 0  # stored: memo entries so far (a pickler numbers them 0, 1, 2, ...)
    while True:
        op = _OPCODES.get(stream.read(1))
        if op is None:
            raise pickle.UnpicklingError(f"unknown opcode or truncated data at byte {pos}")
        value, pos = _skip_argument(stream, op, pos + 1, end)
        if op.name == "FRAME" and value is not None and value > end - pos:
            raise pickle.UnpicklingError(f"FRAME before byte {pos} claims {value} bytes, but only {end - pos} remain")
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if value is None or value > stored:
                raise pickle.UnpicklingError(f"memo index {value} before byte {pos} skips past the {stored} "
                                             f"objects stored")
            if value == stored:  # a new entry (a smaller index overwrites one)
                stored += 1
        elif op.name == "MEMOIZE":
            stored += 1
        elif op.name == "STOP":
            break
    stream.seek(start)


def state_dict_from_holder(root: PersistentHolder | ModuleDictStub) -> OrderedDict[str, torch.Tensor]:
    """The ``state_dict()`` the module tree would have: parameters and persistent buffers, dotted names."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()

    def walk(node: Any, prefix: str) -> None:
        state = node.state if isinstance(node, (PersistentHolder, ModuleDictStub)) else None
        if not isinstance(state, dict):
            raise UnsafePickleError(f"module '{prefix.rstrip('.') or '<root>'}' is not a network object")
        skip = state.get("_non_persistent_buffers_set") or set()
        for key in ("_parameters", "_buffers"):
            for name, tensor in (state.get(key) or {}).items():
                if tensor is None or (key == "_buffers" and name in skip):
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise UnsafePickleError(f"'{prefix}{name}' is not a tensor")
                out[prefix + name] = tensor.detach()
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(root, "")
    _check_shared_storage(out)
    return out


def _check_shared_storage(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that together claim more bytes than their storages hold (views repeated over one
    storage would multiply into fresh memory when they are cast or copied)."""
    storages = {}
    for t in tensors.values():
        storage = t.untyped_storage()
        storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
    claimed = sum(t.numel() * t.element_size() for t in tensors.values())
    held = sum(storages.values())
    if claimed > held:
        raise pickle.UnpicklingError(f"the tensors claim {claimed} bytes, but their storages in the file hold {held}")


def parameter_count_from_holder(root: PersistentHolder | ModuleDictStub) -> int:
    """Number of parameter elements (buffers excluded) stored in the module tree."""
    total = 0

    def walk(node: Any) -> None:
        nonlocal total
        state = getattr(node, "state", None)
        if not isinstance(state, dict):
            return
        total += sum(p.numel() for p in (state.get("_parameters") or {}).values() if isinstance(p, torch.Tensor))
        for child in (state.get("_modules") or {}).values():
            walk(child)

    walk(root)
    return total


def find_submodule(root: PersistentHolder, name: str) -> PersistentHolder | None:
    """The direct child ``name`` of a holder (e.g. ``model`` or ``unet``), when it is a holder."""
    child = (root.state.get("_modules") or {}).get(name)
    return child if isinstance(child, PersistentHolder) else None
