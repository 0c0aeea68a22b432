#!/usr/bin/env bash
# Stop the daemons scripts/infra/schedulers-up.sh started, by the PID files it wrote in
# $CLPIPE_INFRA/pids (default /tmp/clpipe-infra): SIGTERM, then SIGKILL after 20 s.
# A daemon this script did not start (e.g. a munged that was already running) is left alone.
# Safe to run when nothing is running. State and packages are kept: schedulers-up.sh
# starts the same cluster again (job ids go on).
set -uo pipefail

INFRA=${CLPIPE_INFRA:-/tmp/clpipe-infra}
case "$INFRA" in /*) ;; *) INFRA="$PWD/$INFRA" ;; esac
T0=$(date +%s.%N)
log() { echo "[schedulers-down +$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s] $*" >&2; }
[ -d "$INFRA/pids" ] || { log "nothing to stop ($INFRA/pids does not exist)"; exit 0; }
exec 9>"$INFRA/.lock"
flock -w 120 9 || { log "another schedulers-up/down holds $INFRA/.lock"; exit 1; }

# gone <pid>: no such process, or only a zombie left (daemons re-parented to PID 1 may never be reaped)
gone() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 0
  case "$st" in Z*) return 0 ;; esac
  return 1
}
# stop <name>...: SIGTERM each daemon whose $INFRA/pids/<name>.pid holds a live process of
# that name, wait for all of them together, SIGKILL what is left after 20 s
stop() {
  local name pidfile pid comm pids=() names=()
  for name in "$@"; do
    pidfile=$INFRA/pids/$name.pid
    [ -s "$pidfile" ] || continue
    pid=$(tr -dc '0-9' <"$pidfile")
    comm=$(ps -o comm= -p "${pid:-0}" 2>/dev/null || true)
    if [ -z "$pid" ] || gone "$pid" || [ "$comm" != "$name" ]; then
      log "$name: not running (stale $pidfile)"
      rm -f "$pidfile"
      continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
    names+=("$name")
  done
  local i end=$((SECONDS + 20)) left
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
    rm -f "$INFRA/pids/${names[$i]}.pid"
  done
}

stop slurmd sge_execd        # the execution daemons first,
stop slurmctld sge_qmaster   # then the controllers (sge_qmaster takes ~13 s),
stop munged                  # then SLURM's authentication
rm -f "$INFRA/env.sh"
log "done"
