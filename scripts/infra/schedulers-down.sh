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


# shellcheck source=scripts/infra/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# stop <daemon>...: those of them this script's up started, together (see stop_together)
stop() {
  local args=() name
  for name in "$@"; do args+=("$name" "$INFRA/pids/$name.pid" "$(named "$name")"); done
  stop_together "${args[@]}"
}

stop slurmd sge_execd        # the execution daemons first,
stop slurmctld sge_qmaster   # then the controllers (sge_qmaster takes ~13 s),
stop munged                  # then SLURM's authentication
rm -f "$INFRA/env.sh"
log "done"
