"""Checkpoints written elsewhere: EDM / EDM2 / ECT / TCM network pickles and plain state dicts.

Pickles are read through the allow-list unpickler of :mod:`tcm_core.io.safe_pickle` (nothing from the file is
executed); the architecture comes from the pickled constructor kwargs (``arch_from_pickle``). Plain state
dicts (``.pt``/``.pth``) are read weights-only; their architecture is given (``arch=``) or read from a sibling
``X.json``. ``map_state_dict`` renames the weights to ours: EDM's ``model.`` stays, EDM2's ``unet.`` becomes
``model.``, the logvar head (and ``map_augment`` without augment labels) is dropped, fp16 becomes fp32.

Each format has a reader ``(path, sha256, arch, record) -> (state, arch, meta)`` for ``load_network`` and a
describer ``(path, record) -> (info, tensor elements, arch found)`` for ``inspect`` (``record`` is the sibling
``X.json``, read and checked by :mod:`tcm_core.io.network_files`). Foreign checkpoints carry no iteration of ours:
their ``meta["iteration"]`` is ``None`` (a plain state dict's ``X.json`` may say one). A file that cannot be
read raises :class:`CheckpointError` naming it; nothing in it is executed and nothing it claims is allocated
before its bytes back it (:mod:`tcm_core.io.safe_pickle`; ``.pt`` files must be torch's zip format, uncompressed).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tcm_core.errors import RefusedFileError, TcmError, one_line

REDOWNLOAD = "download the checkpoint again (or check that the path is the file you meant)"


class CheckpointError(RefusedFileError):
    """A checkpoint cannot be read into one of our networks (corrupt, wrong format, unknown architecture, ...)."""

    def __init__(self, what: str, where: str | None = None, todo: str | None = REDOWNLOAD) -> None:
        super().__init__(what, where, todo)


# What reading a malformed file can raise from the unpickler, torch or a hostile structure (a kwargs tree
# of the wrong shape, absurd nesting: RecursionError is a RuntimeError); turned into one CheckpointError.
_MALFORMED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
              OverflowError, RuntimeError)


@contextlib.contextmanager
def refusing(path: Path, what: str, *malformed: type[BaseException]) -> Iterator[None]:
    """Errors while reading ``path``: TcmErrors get the file as their ``where``; malformed-data errors (and
    the format library's own, ``malformed``) become ``CheckpointError(what (reason), path)``."""
    try:
        yield
    except TcmError as exc:
        raise exc.at(path) from None
    except (*_MALFORMED, *malformed) as exc:
        raise CheckpointError(f"{what} ({one_line(exc)[:300]})", str(path)) from None


# --- architecture from foreign constructor kwargs ------------------------------------------------------------

_PRECOND_ARCH_KEYS = ("img_resolution", "img_channels", "label_dim", "sigma_data")
_SONGUNET_VARIANT_KEYS = ("embedding_type", "encoder_type", "decoder_type")
_EDM2_BACKBONE_NAMES = ("UNet", "EDM2UNet")


def jsonable(value: Any) -> Any:
    """Plain JSON data from pickled kwargs (numpy scalars -> Python numbers, tuples -> lists)."""
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # strict JSON has no inf/nan
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
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


def _backbone_of(ema: Any, outer: dict[str, Any]) -> tuple[Any, str]:
    """The backbone holder (``unet`` or ``model``, may be None) and our model type for a precond holder."""
    from tcm_core.io.safe_pickle import find_submodule

    if find_submodule(ema, "unet") is not None:
        return find_submodule(ema, "unet"), "EDM2UNet"
    inner_holder = find_submodule(ema, "model")
    inner_name = inner_holder.class_name if inner_holder is not None else None
    declared = outer.get("model_type", inner_name)
    if inner_name in _EDM2_BACKBONE_NAMES or declared in _EDM2_BACKBONE_NAMES:
        return inner_holder, "EDM2UNet"
    if declared == "SongUNet" or inner_name == "SongUNet":
        return inner_holder, "SongUNet"
    raise CheckpointError(
        f"unsupported backbone {declared or inner_name!r} in {ema.class_name} "
        f"(supported: SongUNet (DDPM++) and the EDM2 UNet)"
    )


def arch_from_pickle(ema: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our ``arch`` dict from a pickled EDM/ECT/TCM (SongUNet) or EDM2 precond holder.

    Returns ``(arch, ignored)`` where ``ignored`` holds constructor kwargs with no counterpart here
    (``use_fp16`` is a storage choice, the logvar head is not built, ``sigma_min``/``sigma_max`` only bound
    EDM's own sampler). ``augment_dim`` is mapped to 0 (ECT/TCM train without augmentation labels;
    ``map_augment`` is dropped).
    """
    from tcm_core.io.safe_pickle import PersistentHolder

    if not isinstance(ema, PersistentHolder):
        raise CheckpointError("the pickle's network is not a persistent network object")
    outer = jsonable(ema.init_kwargs)
    inner_holder, model_type = _backbone_of(ema, outer)
    inner = jsonable(inner_holder.init_kwargs) if inner_holder is not None else {}
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


# --- network pickles ---------------------------------------------------------------------------------------------


def _ema_from_pickle(obj: Any) -> Any:
    """The EMA network holder from a loaded pickle's top-level object (snapshot, network or training state)."""
    from tcm_core.io.safe_pickle import PersistentHolder

    if isinstance(obj, PersistentHolder):
        return obj
    for key in ("ema", "net"):  # a training snapshot's EMA, else a training state's network
        if isinstance(obj, dict) and isinstance(obj.get(key), PersistentHolder):
            return obj[key]
    keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"no network in the pickle (expected a dict with 'ema'; found {keys})")


def read_network_pickle(path: Path) -> tuple[Any, Any]:
    """``(top-level object, EMA network holder)`` of a network pickle, read with the allow-list unpickler."""
    from tcm_core.io.safe_pickle import safe_load

    with refusing(path, "not a readable network pickle"):
        obj = safe_load(path)
        return obj, _ema_from_pickle(obj)


def read_pickle_checkpoint(path: Path, digest: str, arch: dict[str, Any] | None,
                           record: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``(state, arch, meta)`` of a network pickle; ``arch`` (if given) replaces the one from its kwargs."""
    from tcm_core.io.safe_pickle import state_dict_from_holder

    _, ema = read_network_pickle(path)
    with refusing(path, "not a readable network pickle"):
        base_arch, ignored = arch_from_pickle(ema)
        state = state_dict_from_holder(ema)
    meta = {
        "format": "pickle",
        "class_name": ema.class_name,
        "flavour": "edm2" if base_arch["model_type"] == "EDM2UNet" else "edm",
        "ignored_kwargs": ignored,
        "provenance": {"source": str(path), "sha256": digest, "format": "pickle", "class_name": ema.class_name},
    }
    return state, arch or base_arch, meta


def describe_pickle(path: Path, record: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """``inspect`` facts of a network pickle, its number of tensor elements and the arch from its kwargs."""
    from tcm_core.io.safe_pickle import parameter_count_from_holder, state_dict_from_holder

    obj, ema = read_network_pickle(path)
    with refusing(path, "not a readable network pickle"):
        tensors = state_dict_from_holder(ema)
        found, ignored = arch_from_pickle(ema)
        info = {
            "format": "pickle",
            "top_level_keys": sorted(map(str, obj)) if isinstance(obj, dict) else None,
            "class_name": ema.class_name,
            "init_kwargs": jsonable(ema.init_kwargs),
            "tensors": len(tensors),
            "parameter_count_in_file": parameter_count_from_holder(ema),
            "ignored_kwargs": ignored,
        }
    return info, sum(t.numel() for t in tensors.values()), found


# --- plain state dicts ----------------------------------------------------------------------------------------


def _plain_state_dict(obj: Any) -> dict[str, Any]:
    import torch

    for key in ("ema", "state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not a plain state dict of tensors")
    return obj


def check_torch_zip(path: Path) -> None:
    """A ``.pt``/``.pth`` must be torch's zip format with stored (uncompressed) records inside the file: the
    legacy format allocates the sizes it claims before reading, and a deflated record could inflate."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError("not a torch zip checkpoint (the legacy torch < 1.6 format is refused)", str(path),
                              "re-save it with torch.save in a current torch, or download it again")
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                raise CheckpointError(f"torch zip record {info.filename!r} is compressed or larger than the file",
                                      str(path))


def read_state_dict_file(path: Path) -> dict[str, Any]:
    """The tensors of a ``.pt``/``.pth`` file, read weights-only (torch's unpickler of tensors and containers)."""
    import torch

    with refusing(path, "not a torch zip checkpoint"):
        check_torch_zip(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's weights-only unpickler refuses anything but tensors and containers
        raise CheckpointError(f"not a weights-only state dict ({one_line(exc)[:400]})", str(path)) from None
    with refusing(path, "not a plain state dict of tensors"):
        return _plain_state_dict(loaded)


def read_state_dict_checkpoint(path: Path, digest: str, arch: dict[str, Any] | None,
                               record: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``(state, arch, meta)`` of a plain state dict; the arch is ``arch`` or the sibling ``X.json``'s."""
    state = read_state_dict_file(path)
    base_arch = arch or record.get("arch")
    if not base_arch:
        raise CheckpointError(
            "a plain state dict needs its architecture", str(path),
            f"give it (arch=..., --arch JSON) or a sibling {path.with_suffix('.json').name} with {{\"arch\": {{...}}}}",
        )
    meta = {"format": "state_dict", "class_name": None, "iteration": record.get("iteration"),
            "provenance": {"source": str(path), "sha256": digest, "format": "state_dict"}}
    return state, base_arch, meta


def describe_state_dict(path: Path, record: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """``inspect`` facts of a plain state dict, its number of tensor elements and the sibling's arch."""
    state = read_state_dict_file(path)
    info = {"format": "state_dict", "class_name": None, "tensors": len(state)}
    return info, sum(t.numel() for t in state.values()), record.get("arch")
