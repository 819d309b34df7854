"""Helpers for the checkpoint tests: a loopback HTTP file server and pickles in NVIDIA's persistence format.

The pickles are made here, from our own networks, in the exact shape ``torch_utils.persistence`` writes
(reference §4.3/§4.4): each network object reduces to ``torch_utils.persistence._reconstruct_persistent_obj``
called with ``meta = {type: 'class', version: 6, module_src, class_name, state}``. Pickle checks that a
global it writes can be imported, so while writing, stand-in modules ``torch_utils.persistence`` and
``dnnlib.util`` are registered in ``sys.modules`` and removed again afterwards.
"""

from __future__ import annotations

import contextlib
import copyreg
import hashlib
import pickle
import socket
import sys
import threading
import types
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# --- loopback HTTP server ---------------------------------------------------------------------------------


class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 with Range/If-Range support and scripted faults.

    Every file has a strong ETag (its sha256 prefix) unless its path is in ``no_validator``.
    ``drop_first[path] = n``: the first GET of ``path`` announces the full length but sends only ``n``
    bytes of its body, then closes the connection; ``drop_always[path] = n`` does so on every GET.
    ``stall[path] = (n, event)``: send ``n`` bytes of the body, then wait for ``event`` before the rest.
    ``ignore_range``: paths whose Range headers are ignored (200). ``redirects[path] = target``: a 302.
    ``requests`` logs ``(path, Range header or None)`` of every GET.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_first: dict[str, int] = {}
        self.drop_always: dict[str, int] = {}
        self.stall: dict[str, tuple[int, threading.Event]] = {}
        self.ignore_range: set[str] = set()
        self.no_validator: set[str] = set()
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                with contextlib.suppress(OSError):  # the client may be gone (killed mid-download)
                    server._respond(self, data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def etag(self, path: str) -> str | None:
        return None if path in self.no_validator else f'"{hashlib.sha256(self.files[path]).hexdigest()[:16]}"'

    def _respond(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        path, rng, etag = handler.path, handler.headers.get("Range"), self.etag(handler.path)
        if_range = handler.headers.get("If-Range")
        start = 0
        if rng and path not in self.ignore_range and (if_range is None or if_range == etag):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        body = data[start:]
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Accept-Ranges", "bytes")
        if etag:
            handler.send_header("ETag", etag)
        handler.end_headers()
        cut = self.drop_first.pop(path, None)
        cut = self.drop_always.get(path, cut)
        if path in self.stall:
            n, event = self.stall[path]
            handler.wfile.write(body[:n])
            handler.wfile.flush()
            event.wait(60)
            body = body[n:]
        if cut is not None:
            handler.wfile.write(body[:cut])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(body)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, event in self.stall.values():
            event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- persistence-format pickles ---------------------------------------------------------------------------

SENTINEL_SOURCE = "import pathlib\npathlib.Path({path!r}).write_text('pwned')\n"


def _never_called(meta: Any) -> Any:  # the writer's stand-in; loaders must never reach it
    raise AssertionError("the real persistence loader was called")


class _EasyDict(dict):
    pass


@contextlib.contextmanager
def stand_in_modules() -> Any:
    """Register ``torch_utils.persistence`` and ``dnnlib.util`` while pickling (removed afterwards)."""
    names = ["torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"]
    if any(n in sys.modules for n in names):
        raise RuntimeError("a real torch_utils/dnnlib is imported; these helpers would shadow it")
    persistence = types.ModuleType("torch_utils.persistence")
    _never_called.__module__ = "torch_utils.persistence"
    _never_called.__qualname__ = _never_called.__name__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _never_called
    util = types.ModuleType("dnnlib.util")
    _EasyDict.__module__ = "dnnlib.util"
    _EasyDict.__qualname__ = _EasyDict.__name__ = "EasyDict"
    util.EasyDict = _EasyDict
    modules = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }
    modules["torch_utils"].persistence = persistence
    modules["dnnlib"].util = util
    sys.modules.update(modules)
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)


class Persistent:
    """Pickles exactly like a ``persistent_class`` object: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str = "# network source\n") -> None:
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self) -> tuple:
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


class FakeModuleDict:
    """Pickles like ``torch.nn.ModuleDict``: NEWOBJ of the real class, then BUILD with its ``__dict__``."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    @property
    def __class__(self) -> type:  # noqa: PLE0307 -- pickle's NEWOBJ check reads __class__
        return nn.ModuleDict

    def __reduce__(self) -> tuple:
        return (copyreg.__newobj__, (nn.ModuleDict,), self.state)


def module_state(module: nn.Module, children: OrderedDict, init_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A ``__dict__`` in the shape of an nn.Module's (hook dicts included), with persistence's extras."""
    return {
        "training": False,
        "_parameters": OrderedDict((k, v) for k, v in module._parameters.items()),
        "_buffers": OrderedDict((k, v) for k, v in module._buffers.items()),
        "_non_persistent_buffers_set": set(module._non_persistent_buffers_set),
        "_backward_hooks": OrderedDict(),
        "_forward_hooks": OrderedDict(),
        "_forward_pre_hooks": OrderedDict(),
        "_state_dict_hooks": OrderedDict(),
        "_load_state_dict_pre_hooks": OrderedDict(),
        "_modules": children,
        "_init_args": (),
        "_init_kwargs": init_kwargs,
    }


def persistent_tree(module: nn.Module, class_name: str, init_kwargs: dict[str, Any], *, dtype=None) -> Persistent:
    """Mirror ``module`` as persistence objects (ModuleDicts stay ModuleDicts), optionally casting tensors."""

    def cast(t: torch.Tensor | None) -> Any:
        if t is None or dtype is None or not t.is_floating_point():
            return t
        data = t.detach().to(dtype)
        return nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data

    def mirror(m: nn.Module, name: str, kwargs: dict[str, Any]) -> Any:
        children = OrderedDict(
            (k, None if c is None else mirror(c, type(c).__name__, {})) for k, c in m._modules.items()
        )
        state = module_state(m, children, kwargs)
        state["_parameters"] = OrderedDict((k, cast(v)) for k, v in state["_parameters"].items())
        state["_buffers"] = OrderedDict((k, cast(v)) for k, v in state["_buffers"].items())
        if isinstance(m, nn.ModuleDict):
            return FakeModuleDict(state)
        return Persistent(name, state)

    return mirror(module, class_name, init_kwargs)


def write_pickle(obj: Any, path: Path) -> Path:
    with stand_in_modules():
        data = pickle.dumps(obj, protocol=pickle.DEFAULT_PROTOCOL)
    path.write_bytes(data)
    return path


def easydict(**kwargs: Any) -> Any:
    """An object that pickles as ``dnnlib.util.EasyDict`` (only inside ``stand_in_modules``)."""
    return _EasyDict(**kwargs)


def numpy_float(x: float) -> np.float64:
    return np.float64(x)


# --- an EDM/TCM training snapshot, as EDM's (and TCM's) training loop pickles one -------------------------


def edm_kwargs(arch: dict[str, Any], augment_dim: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Constructor kwargs as EDM's train.py records them: EDMPrecond's, and those passed on to SongUNet."""
    label_dim = int(arch.get("label_dim", 0))
    model = {
        "embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
        "channel_mult_noise": 1, "resample_filter": [1, 1], "model_channels": arch["model_channels"],
        "channel_mult": arch["channel_mult"], "num_blocks": arch["num_blocks"],
        "attn_resolutions": arch["attn_resolutions"], "augment_dim": augment_dim, "dropout": np.float64(0.13),
    }
    outer = {"img_resolution": arch["img_resolution"], "img_channels": arch["img_channels"], "label_dim": label_dim,
             "use_fp16": False, "sigma_min": 0, "sigma_max": float("inf"), "sigma_data": np.float64(0.5),
             "model_type": "SongUNet", **model}
    inner = {"img_resolution": arch["img_resolution"], "in_channels": arch["img_channels"],
             "out_channels": arch["img_channels"], "label_dim": label_dim, **model}
    return outer, inner


def write_edm_snapshot(net: nn.Module, path: Path, *, augment_dim: int = 0, module_src: str = "# EDM networks\n",
                       extra: dict[str, Any] | None = None) -> Path:
    """``net`` (our SongUNet Precond) as the snapshot {ema, loss_fn, augment_pipe, dataset_kwargs} that EDM's and
    TCM's training loops pickle: every network object through persistence's ``_reconstruct_persistent_obj``
    with ``module_src`` (the defining module's source text) as data."""
    outer, inner = edm_kwargs(net.arch, augment_dim)
    children = OrderedDict(model=persistent_tree(net.model, "SongUNet", inner))
    ema = Persistent("EDMPrecond", module_state(net, children, outer), module_src=module_src)
    loss_fn = Persistent("EDMLoss", {"P_mean": np.float64(-1.2), "P_std": 1.2, "sigma_data": 0.5,
                                     "_init_args": (), "_init_kwargs": {}}, module_src=module_src)
    augment = Persistent("AugmentPipe", {"p": 0.12, "xflip": 1e8, "_init_kwargs": {"p": 0.12}}, module_src=module_src)
    snapshot = {"ema": ema, "loss_fn": loss_fn, "augment_pipe": augment,
                "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "cifar10.zip"}}
    snapshot.update(extra or {})
    return write_pickle(snapshot, Path(path))
