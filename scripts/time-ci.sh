#!/usr/bin/env bash
# Time CI as it runs (a benchmark, not a test): `bash .ci/run` in a fresh clone of HEAD, with CI=true and no
# standard input, setup timed on its own first. Records the row in docs/MEASUREMENTS.md (table `ci`).
#
#   bash scripts/time-ci.sh            # run it on a quiet machine; about 15 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
COMMIT=$(git rev-parse --short HEAD)
WORK=${TCM_TIMING_DIR:-$(mktemp -d /tmp/tcm-ci-XXXXXX)}
git clone -q "$REPO" "$WORK/clone"
cd "$WORK/clone"
t0=$(date +%s)
bash scripts/setup.sh > "$WORK/setup.log" 2>&1
t1=$(date +%s)
rc=0
CI=true bash .ci/run < /dev/null > "$WORK/ci.log" 2>&1 || rc=$?
t2=$(date +%s)
total=$((t2 - t0))
summary=$(grep -E "^[=]* ?[0-9]+ (passed|failed)" "$WORK/ci.log" | tail -1 | sed -E 's/=//g; s/ in [0-9.]+s.*//; s/^ +//')
result=$([ "$rc" = 0 ] && echo "passed" || echo "FAILED (exit $rc)")
echo "CI at $COMMIT: $((total / 60)) min $((total % 60)) s wall (setup $((t1 - t0)) s), $summary, $result"
echo "log: $WORK/ci.log"
cd "$REPO"
python3 scripts/record_measurement.py ci --commit "$COMMIT" "$((total / 60)) min $((total % 60)) s ($total s)" \
  "$((t1 - t0)) s" "$summary" "$result"
exit "$rc"
