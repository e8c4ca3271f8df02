#!/usr/bin/env bash
# Sets up everything HELIOS needs on a fresh Debian machine: Prometheus (for the telemetry tests and
# the demo's optional local Prometheus) and a virtual environment in .venv with the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
if ! command -v prometheus >/dev/null 2>&1 && [ "${HELIOS_SKIP_APT:-0}" != "1" ]; then
  echo "setup: installing Prometheus (Debian package)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts a system service on :9090; the project runs its own on other ports.
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# Debian's python3 ships without venv/ensurepip until python3-venv is installed.
if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  echo "setup: installing python3-venv (Debian package)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip
# Pin torch first (HELIOS_TORCH_VERSION, 2.13.0): the extras then find it and pull no other torch.
if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch (CPU)"
  $PY -m pip install -q "torch==${HELIOS_TORCH_VERSION:-2.13.0}"
fi
echo "setup: installing helios with its extras"
$PY -m pip install -q -e ".[worker,operator,demo,dev]"
echo "setup: done (.venv ready)"
