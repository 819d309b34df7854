"""Imported at start-up by every Python process of the profiled venv (a .pth line that scripts/profile-suite.sh
adds and removes): at exit, write this process's CPU time, command line and test to $TCM_PROCLOG_DIR."""

import atexit
import json
import os
import sys
import time

LOADED = ("torch", "torch._dynamo", "mlflow")  # the start-up costs summarize.py counts per command
_DIR = os.environ.get("TCM_PROCLOG_DIR")


def _record() -> None:
    times = os.times()
    record = {"argv": sys.argv[:6], "cpu_s": times.user + times.system,
              "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
              "loaded": [m for m in LOADED if m in sys.modules]}
    try:
        with open(os.path.join(_DIR, f"{os.getpid()}-{time.time_ns()}.json"), "w") as handle:
            json.dump(record, handle)
    except OSError:
        pass


if _DIR:
    atexit.register(_record)
