#!/usr/bin/env bash
# The test command: sets up the environment if needed, checks lint, and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
python -m pytest -q -ra --durations=15 "$@"
