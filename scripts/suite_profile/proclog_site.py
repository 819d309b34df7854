"""Imported at start-up by every Python process of the profiled venv (a .pth line that scripts/profile-suite.sh
adds and removes): at exit, write this process's CPU time, command line and test to $TCM_PROCLOG_DIR."""

import atexit
import json
import os
import sys
import time

_START = time.time()
_DIR = os.environ.get("TCM_PROCLOG_DIR")


def _record() -> None:
    times = os.times()
    record = {"argv": sys.argv[:6], "cpu_s": times.user + times.system, "wall_s": time.time() - _START,
              "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
              **{f"loaded_{m}": m in sys.modules for m in ("torch", "mlflow", "torch._dynamo")}}
    try:
        with open(os.path.join(_DIR, f"{os.getpid()}-{time.time_ns()}.json"), "w") as handle:
            json.dump(record, handle)
    except OSError:
        pass


if _DIR:
    atexit.register(_record)
