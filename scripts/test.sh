#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: ruff, mypy, the import layers, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check operator local worker bench cli tests; ruff format --check operator local worker bench cli tests
echo "== mypy"; mypy
echo "== import layers"; lint-imports
echo "== pytest"; python -m pytest -q -p no:cacheprovider "$@"
