#!/usr/bin/env bash
# A real `clpipe dicom flywheel_sync` with no account and no server of yours:
# the bundled Flywheel-compatible server serves a generated demo project (lab/study) on
# 127.0.0.1, the real Flywheel CLI (installed once into its own environment) logs in and
# syncs it, and clpipe checks every file. Everything lands in ./demo (or $DEMO_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --demo
TOOLS=${CLPIPE_TOOLS:-$HOME/.cache/clpipe-tests}
DEMO=${DEMO_DIR:-$PWD/demo}
rm -rf "$DEMO"; mkdir -p "$DEMO/home"
export FLYWHEEL_USER_HOME="$DEMO/home"          # the demo's own login: yours is left untouched
export PATH="$PWD/.venv/bin:$TOOLS/fw-18.5.1/bin:$PATH"   # clpipe first: the fw environment has a python of its own
export PYTHONWARNINGS=ignore                    # hides flywheel-cli's pkg_resources warning

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting the demo Flywheel server on 127.0.0.1"
python -m clpipe.testing.fwserver --port 0 --key demo-key --url-file "$DEMO/login" >"$DEMO/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -s "$DEMO/login" ] && break; kill -0 $server || { cat "$DEMO/server.log"; exit 1; }; sleep 0.1; done

step "fw login (as a user would, once)"
fw login "$(cat "$DEMO/login")"

step "clpipe project_setup"
clpipe project_setup -project_title demo -project_dir "$DEMO/project" -source_url fw://lab/study/

step "clpipe dicom flywheel_sync (without -submit: shows the job)"
clpipe dicom flywheel_sync -c "$DEMO/project/clpipe_config.json"

step "clpipe dicom flywheel_sync -submit (runs it here: no batch configuration)"
clpipe dicom flywheel_sync -c "$DEMO/project/clpipe_config.json" -submit

step "What landed in data_DICOMs"
find "$DEMO/project/data_DICOMs" -path "*/.clpipe-sync" -prune -o -type f -print | sed "s|$DEMO/project/||" | sort | head -n 20
echo "($(find "$DEMO/project/data_DICOMs" -path "*/.clpipe-sync" -prune -o -type f -print | wc -l) files; logs in $DEMO/project/logs/sync_logs)"

step "clpipe dicom status (each session's state, from local files only; -html writes a page too)"
clpipe dicom status -c "$DEMO/project/clpipe_config.json" -html "$DEMO/status.html"
