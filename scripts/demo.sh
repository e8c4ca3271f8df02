#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the local demo of the full HELIOS loop: `helios demo`.
# Extra arguments go to `helios demo` (see `helios demo --help`); the report lands in demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/helios demo --out demo-out "$@"
