"""Hostile checkpoint files fail with one TcmError naming the file, and allocate nothing they cannot back.

Each case builds one file from a valid micro checkpoint. The fast tests call the library (``load_network``,
``inspect_checkpoint``); the slow ones run the real CLI (``inspect``, ``train --init``) in a child limited
to 3 GiB of address space, so a bomb fails the test instead of the machine.
"""

from __future__ import annotations

import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fault_helpers as fh
import pytest
import torch
from checkpoint_helpers import write_pickle
from training_helpers import make_small_mnist, train_args

from tcm_core import errors
from tcm_core.evaluation.features import verify_inception_weights
from tcm_core.io.foreign_checkpoints import CheckpointError
from tcm_core.io.hashing import sha256_file
from tcm_core.io.network_files import inspect_checkpoint, load_network, save_network
from tcm_core.io.safe_pickle import UnsafePickleError


class _System:
    def __reduce__(self):
        import os

        return os.system, ("true",)


def _own(tmp: Path) -> Path:
    return fh.own_checkpoint(tmp / "net.safetensors")


def _without_sidecar(tmp: Path) -> Path:
    path = _own(tmp)
    path.with_suffix(".json").unlink()
    return path


def _foreign_safetensors(tmp: Path) -> Path:
    """A safetensors file with no arch anywhere (no X.json, no header metadata)."""
    from safetensors.torch import save_file

    path = tmp / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    return path


def _list_header(tmp: Path) -> Path:
    path = _own(tmp)
    _, _, body = fh._header(path)
    path.write_bytes(struct.pack("<Q", 6) + b"[1, 2]" + body)
    return path


def _sidecar_key(tmp: Path, **values) -> Path:
    path = _own(tmp)
    record = json.loads(path.with_suffix(".json").read_text())
    record.update(values)
    return fh.set_sidecar(path, json.dumps(record))


def _cut(path: Path, n: int) -> Path:
    path.write_bytes(path.read_bytes()[:n])
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _legacy_pt(tmp: Path) -> Path:
    path = tmp / "legacy.pt"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    return path


def _recorded(path: Path, digest: str) -> Path:
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return path


# name -> (build(tmp) -> file, expected TcmError class, fragment of the message)
CASES = {
    # class 2: tracebacks before
    **{f"safetensors {kind}": (lambda t, k=kind: fh.damaged_bytes(_own(t), k), CheckpointError,
                               "not a readable safetensors file")
       for kind in ("empty", "seven bytes", "truncated data", "truncated header", "random bytes",
                    "huge header length", "overrunning header length", "non-JSON header")},
    "safetensors header is a list": (_list_header, CheckpointError, "not a readable safetensors file"),
    "safetensors offsets past the end": (lambda t: fh.rewrite_header(
        _own(t), lambda h: fh.first_tensor(h).update(data_offsets=[0, 10**12])), CheckpointError, "safetensors"),
    "safetensors shape not matching the bytes": (lambda t: fh.rewrite_header(
        _own(t), lambda h: fh.first_tensor(h).update(shape=[2_000_000_000])), CheckpointError, "safetensors"),
    "safetensors dtype not matching the bytes": (lambda t: fh.rewrite_header(
        _own(t), lambda h: fh.first_tensor(h).update(dtype="F64")), CheckpointError, "safetensors"),
    "header arch not JSON": (lambda t: fh.rewrite_header(
        _without_sidecar(t), lambda h: h["__metadata__"].update(arch="{oops")), CheckpointError, "safetensors"),
    "header arch not an object": (lambda t: fh.rewrite_header(
        _without_sidecar(t), lambda h: h["__metadata__"].update(arch="[1, 2]")), CheckpointError, "not a dict"),
    "no arch anywhere": (_foreign_safetensors, CheckpointError, "no architecture"),
    "sidecar not JSON": (lambda t: fh.set_sidecar(_own(t), "{not json"), CheckpointError, "network record"),
    "sidecar a JSON array": (lambda t: fh.set_sidecar(_own(t), "[1, 2]"), CheckpointError, "not an object"),
    "sidecar a JSON string": (lambda t: fh.set_sidecar(_own(t), '"arch"'), CheckpointError, "not an object"),
    "sidecar arch a list": (lambda t: fh.set_sidecar(_own(t), '{"arch": [1]}'), CheckpointError, "not a dict"),
    "sidecar arch unknown model_type": (lambda t: fh.edit_sidecar_arch(_own(t), model_type="ResNet"),
                                        CheckpointError, "model_type"),
    "sidecar arch of another network": (lambda t: fh.edit_sidecar_arch(_own(t), channel_mult=[1, 1]),
                                        CheckpointError, "do not match the architecture"),
    "sidecar arch unknown key": (lambda t: fh.edit_sidecar_arch(_own(t), wings=2), CheckpointError,
                                 "cannot build the architecture"),
    "sidecar arch float size": (lambda t: fh.edit_sidecar_arch(_own(t), model_channels=16.5), CheckpointError,
                                "cannot build the architecture"),
    "sidecar iteration negative": (lambda t: _sidecar_key(t, iteration=-3), CheckpointError, "iteration"),
    "sidecar iteration a string": (lambda t: _sidecar_key(t, iteration="7"), CheckpointError, "iteration"),
    "sidecar provenance a list": (lambda t: _sidecar_key(t, provenance=[1]), CheckpointError, "provenance"),
    "NaN weight": (lambda t: fh.poison_weight(_own(t), float("nan")), CheckpointError, "not finite"),
    "inf weight": (lambda t: fh.poison_weight(_own(t), float("inf")), CheckpointError, "not finite"),
    "pickle with os.system": (lambda t: fh.edm_snapshot(t / "evil.pkl", extra={"x": _System()}), UnsafePickleError,
                              "refused global"),
    "pickle truncated": (lambda t: _cut(fh.edm_snapshot(t / "cut.pkl"), 5000), CheckpointError,
                         "not a readable network pickle"),
    "pickle of random bytes": (lambda t: _bytes(t / "r.pkl", bytes(range(256)) * 4), CheckpointError,
                               "not a readable network pickle"),
    "pickle of a list": (lambda t: write_pickle([1, 2, 3], t / "list.pkl"), CheckpointError, "no network"),
    "pt of random bytes": (lambda t: _bytes(t / "r.pt", b"\x00" * 300), CheckpointError, "not a torch zip"),
    "pt in the legacy format": (_legacy_pt, CheckpointError, "legacy"),
    "unknown suffix": (lambda t: _bytes(t / "net.bin", b"x"), CheckpointError, "unknown checkpoint format"),
    "missing file": (lambda t: t / "absent.safetensors", errors.MissingFileError, "no such checkpoint"),
    "sha256 record mismatch": (lambda t: _recorded(_own(t), "0" * 64), CheckpointError, "checksum mismatch"),
    "sha256 record malformed": (lambda t: _recorded(_own(t), "xyz"), errors.RefusedFileError, "malformed"),
    # class 3: resource bombs
    "tensor claims 2e9 elements of a 4-element storage": (lambda t: fh.rebuild_bomb(t / "b.pkl"),
                                                          CheckpointError, "its storage in the file holds 4"),
    "storage record claims 2e9 elements": (lambda t: fh.storage_count_bomb(t / "b.pkl"), CheckpointError,
                                           "tensor storage claims 2000000000"),
    "1200 views of one storage": (lambda t: fh.shared_view_bomb(t / "b.pkl"), CheckpointError,
                                  "their storages in the file hold"),
    "BINBYTES8 of 4 EiB": (lambda t: fh.binbytes8_bomb(t / "b.pkl"), CheckpointError, "claims"),
    "FRAME of 1 TiB": (lambda t: fh.frame_bomb(t / "b.pkl"), CheckpointError, "FRAME"),
    "LONG_BINPUT 2**32-1": (lambda t: fh.memo_bomb(t / "b.pkl"), CheckpointError, "memo index"),
    "sidecar num_blocks 100000": (lambda t: fh.edit_sidecar_arch(_own(t), num_blocks=100_000), CheckpointError,
                                  "needs far more than the file's"),
    "sidecar model_channels 1e6": (lambda t: fh.edit_sidecar_arch(_own(t), model_channels=1_000_000),
                                   CheckpointError, "needs far more than the file's"),
    "sidecar channel_mult of 100000 levels": (lambda t: fh.edit_sidecar_arch(_own(t), channel_mult=[1] * 100_000),
                                              CheckpointError, "cannot build the architecture"),
    "sidecar label_dim 1e9": (lambda t: fh.edit_sidecar_arch(_own(t), label_dim=10**9), CheckpointError,
                              "needs far more than the file's"),
    "pickle kwargs model_channels 1e6": (lambda t: fh.edm_snapshot(t / "k.pkl", {"model_channels": 1_000_000}),
                                         CheckpointError, "needs far more than the file's"),
    "pickle kwargs num_blocks 100000": (lambda t: fh.edm_snapshot(t / "k.pkl", {"num_blocks": 100_000}),
                                        CheckpointError, "needs far more than the file's"),
}


# inspect describes these without refusing: it reports the arch it finds (or none) and counts the tensors,
# but does not match every weight against the arch or check it for finiteness.
# It shows a sha256 record beside the recorded hash instead of enforcing it.
INSPECT_DESCRIBES = {"no arch anywhere", "NaN weight", "inf weight", "sidecar arch of another network",
                     "sha256 record mismatch"}


def _names_file(line: str, path: Path) -> bool:
    """The line names the file given, or its X.json when the record is at fault."""
    return str(path) in line or str(path.with_suffix(".json")) in line


def _build(name: str, tmp: Path) -> Path:
    folder = tmp / name.replace(" ", "_").replace("/", "_")
    folder.mkdir()
    return CASES[name][0](folder)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_is_one_tcm_error_naming_it(tmp_path, name):
    path = _build(name, tmp_path)
    _, cls, fragment = CASES[name]
    start = time.perf_counter()
    for read in (load_network, inspect_checkpoint):
        if read is inspect_checkpoint and name in INSPECT_DESCRIBES:
            continue
        with pytest.raises(cls) as err:
            read(path)
        line = err.value.line()
        assert fragment in line and _names_file(line, path) and "\n" not in line, line
    assert time.perf_counter() - start < 60  # no hang (num_blocks 100000 used to build for minutes)
    assert fh.leftovers(tmp_path) == []


def test_sidecar_without_arch_falls_back_to_the_header(tmp_path):
    path = fh.set_sidecar(_own(tmp_path), json.dumps({"iteration": 5, "provenance": {}}))
    net, meta = load_network(path)
    assert meta["iteration"] == 5 and meta["arch"] == net.arch and net.arch["model_channels"] == 16


def test_saved_bytes_are_deterministic(tmp_path):
    """Two saves of the same weights are byte-identical (safetensors' writer orders its metadata by a hash
    seeded per process); they stay readable by safetensors and load back exactly."""
    from safetensors.torch import load_file

    from tcm_core.networks import arch_preset, build_precond

    torch.manual_seed(0)
    net = build_precond(arch_preset("edm2_s", img_resolution=8, img_channels=3, model_channels=16,
                                    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8))
    net.register_buffer("steps", torch.arange(3))  # an int64 tensor too: widest-first order keeps alignment
    a, b = tmp_path / "a" / "n.safetensors", tmp_path / "b" / "n.safetensors"
    for path in (a, b):
        save_network(net, path, iteration=3, provenance={"z": 1, "a": [2]})
    assert a.read_bytes() == b.read_bytes() and a.with_suffix(".json").read_bytes() == b.with_suffix(
        ".json").read_bytes()
    loaded = load_file(str(a))
    assert set(loaded) == set(net.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    header_len = int.from_bytes(a.read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_inception_weights_are_hashed_once_and_refused_when_changed(tmp_path, monkeypatch):
    from tcm_core.evaluation import features
    from tcm_core.io import hashing
    bundled = features.bundled_inception_path()
    assert verify_inception_weights(bundled) == features.FID_HELPER_SHA256
    copy = tmp_path / "default_1.pt"
    copy.write_bytes(b"not the Inception network")
    pin = sha256_file(copy)
    assert verify_inception_weights(copy, pin) == pin
    assert sum(key[0] == str(copy.resolve()) for key in hashing._HASHED) == 1
    verify_inception_weights(copy, pin)  # unchanged: served from the cache, no second entry
    assert sum(key[0] == str(copy.resolve()) for key in hashing._HASHED) == 1
    copy.write_bytes(b"tampered Inception network, longer")  # size and mtime change: hashed again, refused
    with pytest.raises(errors.RefusedFileError, match="differ from the pinned sha256") as err:
        verify_inception_weights(copy, pin)
    assert str(copy) in err.value.line()
    monkeypatch.setattr(features, "bundled_inception_path", lambda: copy)
    with pytest.raises(errors.RefusedFileError, match=features.FID_HELPER_SHA256):
        features.InceptionExtractor()  # the extractor checks before torch.jit.load touches the file


# --- the real CLI ---------------------------------------------------------------------------------------------

_EXIT = {CheckpointError: 3, UnsafePickleError: 3, errors.RefusedFileError: 3, errors.MissingFileError: 4}


# Through the real CLI: every bomb (under the memory limit) and one case of each other kind (the library
# test above covers every case; each child costs ~2 s of torch import).
CLI_CASES = [
    "tensor claims 2e9 elements of a 4-element storage", "storage record claims 2e9 elements",
    "1200 views of one storage", "BINBYTES8 of 4 EiB", "FRAME of 1 TiB", "LONG_BINPUT 2**32-1",
    "sidecar num_blocks 100000", "sidecar model_channels 1e6", "sidecar label_dim 1e9",
    "pickle kwargs model_channels 1e6", "safetensors truncated data", "safetensors huge header length",
    "safetensors offsets past the end", "sidecar a JSON array", "header arch not JSON", "pickle with os.system",
    "pickle truncated", "pt in the legacy format", "missing file", "NaN weight",
]


@pytest.mark.slow
def test_cli_inspect_fails_with_one_line_under_a_memory_limit(tmp_path):
    files = {name: _build(name, tmp_path) for name in CLI_CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(files, pool.map(lambda p: fh.run_limited(["inspect", str(p)]), files.values())))
    problems = []
    for name, proc in runs.items():
        _, cls, fragment = CASES[name]
        if name in INSPECT_DESCRIBES:
            if proc.returncode != 0 or "Traceback" in proc.stderr:
                problems.append(f"{name}: rc {proc.returncode}: {proc.stderr[-600:]}")
            continue
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        ok = (proc.returncode == _EXIT[cls] and len(lines) == 1 and lines[0].startswith(fh.ERROR_PREFIX)
              and _names_file(lines[0], files[name]) and proc.stdout == "")
        if not ok:
            problems.append(f"{name}: rc {proc.returncode}: {proc.stderr[-600:]}")
    assert not problems, "\n".join(problems)
    assert fh.leftovers(tmp_path) == []


TRAIN_CASES = ["pickle with os.system", "missing file", "safetensors truncated data", "sidecar a JSON array",
               "NaN weight", "tensor claims 2e9 elements of a 4-element storage", "sidecar num_blocks 100000"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_small_mnist(tmp_path_factory.mktemp("data") / "d.zip", count=16)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAIN_CASES)
def test_cli_train_init_fails_with_one_line(tmp_path, small_data, name):
    init = _build(name, tmp_path)
    out = tmp_path / "run"
    proc = fh.run_limited(train_args("stage1", small_data, out, "iterations=2", "batch=4", init=init))
    line = fh.error_line(proc)  # one line and no traceback: holds already
    assert _names_file(line, init) and (name == "missing file" or CASES[name][2] in line), line
    assert not (out / "network.safetensors").exists() and fh.leftovers(tmp_path) == []
    assert line.startswith(fh.ERROR_PREFIX) and proc.returncode == _EXIT[CASES[name][1]], line
