# shellcheck shell=bash
# Helpers shared by the infra scripts (schedulers-up/down, dicom-up/down). Source it after
# defining log(); nothing here runs on its own.

# waitfor <seconds> <cmd...>: poll every 0.2 s until cmd succeeds; non-zero on timeout
waitfor() {
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.2
  done
}

# fail <what> <log files...>: say what failed, show the end of its logs, exit 1
fail() {
  local who=$1; shift
  log "FAILED: $who"
  local f
  for f in "$@"; do
    [ -s "$f" ] || continue
    echo "----- last lines of $f -----"
    tail -n 25 "$f"
  done
  exit 1
}

# gone <pid>: no such process, or only a zombie left (this machine's PID 1 may never reap it)
gone() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 0
  case "$st" in Z*) return 0 ;; esac
  return 1
}

# named <program>: the pattern of a command line that runs <program> (by name or path)
named() { printf '^([^ ]*/)?%s( |$)' "$1"; }

# alive <pidfile> <pattern>: the PID in the file is a live (not zombie) process whose command
# line matches the extended regular expression <pattern> (a PID reused since is not ours)
alive() {
  [ -s "$1" ] || return 1
  local pid args
  pid=$(tr -dc '0-9' <"$1")
  [ -n "$pid" ] && ! gone "$pid" || return 1
  args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
  [[ $args =~ $2 ]]
}

# stop_together <name> <pidfile> <pattern> [<name> <pidfile> <pattern>]...: SIGTERM each one
# that is alive, wait for all of them together, SIGKILL what is left after 20 s; pid files go
stop_together() {
  local pids=() names=() files=() pid i end left
  while [ $# -ge 3 ]; do
    if alive "$2" "$3"; then
      pid=$(tr -dc '0-9' <"$2")
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid"); names+=("$1"); files+=("$2")
    elif [ -e "$2" ]; then
      log "$1: not running (stale $2)"
      rm -f "$2"
    fi
    shift 3
  done
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
      waitfor 5 gone "${pids[$i]}" || true
    fi
    log "stopped ${names[$i]} (pid ${pids[$i]})"
    rm -f "${files[$i]}"
  done
}

# port_busy <port>: something already listens on this TCP port on loopback
port_busy() {
  if command -v ss >/dev/null; then
    [ -n "$(ss -Hltn "sport = :$1")" ]
  else
    (exec 5<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# check_port <what> <port> <hint>: fail before starting a server whose port is taken
check_port() {
  port_busy "$2" || return 0
  log "FAILED: $1: TCP port $2 is already in use, by something this script did not start:"
  if command -v ss >/dev/null; then ss -Hltnp "sport = :$2"; fi
  log "$3"
  exit 1
}
