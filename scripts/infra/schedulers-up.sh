#!/usr/bin/env bash
# Bring up a real single-node SLURM 22.05 and Grid Engine 8.1.9 on loopback, for clpipe's
# tests. Debian 12, run as root; daemons are started by hand (no systemd needed).
#
#   eval "$(scripts/infra/schedulers-up.sh)"      # or: source "$CLPIPE_INFRA/env.sh" afterwards
#
# stdout carries only `export VAR=value` lines (also written to $INFRA/env.sh); all progress
# goes to stderr. Idempotent: daemons already running are left alone, configuration is
# re-applied. scripts/infra/schedulers-down.sh stops what this started.
#
# Environment:
#   CLPIPE_INFRA   where all mutable state goes (default /tmp/clpipe-infra)
#   SCHEDULERS     "slurm", "sge" or both (default "slurm sge"; "both"/"all" also accepted)
#   CLPIPE_SLURM_MEMORY  RealMemory of the SLURM node in MB (default 4000)
set -euo pipefail

INFRA=${CLPIPE_INFRA:-/tmp/clpipe-infra}
case "$INFRA" in /*) ;; *) INFRA="$PWD/$INFRA" ;; esac
SCHEDULERS=${SCHEDULERS:-slurm sge}
SCHEDULERS=${SCHEDULERS//,/ }
case " $SCHEDULERS " in *" both "* | *" all "*) SCHEDULERS="slurm sge" ;; esac
want() { case " $SCHEDULERS " in *" $1 "*) return 0 ;; esac; return 1; }
for s in $SCHEDULERS; do
  case "$s" in slurm | sge) ;; *) echo "SCHEDULERS: unknown scheduler '$s' (use slurm, sge or both)" >&2; exit 2 ;; esac
done

exec 3>&1 1>&2 # stdout is only for the final export lines: everything else goes to stderr

T0=$(date +%s.%N)
log() { echo "[schedulers-up +$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s] $*"; }
[ "$(id -u)" = 0 ] || { log "must run as root (it installs packages and starts daemons)"; exit 1; }


# shellcheck source=scripts/infra/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PORT_HINT="stop it first (another CLPIPE_INFRA? scripts/infra/schedulers-down.sh with that CLPIPE_INFRA)"
# daemon <cmd...>: start a daemon without our stdout (fd 3) or lock (fd 9): a daemon that kept
# them would hold the lock forever and make `eval "$(schedulers-up.sh)"` wait for ever
daemon() { "$@" 3>&- 9>&-; }

mkdir -p "$INFRA/pids"
exec 9>"$INFRA/.lock"
flock -w 120 9 || { log "another schedulers-up/down holds $INFRA/.lock"; exit 1; }

# ---------------------------------------------------------------- packages
PKGS=()
want slurm && PKGS+=(munge slurmctld slurmd slurm-client)
want sge && PKGS+=(gridengine-master gridengine-exec gridengine-client)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # answers for gridengine's questions: a cell "default" whose master is localhost
  for owner in gridengine-common gridengine-master gridengine-exec gridengine-client; do
    printf '%s shared/%s\n' \
      "$owner" "gridenginemaster string localhost" \
      "$owner" "gridenginecell string default" \
      "$owner" "gridengineconfig boolean true"
  done | debconf-set-selections
  timeout 300 apt-get update -qq || { log "apt-get update failed"; exit 1; }
  timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$INFRA/apt.log" 2>&1 ||
    fail "apt-get install ${missing[*]}" "$INFRA/apt.log"
  log "packages installed"
fi

# ---------------------------------------------------------------- munge (SLURM's authentication)
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
start_munge() {
  if munge_ok; then log "munged already running"; return 0; fi
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  install -d -o munge -g munge -m 0700 "$INFRA/munge"
  rm -f "$INFRA/munge/munged.pid" "$INFRA/pids/munged.pid"
  daemon runuser -u munge -- /usr/sbin/munged --pid-file="$INFRA/munge/munged.pid" \
    --log-file="$INFRA/munge/munged.log" >"$INFRA/munge/start.log" 2>&1 ||
    fail munged "$INFRA/munge/start.log" "$INFRA/munge/munged.log"
  waitfor 15 munge_ok || fail munged "$INFRA/munge/start.log" "$INFRA/munge/munged.log"
  cp "$INFRA/munge/munged.pid" "$INFRA/pids/munged.pid"
  log "munged started (pid $(cat "$INFRA/pids/munged.pid"))"
}

# ---------------------------------------------------------------- SLURM
SLURM_DIR=$INFRA/slurm
slurmctld_ok() { alive "$INFRA/pids/slurmctld.pid" "$(named slurmctld)" && scontrol ping >/dev/null 2>&1; }
slurm_node_ok() { # the node accepts work (idle, or busy with jobs already)
  case "$(sinfo -h -o %T 2>/dev/null)" in idle | mixed | allocated | completing) return 0 ;; esac
  return 1
}
start_slurm() {
  mkdir -p "$SLURM_DIR"/{state,spool,log}
  local mem_total real_mem
  mem_total=$(free -m | awk '/^Mem:/ {print $2}')
  real_mem=${CLPIPE_SLURM_MEMORY:-4000}
  if [ "$mem_total" -le "$real_mem" ]; then
    real_mem=$((mem_total * 3 / 4))
    log "only ${mem_total} MB of memory: the SLURM node gets RealMemory=${real_mem}"
  fi
  cat >"$SLURM_DIR/slurm.conf.new" <<EOF
# written by scripts/infra/schedulers-up.sh: one node (this machine) on loopback
ClusterName=clpipe
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job (clpipe's continuation at a time limit) waits out its old credential before
# it runs again: 10 s here instead of 120 s (a restart after ~12 s instead of ~150 s)
AuthInfo=cred_expire=10
MailProg=/bin/true
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$INFRA/pids/slurmctld.pid
SlurmdPidFile=$INFRA/pids/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without DefMemPerCPU a job without --mem takes the whole node's memory
DefMemPerCPU=100
SchedulerType=sched/backfill
# without batch_sched_delay=0 every job waits ~3 s; a scheduling pass every 2 s (a requeued or
# dependent job starts within seconds)
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
# the node is what this file says, whatever the machine has
SlurmdParameters=config_overrides
ReturnToService=2
# finished jobs stay visible to scontrol show job for an hour
MinJobAge=3600
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# without slurmdbd: sacct -c reads this file
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_DIR/jobcomp.txt
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  local changed=0
  if ! cmp -s "$SLURM_DIR/slurm.conf.new" "$SLURM_DIR/slurm.conf"; then
    mv "$SLURM_DIR/slurm.conf.new" "$SLURM_DIR/slurm.conf"
    changed=1
  else
    rm -f "$SLURM_DIR/slurm.conf.new"
  fi
  export SLURM_CONF=$SLURM_DIR/slurm.conf

  if [ $changed = 1 ] && alive "$INFRA/pids/slurmctld.pid" "$(named slurmctld)"; then
    # AuthInfo (cred_expire) is read when the daemons start: restart both (jobs are kept in
    # StateSaveLocation); wait for running jobs to end first, for up to 5 minutes
    local wait_end=$((SECONDS + 300))
    while [ -n "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && [ $SECONDS -lt $wait_end ]; do sleep 2; done
    log "slurm.conf changed: restarting slurmctld and slurmd"
    stop_together slurmd "$INFRA/pids/slurmd.pid" "$(named slurmd)" slurmctld "$INFRA/pids/slurmctld.pid" "$(named slurmctld)"
  fi
  if alive "$INFRA/pids/slurmctld.pid" "$(named slurmctld)"; then
    log "slurmctld already running"
  else
    check_port slurmctld 6817 "$PORT_HINT"
    rm -f "$INFRA/pids/slurmctld.pid"
    daemon /usr/sbin/slurmctld -f "$SLURM_CONF" >"$SLURM_DIR/log/slurmctld.start.log" 2>&1 ||
      fail slurmctld "$SLURM_DIR/log/slurmctld.start.log" "$SLURM_DIR/log/slurmctld.log"
    waitfor 30 slurmctld_ok ||
      fail "slurmctld (not answering scontrol ping)" "$SLURM_DIR/log/slurmctld.start.log" "$SLURM_DIR/log/slurmctld.log"
    log "slurmctld started (pid $(cat "$INFRA/pids/slurmctld.pid"))"
  fi
  if alive "$INFRA/pids/slurmd.pid" "$(named slurmd)"; then
    log "slurmd already running"
  else
    # -N: the node is called localhost, which is not this machine's host name
    check_port slurmd 6818 "$PORT_HINT"
    rm -f "$INFRA/pids/slurmd.pid"
    daemon /usr/sbin/slurmd -f "$SLURM_CONF" -N localhost >"$SLURM_DIR/log/slurmd.start.log" 2>&1 ||
      fail slurmd "$SLURM_DIR/log/slurmd.start.log" "$SLURM_DIR/log/slurmd.log"
    log "slurmd started"
  fi
  local end=$((SECONDS + 60)) resumed=0 state
  until slurm_node_ok; do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    # a node left drained/down by an earlier run: put it back into service once
    if [ $resumed = 0 ] && [ $SECONDS -gt $((end - 55)) ]; then
      case "$state" in drain* | down* | fail*)
        log "node is '$state': resuming it"
        scontrol update NodeName=localhost State=RESUME || true
        resumed=1 ;;
      esac
    fi
    [ $SECONDS -lt $end ] || fail "slurmd (node state '$state', not idle after 60 s)" \
      "$SLURM_DIR/log/slurmd.start.log" "$SLURM_DIR/log/slurmd.log" "$SLURM_DIR/log/slurmctld.log"
    sleep 0.2
  done
  alive "$INFRA/pids/slurmd.pid" "$(named slurmd)" || fail "slurmd (no live pid in $INFRA/pids/slurmd.pid)" "$SLURM_DIR/log/slurmd.log"
  log "SLURM up: node localhost is $(sinfo -h -o %T)"
}

# ---------------------------------------------------------------- Grid Engine
# A cell of our own ($INFRA/sge/default), so the package's cell in /var/lib/gridengine is
# never touched; the Debian binaries are used as they are (qsub etc. in /usr/bin).
export SGE_ROOT=$INFRA/sge SGE_CELL=default
SGE_COMMON=$SGE_ROOT/$SGE_CELL/common
SGE_QSPOOL=$SGE_ROOT/spool/qmaster
SGE_ESPOOL=$SGE_ROOT/spool/execd
sge_qmaster_ok() { alive "$SGE_QSPOOL/qmaster.pid" "$(named sge_qmaster)" && qconf -sh >/dev/null 2>&1; }
lines() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }
# sge_wait <daemon> <pidfile> <messages> <lines before start> <check...>: wait (30 s) until
# check succeeds; give up at once when the daemon logged a critical error or its pid died
sge_wait() {
  local who=$1 pidfile=$2 msgs=$3 from=$4 end=$((SECONDS + 30))
  shift 4
  until "$@" >/dev/null 2>&1; do
    if tail -n +$((from + 1)) "$msgs" 2>/dev/null | grep -q '|C|'; then fail_sge "$who (critical error in $msgs)"; fi
    if [ -s "$pidfile" ] && ! alive "$pidfile" "$(named "$who")"; then fail_sge "$who (exited)"; fi
    [ $SECONDS -lt $end ] || fail_sge "$who (not ready after 30 s)"
    sleep 0.2
  done
}
fail_sge() { # fail_sge <what>: fail with the Grid Engine logs that exist
  local f logs=("$SGE_ROOT/qmaster.start.log" "$SGE_QSPOOL/messages" "$SGE_ROOT/execd.start.log")
  for f in "$SGE_ESPOOL"/*/messages /tmp/qmaster_messages* /tmp/execd_messages*; do [ -e "$f" ] && logs+=("$f"); done
  fail "$1" "${logs[@]}"
}
# qconf_edit <qconf args...>: run an editing qconf (-mconf, -msconf, -aq, -mq) with an EDITOR
# that sets each "key value" line of $SGE_SET in the file qconf hands it
qconf_edit() {
  SGE_SET="$SGE_SET" EDITOR="$SGE_ROOT/qconf-editor.sh" qconf "$@"
}
write_qconf_editor() {
  cat >"$SGE_ROOT/qconf-editor.sh" <<'EOF'
#!/bin/sh
# EDITOR for qconf: sets every "key value" line of $SGE_SET in the file $1 (replacing the
# key's line and its continuation lines, or appending it)
set -e
f=$1
awk -v set="$SGE_SET" '
  BEGIN { n = split(set, lines, "\n")
          for (i = 1; i <= n; i++) { if (lines[i] == "") continue
            k = lines[i]; sub(/[ \t].*/, "", k); v = lines[i]; sub(/^[^ \t]+[ \t]+/, "", v)
            want[k] = v; order[++m] = k } }
  skip { skip = ($0 ~ /\\$/); next }
  { k = $1 }
  (k in want) { printf "%-24s %s\n", k, want[k]; done[k] = 1; skip = ($0 ~ /\\$/); next }
  { print }
  END { for (i = 1; i <= m; i++) if (!(order[i] in done)) printf "%-24s %s\n", order[i], want[order[i]] }
' "$f" >"$f.new"
cat "$f.new" >"$f"
rm -f "$f.new"
EOF
  chmod 755 "$SGE_ROOT/qconf-editor.sh"
}
sge_queue_state() { # prints the all.q@localhost line's state letters ("" = healthy, "?" = no line)
  qstat -f -q all.q 2>/dev/null | awk '$1 ~ /^all\.q@/ { found = 1; st = (NF >= 6 ? $6 : "") } END { print (found ? st : "?") }'
}
init_sge_cell() {
  log "creating Grid Engine cell in $SGE_ROOT"
  rm -rf "${SGE_ROOT:?}/spooldb" "$SGE_QSPOOL" "$SGE_ESPOOL" "${SGE_ROOT:?}/$SGE_CELL"
  mkdir -p "$SGE_COMMON" "$SGE_ROOT/spooldb" "$SGE_QSPOOL" "$SGE_ESPOOL"
  cat >"$SGE_COMMON/bootstrap" <<EOF
# Version: 8.1.9 (written by scripts/infra/schedulers-up.sh)
admin_user              none
default_domain          none
ignore_fqdn             true
spooling_method         berkeleydb
spooling_lib            libspoolb
spooling_params         $SGE_ROOT/spooldb
binary_path             /usr/sbin
qmaster_spool_dir       $SGE_QSPOOL
security_mode           none
listener_threads        2
worker_threads          2
scheduler_threads       1
EOF
  (
    cd "$SGE_ROOT"
    /usr/lib/gridengine/spoolinit berkeleydb libspoolb "$SGE_ROOT/spooldb" init
    # the package's defaults; the fixes are applied below through qconf -mconf
    sed "s|^execd_spool_dir .*|execd_spool_dir        $SGE_ESPOOL|" \
      /usr/share/gridengine/default-configuration >"$SGE_ROOT/configuration.init"
    /usr/lib/gridengine/spooldefaults configuration "$SGE_ROOT/configuration.init"
    /usr/lib/gridengine/spooldefaults complexes /usr/share/gridengine/util/resources/centry
    /usr/lib/gridengine/spooldefaults usersets /usr/share/gridengine/util/resources/usersets
    /usr/lib/gridengine/spooldefaults managers root
  ) >"$SGE_ROOT/init.log" 2>&1 || fail "Grid Engine cell initialisation" "$SGE_ROOT/init.log"
  touch "$SGE_ROOT/.initialized"
}
start_sge() {
  mkdir -p "$SGE_ROOT"
  local d n
  for d in bin lib util utilbin; do ln -sfn "/var/lib/gridengine/$d" "$SGE_ROOT/$d"; done
  write_qconf_editor
  [ -e "$SGE_ROOT/.initialized" ] || init_sge_cell
  echo localhost >"$SGE_COMMON/act_qmaster"
  # this machine's own name is an alias of localhost: one host for qmaster, execd and clients
  echo "localhost $(hostname)" >"$SGE_COMMON/host_aliases"
  printf 'SGE_ROOT=%s; export SGE_ROOT\nSGE_CELL=%s; export SGE_CELL\n' "$SGE_ROOT" "$SGE_CELL" >"$SGE_COMMON/settings.sh"

  if alive "$INFRA/pids/sge_qmaster.pid" "$(named sge_qmaster)"; then
    log "sge_qmaster already running"
  else
    check_port sge_qmaster 6444 "$PORT_HINT"
    rm -f "$SGE_QSPOOL/qmaster.pid" "$SGE_QSPOOL/lock" "$INFRA/pids/sge_qmaster.pid"
    n=$(lines "$SGE_QSPOOL/messages")
    daemon /usr/sbin/sge_qmaster >"$SGE_ROOT/qmaster.start.log" 2>&1 || fail_sge sge_qmaster
    sge_wait sge_qmaster "$SGE_QSPOOL/qmaster.pid" "$SGE_QSPOOL/messages" "$n" sge_qmaster_ok
    cp "$SGE_QSPOOL/qmaster.pid" "$INFRA/pids/sge_qmaster.pid"
    log "sge_qmaster started (pid $(cat "$INFRA/pids/sge_qmaster.pid"))"
  fi

  # global configuration: jobs of root allowed, accounting written at once, no mail
  SGE_SET="min_uid 0
min_gid 0
execd_spool_dir $SGE_ESPOOL
mailer /bin/true
load_report_time 00:00:10
reporting_params accounting=true reporting=false flush_time=00:00:01 accounting_flush_time=00:00:00 joblog=false sharelog=00:00:00" \
    qconf_edit -mconf >"$SGE_ROOT/qconf.log" 2>&1 || true
  qconf -sconf | grep -Eq '^min_uid +0$' || fail "qconf -mconf (min_uid not 0)" "$SGE_ROOT/qconf.log"
  # scheduler: runs every second, right after a submit or a job's end (else ~19 s per job)
  SGE_SET="schedule_interval 0:0:1
flush_submit_sec 1
flush_finish_sec 1" qconf_edit -msconf >>"$SGE_ROOT/qconf.log" 2>&1 || true
  qconf -ssconf | grep -Eq '^schedule_interval +0:0:1$' || fail "qconf -msconf" "$SGE_ROOT/qconf.log"
  # -l h_vmem=2G / -l h_rt=0:10:0 must be accepted: both complexes requestable (the package's
  # defaults are; an edited cell is put right). Not consumable: a request is a per-job limit.
  if ! qconf -sc | awk '$1 == "h_vmem" || $1 == "h_rt" { n++; if ($5 != "YES") bad = 1 } END { exit !(n == 2 && !bad) }'; then
    qconf -sc | awk '$1 == "h_vmem" || $1 == "h_rt" { $5 = "YES" } { print }' >"$SGE_ROOT/complexes"
    qconf -Mc "$SGE_ROOT/complexes" >>"$SGE_ROOT/qconf.log" 2>&1 || fail "qconf -Mc (h_vmem, h_rt requestable)" "$SGE_ROOT/qconf.log"
  fi
  # hosts: localhost is admin, submit and execution host
  qconf -sh 2>/dev/null | grep -qx localhost || qconf -ah localhost >>"$SGE_ROOT/qconf.log" 2>&1 || fail "qconf -ah localhost" "$SGE_ROOT/qconf.log"
  qconf -ss 2>/dev/null | grep -qx localhost || qconf -as localhost >>"$SGE_ROOT/qconf.log" 2>&1 || fail "qconf -as localhost" "$SGE_ROOT/qconf.log"
  if ! qconf -sel 2>/dev/null | grep -qx localhost; then
    printf '%s\n' "hostname localhost" "load_scaling NONE" "complex_values NONE" "user_lists NONE" \
      "xuser_lists NONE" "projects NONE" "xprojects NONE" "usage_scaling NONE" "report_variables NONE" \
      >"$SGE_ROOT/exechost.localhost"
    qconf -Ae "$SGE_ROOT/exechost.localhost" >>"$SGE_ROOT/qconf.log" 2>&1 || fail "qconf -Ae localhost" "$SGE_ROOT/qconf.log"
  fi
  # queue all.q on localhost: 2 slots, no parallel environments, never in load alarm
  SGE_SET="hostlist localhost
slots 2
pe_list NONE
load_thresholds NONE
shell /bin/sh"
  if qconf -sql 2>/dev/null | grep -qx all.q; then
    qconf_edit -mq all.q >>"$SGE_ROOT/qconf.log" 2>&1 || true
  else
    qconf_edit -aq all.q >>"$SGE_ROOT/qconf.log" 2>&1 || true
  fi
  qconf -sq all.q 2>/dev/null | grep -Eq '^hostlist +localhost$' || fail "qconf -aq/-mq all.q" "$SGE_ROOT/qconf.log"

  if alive "$INFRA/pids/sge_execd.pid" "$(named sge_execd)"; then
    log "sge_execd already running"
  else
    check_port sge_execd 6445 "$PORT_HINT"
    rm -f "$SGE_ESPOOL/localhost/execd.pid" "$INFRA/pids/sge_execd.pid"
    n=$(lines "$SGE_ESPOOL/localhost/messages")
    daemon /usr/sbin/sge_execd >"$SGE_ROOT/execd.start.log" 2>&1 || fail_sge sge_execd
    sge_wait sge_execd "$SGE_ESPOOL/localhost/execd.pid" "$SGE_ESPOOL/localhost/messages" "$n" \
      alive "$SGE_ESPOOL/localhost/execd.pid" "$(named sge_execd)"
    cp "$SGE_ESPOOL/localhost/execd.pid" "$INFRA/pids/sge_execd.pid"
    log "sge_execd started (pid $(cat "$INFRA/pids/sge_execd.pid"))"
  fi

  local end=$((SECONDS + 60)) st
  while :; do
    st=$(sge_queue_state)
    [ -z "$st" ] && break
    case "$st" in *E*) qmod -cq all.q >/dev/null 2>&1 || true ;; esac # error state from an earlier job
    case "$st" in *d*) qmod -e all.q >/dev/null 2>&1 || true ;; esac
    [ $SECONDS -lt $end ] || fail_sge "sge_execd (queue all.q@localhost state '$st' after 60 s)"
    sleep 0.2
  done
  log "Grid Engine up: $(qstat -f -q all.q | awk '$1 ~ /^all\.q@/ {print $1, "slots", $3}')"
}

want slurm && { start_munge; start_slurm; }
want sge && start_sge

# ---------------------------------------------------------------- what a client needs
{
  if alive "$INFRA/pids/slurmctld.pid" "$(named slurmctld)"; then
    echo "export SLURM_CONF=$INFRA/slurm/slurm.conf"
  fi
  if alive "$INFRA/pids/sge_qmaster.pid" "$(named sge_qmaster)"; then
    echo "export SGE_ROOT=$SGE_ROOT"
    echo "export SGE_CELL=$SGE_CELL"
  fi
} >"$INFRA/env.sh.new"
mv "$INFRA/env.sh.new" "$INFRA/env.sh"
cat "$INFRA/env.sh" >&3
log "done; the same exports are in $INFRA/env.sh"
