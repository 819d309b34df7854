#!/usr/bin/env bash
# Time the README's first command from a fresh clone, as a new user runs it (a benchmark, not a test).
#
#   bash scripts/time-default-run.sh [TARGET] [snakemake args ...]     e.g.  bash scripts/time-default-run.sh paper_tables
#
# Clones the current HEAD into a scratch folder, times `bash scripts/setup.sh` (twice: fresh, then warm), then
# times `snakemake --cores 2 TARGET` and prints each job's wall time from Snakemake's log, the busy time per
# rule and the total, and records the row in docs/MEASUREMENTS.md (table `default-run` for `all`, `paper-tables`
# for paper_tables; other targets are not recorded). Results stay in the scratch folder (printed at the end).
# Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
COMMIT=$(git rev-parse --short HEAD)
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
case "$TARGET" in all) table=default-run ;; paper_tables) table=paper-tables ;; *) exit 0 ;; esac
[ $# -eq 0 ] || exit 0  # extra snakemake arguments: not the documented run, not recorded
read -r jobs busy < <(.venv/bin/python -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(len(d["jobs"]), "; ".join(f"{r} {s / 60:.1f} min" for r, s in d["per_rule_s"].items()))' "$WORK/job_times.json")
wall=$((end - start))
cd "$REPO"
python3 scripts/record_measurement.py "$table" --commit "$COMMIT" "$TARGET" "$((t1 - t0)) s / $((t2 - t1)) s" \
  "$((wall / 60)) min $((wall % 60)) s" "$jobs" "$busy"
[ "$table" = default-run ] || exit 0
headline=$(cd "$WORK/clone" && .venv/bin/python -c '
from tcm_core.report.headline import headline_values
label, values = headline_values("results/tiny")
print("\t".join(f"{one} / {two}" for one, two in values.values()) + "\t" + (label or "FID"))')
IFS=$'\t' read -r s1 control s2 label <<< "$headline"
python3 scripts/record_measurement.py headline --commit "$COMMIT" "$s1" "$control" "$s2" \
  "$label; bash scripts/time-default-run.sh"
