#!/usr/bin/env bash
# What `make pod-setup` / `pod-check` run on each TPU worker (deploy/tpu_vm/setup.py copies it
# into the worker's home):
#   bash WORKER_SCRIPT setup WHEEL   uv, a Python of its own, the wheel with pinned deps
#   bash WORKER_SCRIPT check [--free_tpu]   Python, vitpod, who holds the TPU and the devices
#                                    JAX sees (one line); --free_tpu stops those holders first
# Settings come from the environment deploy/job.py (script_vars) sets: PYTHON_VERSION, UV_VERSION,
# PLATFORM, LOCAL_DEVICES, and optionally PYPI_MIRROR (a package index URL) and PYTHON_MIRROR
# (where uv downloads interpreters from, for VMs without internet). So do the names of the
# files in the home (vitpod.protocol's): VENV, CONFIGS, CONSTRAINTS, CHECK_SCRIPT.
# The TPU images' python3 is Ubuntu 22.04's 3.10, often without venv/ensurepip, and vitpod
# needs >= 3.11: the system Python only installs uv, which brings the interpreter.
set -euo pipefail
cd "$HOME"
UV="$HOME/.local/bin/uv"  # not on PATH in a non-interactive ssh session: called by path

retry() {  # retry CMD...: up to 4 tries, backing off 2, 4, 8 s
  local n=1
  until "$@"; do
    if ((n >= 4)); then echo "failed $n times: $*" >&2; return 1; fi
    sleep $((2 ** n)); n=$((n + 1))
  done
}

install_uv() {
  if [[ -x "$UV" ]] && [[ "$("$UV" --version)" == "uv $UV_VERSION"* ]]; then return; fi
  if [[ -n "${PYPI_MIRROR:-}" ]]; then export PIP_INDEX_URL="$PYPI_MIRROR"; fi
  if python3 -m pip --version >/dev/null 2>&1; then
    retry python3 -m pip install --user --quiet --disable-pip-version-check "uv==$UV_VERSION"
  else  # no pip for the system Python: uv's standalone installer
    curl -LsSf "https://astral.sh/uv/$UV_VERSION/install.sh" \
      | env UV_INSTALL_DIR="$HOME/.local/bin" UV_NO_MODIFY_PATH=1 sh
  fi
}

setup() {
  local wheel="$1"
  install_uv
  if [[ -n "${PYPI_MIRROR:-}" ]]; then export UV_DEFAULT_INDEX="$PYPI_MIRROR"; fi
  if [[ -n "${PYTHON_MIRROR:-}" ]]; then export UV_PYTHON_INSTALL_MIRROR="$PYTHON_MIRROR"; fi
  retry "$UV" venv --quiet --clear --python "$PYTHON_VERSION" "$VENV"
  retry "$UV" pip install --quiet --python "$VENV/bin/python" \
    --constraint "$CONSTRAINTS" "$wheel[tpu]"
  mkdir -p "$CONFIGS"
}

check() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "FAILED: no ~/$VENV: run make pod-setup"; exit 1
  fi
  JAX_PLATFORMS="$PLATFORM" "$VENV/bin/python" "$CHECK_SCRIPT" --python="$PYTHON_VERSION" \
    --platform="$PLATFORM" --local_devices="$LOCAL_DEVICES" "$@"
}

case "${1:-}" in
  setup) setup "$2" ;;
  check) shift; check "$@" ;;
  *) echo "usage: $0 setup WHEEL | check [--free_tpu]" >&2; exit 2 ;;
esac
