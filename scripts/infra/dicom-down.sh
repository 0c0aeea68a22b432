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

# gone <pid>: no such process, or only a zombie left (this machine's PID 1 may never reap it)
gone() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 0
  case "$st" in Z*) return 0 ;; esac
  return 1
}

pids=() names=()
for name in orthanc dcmqrscp qrscp; do
  pidfile=$D/pids/$name.pid
  [ -s "$pidfile" ] || continue
  pid=$(tr -dc '0-9' <"$pidfile")
  args=$(ps -o args= -p "${pid:-0}" 2>/dev/null || true)
  if [ -z "$pid" ] || gone "$pid" || ! [[ $args =~ ${PATTERN[$name]} ]]; then
    log "$name: not running (stale $pidfile)"
    rm -f "$pidfile"
    continue
  fi
  kill -TERM "$pid" 2>/dev/null || true
  pids+=("$pid")
  names+=("$name")
done

# wait for all of them together; SIGKILL what is left after 20 s
end=$((SECONDS + 20))
while :; do
  left=0
  for i in "${!pids[@]}"; do gone "${pids[$i]}" || left=1; done
  [ $left = 0 ] || [ $SECONDS -ge $end ] && break
  sleep 0.2
done
for i in "${!pids[@]}"; do
  if ! gone "${pids[$i]}"; then
    log "${names[$i]} (pid ${pids[$i]}) still running after 20 s: SIGKILL"
    kill -KILL "${pids[$i]}" 2>/dev/null || true
    for _ in $(seq 1 25); do gone "${pids[$i]}" && break; sleep 0.2; done
  fi
  log "stopped ${names[$i]} (pid ${pids[$i]})"
  rm -f "$D/pids/${names[$i]}.pid"
done
rm -f "$D/env.sh"
log "done"
