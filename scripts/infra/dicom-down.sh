#!/usr/bin/env bash
# Stop the DICOM servers scripts/infra/dicom-up.sh started (Orthanc, dcmqrscp, qrscp), by the
# PID files it wrote in $CLPIPE_INFRA/dicom/pids (default /tmp/clpipe-infra): SIGTERM, then
# SIGKILL after 20 s, and wait until each is gone (Orthanc must be, before it starts again:
# its SQLite index is locked until then). A process whose command line is not the server's
# (a PID reused since) is left alone. Safe to run when nothing is running. The data, the
# packages and the tool venv stay: dicom-up.sh starts the servers again without reloading.
set -uo pipefail

INFRA=${CLPIPE_INFRA:-/tmp/clpipe-infra}
case "$INFRA" in /*) ;; *) INFRA="$PWD/$INFRA" ;; esac
D=$INFRA/dicom
T0=$(date +%s.%N)
log() { echo "[dicom-down +$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s] $*" >&2; }
[ -d "$D/pids" ] || { log "nothing to stop ($D/pids does not exist)"; exit 0; }
exec 9>"$D/.lock"
flock -w 120 9 || { log "another dicom-up/down holds $D/.lock"; exit 1; }

# the command line each server runs with (as dicom-up.sh starts it)
declare -A PATTERN=(
  [orthanc]='^([^ ]*/)?Orthanc( |$)'
  [dcmqrscp]='^([^ ]*/)?dcmqrscp( |$)'
  [qrscp]='run_qrscp\.py'
)


# shellcheck source=scripts/infra/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
args=()
for name in orthanc dcmqrscp qrscp; do args+=("$name" "$D/pids/$name.pid" "${PATTERN[$name]}"); done
stop_together "${args[@]}"
rm -f "$D/env.sh"
log "done"
