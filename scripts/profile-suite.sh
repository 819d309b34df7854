#!/usr/bin/env bash
# Where the test suite's CPU goes (a benchmark, not a test): runs the README's test command with every Python
# process of .venv recording its CPU time and command at exit, then prints the sums by command and by test.
#
#   bash scripts/profile-suite.sh [pytest args]     # a quiet machine; as long as the suite
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export TCM_PROCLOG_DIR=${TCM_PROCLOG_DIR:-$(mktemp -d /tmp/tcm-proclog-XXXXXX)}
cp scripts/suite_profile/proclog_site.py "$SITE/tcm_proclog_site.py"
echo "import tcm_proclog_site" > "$SITE/tcm_proclog.pth"
trap 'rm -f "$SITE/tcm_proclog.pth" "$SITE/tcm_proclog_site.py"' EXIT
rc=0
bash scripts/test.sh "$@" || rc=$?
.venv/bin/python scripts/suite_profile/summarize.py "$TCM_PROCLOG_DIR"
exit "$rc"
