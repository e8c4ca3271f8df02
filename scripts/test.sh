#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: ruff, mypy, the import layers, then the test suite.
# The cluster suite (tests/cluster) needs the project's own control plane: it is built here first,
# once per machine (cached in ~/.cache/helios/cluster; up to half an hour on 2 cores), where Go >= 1.25
# is present; elsewhere the suite skips and says why (docs/cluster-testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check operator local worker bench cli tests; ruff format --check operator local worker bench cli tests
echo "== mypy"; mypy
echo "== mypy (the cluster suite's kubelet and plane)"; mypy --strict tests/support/kubelet.py tests/cluster/plane.py
echo "== import layers"; lint-imports
if [ "${HELIOS_CLUSTER:-1}" != "0" ] && command -v go >/dev/null 2>&1; then
  echo "== control plane (build once per machine, then cached)"
  if ! bash scripts/cluster.sh build; then
    echo "the control plane did not build: the cluster suite will say why it skips" >&2
  fi
fi
echo "== pytest"; python -m pytest -q -p no:cacheprovider "$@"
