#!/usr/bin/env bash
# Time the README's first command from a fresh clone, as a new user runs it (a benchmark, not a test).
#
#   bash scripts/time-default-run.sh [TARGET] [snakemake args ...]     e.g.  bash scripts/time-default-run.sh paper_tables
#
# Clones the current HEAD into a scratch folder, times `bash scripts/setup.sh` (twice: fresh, then warm), then
# times `snakemake --cores 2 TARGET` and prints each job's wall time from Snakemake's log, the busy time per
# rule and the total. Results stay in the scratch folder (printed at the end). Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TARGET=${1:-all}
shift || true
WORK=${TCM_TIMING_DIR:-$(mktemp -d /tmp/tcm-timing-XXXXXX)}
git clone -q "$REPO" "$WORK/clone"
cd "$WORK/clone"
export MLFLOW_DISABLE_TELEMETRY=true
t0=$(date +%s)
bash scripts/setup.sh > "$WORK/setup.log" 2>&1
t1=$(date +%s)
rm -f .venv/.tcm-installed  # a warm package cache, the same packages: what a second setup costs
bash scripts/setup.sh >> "$WORK/setup.log" 2>&1
t2=$(date +%s)
echo "setup: fresh $((t1 - t0)) s, warm cache $((t2 - t1)) s"
start=$(date +%s)
.venv/bin/snakemake --cores 2 "$TARGET" "$@" > "$WORK/snakemake.out" 2>&1
end=$(date +%s)
echo "snakemake --cores 2 $TARGET $*: $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s wall"
log=$(ls -t .snakemake/log/*.snakemake.log | head -1)
.venv/bin/python scripts/job_times.py "$log" --json "$WORK/job_times.json"
tail -n 6 "$WORK/snakemake.out"
echo "folder: $WORK (clone/results, snakemake.out, job_times.json)"
