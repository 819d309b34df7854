#!/usr/bin/env bash
# The GPU check (python -m tcm_core gpu-check, tcm_core/gpu/check.py): every CUDA path on synthetic data, about 5 minutes on one modern GPU.
# No arguments needed; it writes gpu-check/<date>-<gpu>/<date>-<gpu>.json and .md and exits 1 if a case failed.
# Extra arguments go to `python -m tcm_core gpu-check` (--dry-run, --out-root DIR, --budget-s S, --cost-table F).
# Python: $PYTHON, else this checkout's .venv, else python3 (a GPU machine's own torch; see docs/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
exec "$PY" -m tcm_core gpu-check "$@"
