#!/usr/bin/env bash
# The test command: sets up the environment if needed, checks lint, and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
# Parallel workers (pytest-xdist): one test module per unit of work, longest first (tests/conftest.py). The
# SLURM module and the workflow runs wait on the scheduler's polls and on job start-up (I/O), so 4 workers on 2
# cores keep them busy (3 left the CPU a quarter idle: 32 min of CPU in 21 min 50 s, 2026-12-07).
# Spinning OpenMP threads of concurrent tests would steal each other's cores: waiting threads sleep instead.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
python -m pytest -q -ra --durations=15 -n "${TCM_TEST_WORKERS:-4}" --dist loadgroup --no-loadscope-reorder "$@"
