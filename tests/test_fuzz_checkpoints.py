"""Property-based fuzzing of the checkpoint readers (hypothesis): random byte edits, truncations and insertions
of a valid small file either load to the same tensor names, shapes and dtypes (a flipped byte inside tensor
data changes values, which no format without a pin can notice) or raise a TcmError; never another
exception, and never an allocation beyond a 2 GiB address-space headroom (set while the examples run).

Example counts are small for CI (a few seconds in all); ``TCM_FUZZ_SCALE=50`` runs fifty times as many.
"""

from __future__ import annotations

import contextlib
import os
import pickletools
import re
import resource
import struct
from pathlib import Path

import fault_helpers as fh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcm_core.errors import TcmError
from tcm_core.io.foreign_checkpoints import read_network_pickle
from tcm_core.io.network_files import load_network

SCALE = int(os.environ.get("TCM_FUZZ_SCALE", "1"))
HEADROOM = 2 << 30


def _settings(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, database=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def address_space_headroom(extra: int = HEADROOM):
    """Lower this process's RLIMIT_AS to its current size + ``extra``: a big allocation fails (MemoryError or
    torch's allocator error, neither a TcmError) instead of succeeding lazily."""
    size_kb = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size_kb * 1024 + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def mutations(size: int, hot: list[int]):
    """Edits of a ``size``-byte file, most at the ``hot`` positions (headers, opcodes, lengths)."""
    position = st.one_of(st.sampled_from(hot), st.sampled_from(hot), st.integers(0, size - 1))
    return st.one_of(
        st.lists(st.tuples(position, st.integers(0, 255)), min_size=1, max_size=4).map(lambda e: ("set", e)),
        st.integers(0, size - 1).map(lambda n: ("truncate", n)),
        st.tuples(position, st.binary(min_size=1, max_size=12)).map(lambda e: ("insert", e)),
    )


def apply(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[:arg]
    if kind == "insert":
        at, extra = arg
        return data[:at] + extra + data[at:]
    out = bytearray(data)
    for at, value in arg:
        out[at] = value
    return bytes(out)


def _signature(net) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}


def _check(read, path: Path, data: bytes, want: dict | None) -> None:
    path.write_bytes(data)
    try:
        with address_space_headroom():
            net, _ = read(path)
    except TcmError as exc:
        assert "\n" not in exc.line()
        return
    if want is not None:
        assert _signature(net) == want


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    path = fh.own_checkpoint(tmp_path_factory.mktemp("own") / "net.safetensors")
    net, _ = load_network(path)
    return path, path.read_bytes(), path.with_suffix(".json").read_bytes(), _signature(net)


@pytest.fixture(scope="module")
def edm(tmp_path_factory):
    path = fh.edm_snapshot(tmp_path_factory.mktemp("edm") / "edm.pkl")
    net, _ = load_network(path)
    data = path.read_bytes()
    hot = []  # opcode positions, and the first bytes of every argument (nested storage pickles included)
    for op, _, pos in pickletools.genops(data):
        hot.append(pos)
        hot.extend(range(pos + 1, min(pos + 1 + (400 if "BYTES" in op.name else 9), len(data))))
    return path, data, sorted(set(hot)), _signature(net)


def test_fuzz_our_safetensors(own, tmp_path):
    path, data, _, want = own
    target = tmp_path / "net.safetensors"
    target.with_suffix(".json").write_bytes(own[2])
    header_end = 8 + struct.unpack("<Q", data[:8])[0]

    @_settings(60)
    @given(mutations(len(data), list(range(header_end))))
    def run(mutation):
        _check(load_network, target, apply(data, mutation), want)

    run()


def test_fuzz_the_sidecar_json(own, tmp_path):
    path, data, record, want = own
    target = tmp_path / "net.safetensors"
    target.write_bytes(data)

    @_settings(40)
    @given(mutations(len(record), list(range(len(record)))))
    def run(mutation):
        target.with_suffix(".json").write_bytes(apply(record, mutation))
        try:
            with address_space_headroom():
                net, _ = load_network(target)
        except TcmError:
            return
        assert set(_signature(net)) == set(want)  # a changed arch either fits the file exactly or is refused

    run()


def test_fuzz_network_pickles(edm, tmp_path):
    _, data, hot, want = edm

    @_settings(30)
    @given(mutations(len(data), hot))
    def run(mutation):
        _check(load_network, tmp_path / "edm.pkl", apply(data, mutation), want)

    run()


def test_fuzz_pickle_streams(tmp_path):
    """Arbitrary short opcode streams: the allow-list reader refuses or returns data, nothing else."""
    ops = [op.code.encode("latin-1") for op in pickletools.opcodes]
    stream = st.lists(st.one_of(st.sampled_from(ops), st.binary(min_size=1, max_size=9)), max_size=24)

    @_settings(150)
    @given(stream)
    def run(parts):
        _check(read_network_pickle, tmp_path / "s.pkl", b"\x80\x04" + b"".join(parts) + b".", None)

    run()
