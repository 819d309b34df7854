#!/usr/bin/env bash
# Mutation check of the science wiring (see scripts/mutants.py): every mutant must be killed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/mutants.py "$@"
