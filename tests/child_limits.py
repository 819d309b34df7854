"""``python tests/child_limits.py AS FSIZE DAC -- ARGS``: run ``python -m tcm_core ARGS`` under limits set in
this process before tcm_core is imported (the fault tests' child; no test-only imports, so it starts fast).

* ``AS``: RLIMIT_AS in bytes (a bomb fails the test instead of the machine); 0 = unchanged.
* ``FSIZE``: RLIMIT_FSIZE in bytes with SIGXFSZ ignored, so a write past it fails with EFBIG, as on a full
  disk (``storage_error`` maps both ENOSPC and EFBIG); 0 = unchanged.
* ``DAC``: 1 drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so permission bits bind even when the tests run
  as root (as in CI); the process keeps its uid, so everything it must read stays readable. A no-op for an
  unprivileged user, whom the bits bind anyway.
"""

from __future__ import annotations

import ctypes
import resource
import runpy
import signal
import sys

_CAPABILITY_VERSION_3 = 0x20080522
_DAC_BITS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_dac_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _Header(_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    for part in data:
        part.effective &= ~_DAC_BITS
        part.permitted &= ~_DAC_BITS
        part.inheritable &= ~_DAC_BITS
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def main() -> None:
    address_space, file_size, drop_dac = (int(v) for v in sys.argv[1:4])
    if sys.argv[4] != "--":
        raise SystemExit("usage: child_limits.py AS FSIZE DAC -- ARGS")
    if address_space:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    if file_size:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    if drop_dac:
        drop_dac_capabilities()
    sys.argv = ["tcm_core", *sys.argv[5:]]
    runpy.run_module("tcm_core", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
