#!/usr/bin/env bash
# Set up everything clpipe's demo and tests need, idempotently:
#   .venv/                       clpipe itself (editable) with its test, docs and dev (lint) extras
#   $CLPIPE_TOOLS/fw-18.5.1/     the real Flywheel CLI, in an environment of its own
#   $CLPIPE_TOOLS/fw-17.5.1/     an older fw that leaves the <TemporaryDirectory> folder (tests only)
#   $CLPIPE_TOOLS/sdk/           the current flywheel-sdk (tests only)
# Usage: scripts/setup.sh [--demo]   (--demo: only what the demo needs)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${CLPIPE_TOOLS:-$HOME/.cache/clpipe-tests}
PY=${PYTHON:-python3}
mode=${1:-all}
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[setup] $*"; }
# run pip quietly, hiding this machine's "Location ... is ignored" noise; fail when pip fails
quiet_pip() {
  local out
  if ! out=$("$@" 2>&1); then
    printf '%s\n' "$out" | grep -vE "is ignored: it is neither" >&2
    echo "[setup] failed: $*" >&2
    return 1
  fi
  printf '%s\n' "$out" | grep -vE "is ignored: it is neither|^\s*$" || true
}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "clpipe needs Python 3.10 or newer; set PYTHON=/path/to/python3.x" >&2; exit 1
fi

if [ "$mode" != "--demo" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # Debian packages the tests use, each installed when missing (one `apt-get update` for all):
  #   strace    the tests watch every command line clpipe's children run, to prove no secret is on one
  #   lmod      the environment-module tests load clpipe's modulefile with the real Lmod
  #   dcm2niix  a new project's dropoff is converted at dcm2niix's default search depth (test_layout_default.py)
  #   chromium  the `clpipe dicom status -html` page is loaded in a real headless browser (test_status.py)
  #   rsync     the file:// benchmark's peer (bench/dicom_folder.py; its quick mode runs in the tests)
  missing=()
  command -v strace >/dev/null || missing+=(strace)
  [ -e /usr/share/lmod/lmod/init/bash ] || missing+=(lmod)
  command -v dcm2niix >/dev/null || missing+=(dcm2niix)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v rsync >/dev/null || missing+=(rsync)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/clpipe ] || ! .venv/bin/python -c 'import clpipe, pytest' 2>/dev/null; then
  log "creating .venv with clpipe"
  "$PY" -m venv .venv
  quiet_pip .venv/bin/pip install -q -e '.[test,docs,dev]'
fi
# keep the editable install in step with pyproject.toml (cheap when nothing changed)
quiet_pip .venv/bin/pip install -q -e '.[test,docs,dev]'

fw_env() { # fw_env <dir> <pip args...>: a venv with the given packages, made once
  local dir=$1; shift
  if [ ! -f "$dir/.complete" ]; then
    log "installing $* into $dir (once; it is kept for later runs)"
    rm -rf "$dir"; mkdir -p "$(dirname "$dir")"
    "$PY" -m venv "$dir"
    quiet_pip "$dir/bin/pip" install -q "$@"
    touch "$dir/.complete"
  fi
}
# flywheel-cli imports pkg_resources, which setuptools 82 removed
fw_env "$TOOLS/fw-18.5.1" "setuptools<82" "flywheel-cli==18.5.1"
if [ "$mode" != "--demo" ]; then
  fw_env "$TOOLS/fw-17.5.1" "setuptools<82" "flywheel-cli==17.5.1"
  fw_env "$TOOLS/sdk" "flywheel-sdk"
fi
log "ready: clpipe in .venv, fw in $TOOLS/fw-18.5.1/bin"
