"""Read EDM / EDM2 / ECT / TCM network pickles without executing anything they contain.

Those pickles are written through NVIDIA's ``torch_utils.persistence``: every network object is reduced to a
call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` carries the *full
source text* of the defining module, which the original loader runs with ``exec``. Plain ``pickle.load``
therefore runs arbitrary code from the file.

``SafeUnpickler`` resolves globals from a fixed allow-list only. The persistence entry point becomes a stub
that returns a :class:`PersistentHolder` (class name, constructor kwargs and the object's ``__dict__``);
the embedded source text is dropped unread. Tensor storages are decoded by ``torch.load(weights_only=True)``.
Every other global is refused with :class:`UnsafePickleError`, which names it.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle needs a global outside the allow-list (or is not a network pickle at all)."""

    def __init__(self, message: str, global_name: str | None = None) -> None:
        super().__init__(message)
        self.global_name = global_name


@dataclass
class PersistentHolder:
    """What a ``persistent_class`` object pickles as, kept as inert data.

    ``state`` is the object's ``__dict__`` (for an ``nn.Module``: ``_parameters``, ``_buffers``,
    ``_modules``, ``_init_args``, ``_init_kwargs``, ...). The module source is deliberately not kept.
    """

    class_name: str
    state: dict[str, Any]
    version: Any = None

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


def _load_storage_from_bytes(data: Any) -> Any:
    """``torch.storage._load_from_bytes``: the payload is a ``torch.save``'d storage; read it weights-only."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("storage payload is not bytes")
    return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")


def _is_storage(obj: Any) -> bool:
    return isinstance(obj, (torch.storage.TypedStorage, torch.UntypedStorage))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not _is_storage(storage):
        raise UnsafePickleError("tensor rebuilt from something that is not a tensor storage")
    if metadata is not None and not isinstance(metadata, dict):
        raise UnsafePickleError("tensor metadata is not a dict")
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
    """Unpickle ``source`` (a path or a binary file) with the allow-list; raises ``UnsafePickleError``."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            return SafeUnpickler(f).load()
    return SafeUnpickler(source).load()


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
    return out


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
