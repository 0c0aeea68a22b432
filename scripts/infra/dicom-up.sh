#!/usr/bin/env bash
# Bring up real DICOM servers on loopback for clpipe's DICOMweb and DIMSE tests, each holding
# the synthetic data set of src/clpipe/testing/dicomdata.py:
#   Orthanc 1.10 + DICOMweb plugin   HTTP (REST, /dicom-web/) and DIMSE (AE ORTHANC; private SOP
#                                    classes accepted, as a PACS that stores Siemens CSA objects)
#   dcmtk's dcmqrscp                 DIMSE (AE DCMQRSCP)
#   pynetdicom's qrscp app           DIMSE (AE QRSCP), in a tool venv of its own
# Debian 12, run as root; the servers are started by hand (no systemd needed).
#
#   eval "$(scripts/infra/dicom-up.sh)"      # or: source "$CLPIPE_INFRA/dicom/env.sh" afterwards
#
# stdout carries only `export VAR=value` lines (also written to $CLPIPE_INFRA/dicom/env.sh); all
# progress goes to stderr. Idempotent: a server already running with the same configuration
# and data is left alone (well under a second); one whose configuration changed is restarted;
# one whose data is not the current data set is emptied and loaded again.
# scripts/infra/dicom-down.sh stops what this started.
#
# Environment (all optional):
#   CLPIPE_INFRA               where all mutable state goes (default /tmp/clpipe-infra; this uses dicom/ in it)
#   CLPIPE_TOOLS               where the qrscp tool venv goes (default ~/.cache/clpipe-tests)
#   CLPIPE_ORTHANC_HTTP_PORT   Orthanc's HTTP port (default 18042)
#   CLPIPE_ORTHANC_DICOM_PORT  Orthanc's DICOM port (default 14242)
#   CLPIPE_DCMQRSCP_PORT       dcmqrscp's port (default 14243)
#   CLPIPE_QRSCP_PORT          qrscp's port (default 14244)
#   CLPIPE_MOVE_PORT           where C-MOVE destination AE "CLPIPE" listens (a test's own
#                              Storage SCP; nothing here listens on it) (default 14245)
#   CLPIPE_DICOM_SCALE         size of the data set: 1 = 139 instances, 16 = 2,209 (default 1)
# shellcheck disable=SC2034 # DIR_<server>, RE_<server> and LOAD_<server> are read by serve()
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
INFRA=${CLPIPE_INFRA:-/tmp/clpipe-infra}
case "$INFRA" in /*) ;; *) INFRA="$PWD/$INFRA" ;; esac
D=$INFRA/dicom
case "$D" in *[[:space:]]*) echo "[dicom-up] CLPIPE_INFRA must not contain white space: '$INFRA'" >&2; exit 2 ;; esac
TOOLS=${CLPIPE_TOOLS:-$HOME/.cache/clpipe-tests}
QRSCP_VENV=$TOOLS/qrscp
HTTP_PORT=${CLPIPE_ORTHANC_HTTP_PORT:-18042}
ORTHANC_PORT=${CLPIPE_ORTHANC_DICOM_PORT:-14242}
DCMQRSCP_PORT=${CLPIPE_DCMQRSCP_PORT:-14243}
QRSCP_PORT=${CLPIPE_QRSCP_PORT:-14244}
MOVE_PORT=${CLPIPE_MOVE_PORT:-14245}
SCALE=${CLPIPE_DICOM_SCALE:-1}
HOST=127.0.0.1

exec 3>&1 1>&2 # stdout is only for the final export lines: everything else goes to stderr

T0=$(date +%s.%N)
log() { echo "[dicom-up +$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s] $*"; }
[ "$(id -u)" = 0 ] || { log "must run as root (it installs packages)"; exit 1; }
for v in HTTP_PORT ORTHANC_PORT DCMQRSCP_PORT QRSCP_PORT MOVE_PORT SCALE; do
  case "${!v}" in '' | *[!0-9]*) log "$v must be a number, not '${!v}'"; exit 2 ;; esac
done
ports=("$HTTP_PORT" "$ORTHANC_PORT" "$DCMQRSCP_PORT" "$QRSCP_PORT" "$MOVE_PORT")
[ "$(printf '%s\n' "${ports[@]}" | sort -u | wc -l)" = 5 ] ||
  { log "the five ports must differ: ${ports[*]}"; exit 2; }

# shellcheck source=scripts/infra/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PORT_HINT="stop it, or choose another port (see the variables at the top of $0)"
# daemon <pidfile> <log> <cmd...>: start cmd in the background, in a session of its own, with
# TCP_NODELAY=1 (DCMTK, and so Orthanc, then turn Nagle off: C-GET/C-MOVE ~20x faster on
# loopback), without our stdout (fd 3) or lock (fd 9), which would make `eval "$(...)"` wait
daemon() {
  local pidfile=$1 logfile=$2; shift 2
  TCP_NODELAY=1 setsid "$@" </dev/null >"$logfile" 2>&1 3>&- 9>&- &
  echo $! >"$pidfile"
}
# echo_ok <aet> <port>: a C-ECHO is answered (bounded: 5 s per step)
echo_ok() { echoscu -to 5 -ta 5 -td 5 -aet CLPIPE_UP -aec "$1" "$HOST" "$2"; }
mkdir -p "$D"/{pids,orthanc,dcmqrscp,qrscp}
exec 9>"$D/.lock"
flock -w 120 9 || { log "another dicom-up/down holds $D/.lock"; exit 1; }

# ---------------------------------------------------------------- packages
missing=()
for p in orthanc orthanc-dicomweb dcmtk; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
command -v curl >/dev/null || missing+=(curl)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq >"$D/apt.log" 2>&1 || fail "apt-get update" "$D/apt.log"
  timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$D/apt.log" 2>&1 ||
    fail "apt-get install ${missing[*]}" "$D/apt.log"
  log "packages installed"
fi
# Debian's package starts its own Orthanc where a service manager runs: that one is not ours
# and listens on 8042/4242, which we do not use.
ORTHANC_PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
[ -e "$ORTHANC_PLUGIN" ] || fail "the DICOMweb plugin is not at $ORTHANC_PLUGIN (package orthanc-dicomweb)"

# ---------------------------------------------------------------- qrscp's tool venv
if [ ! -f "$QRSCP_VENV/.complete" ]; then
  log "creating $QRSCP_VENV with pynetdicom, pydicom, sqlalchemy (once; kept for later runs)"
  rm -rf "$QRSCP_VENV"
  mkdir -p "$(dirname "$QRSCP_VENV")"
  {
    python3 -m venv "$QRSCP_VENV" &&
      PIP_DISABLE_PIP_VERSION_CHECK=1 timeout 600 "$QRSCP_VENV/bin/pip" install -q pynetdicom pydicom sqlalchemy
  } >"$D/pip.log" 2>&1 || fail "tool venv $QRSCP_VENV" "$D/pip.log"
  touch "$QRSCP_VENV/.complete"
fi
PY=$QRSCP_VENV/bin/python

# ---------------------------------------------------------------- the data set
# made again only when the generator, its arguments or pydicom changed
DATA=$D/data
EXPECTED=$D/expected.json
want_id=$({
  cat "$REPO/src/clpipe/testing/dicomdata.py"
  echo "scale=$SCALE"
  "$PY" -c 'import pydicom; print(pydicom.__version__)'
} | sha256sum | cut -c1-16)
if [ ! -s "$EXPECTED" ] || [ "$(cat "$D/data.id" 2>/dev/null)" != "$want_id" ] ||
  [ "$(find "$DATA" -name '*.dcm' 2>/dev/null | wc -l)" != "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["counts"]["instances"])' "$EXPECTED")" ]; then
  log "writing the synthetic data set (scale $SCALE) to $DATA"
  rm -rf "$DATA" "$EXPECTED" "$D/data.id"
  PYTHONPATH=$REPO/src "$PY" -m clpipe.testing.dicomdata "$DATA" --scale "$SCALE" --expected "$EXPECTED" \
    >"$D/data.log" 2>&1 || fail "the data set (python -m clpipe.testing.dicomdata)" "$D/data.log"
  echo "$want_id" >"$D/data.id"
fi
# what a server's "loaded" marker must say: this very data set (any byte of it changed: reload)
DATA_ID=$(sha256sum "$EXPECTED" | cut -c1-16)
N_INSTANCES=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["counts"]["instances"])' "$EXPECTED")
log "data set: $N_INSTANCES instances in $DATA"

# load_storescu <aet> <port> <log> [<folder>]: send the data set with dcmtk's storescu, one
# association per transfer syntax, proposing only that one, so that every file is stored in
# its own transfer syntax (one association for all would turn Implicit VR into Explicit VR,
# and RLE needs proposing anyway). With <folder>: RLE files are first decompressed there
# (dcmdrle) and sent as Explicit VR Little Endian.
load_storescu() {
  local ts dirs opt dir f
  : >"$3"
  while IFS=$'\t' read -r ts dirs; do
    case "$ts" in
      1.2.840.10008.1.2) opt=-xi ;;
      1.2.840.10008.1.2.1) opt=-xe ;;
      1.2.840.10008.1.2.5) opt=-xr ;;
      *) echo "no storescu option to propose transfer syntax $ts" >>"$3"; return 1 ;;
    esac
    if [ "$opt" = -xr ] && [ -n "${4:-}" ]; then
      rm -rf "$4" && mkdir -p "$4" || return 1
      for dir in $dirs; do
        for f in "$dir"/*.dcm; do dcmdrle "$f" "$4/${f##*/}" >>"$3" 2>&1 || return 1; done
      done
      dirs=$4 opt=-xe
    fi
    # shellcheck disable=SC2086 # $dirs: the series folders (no spaces in dicomdata's layout)
    TCP_NODELAY=1 timeout 600 storescu -to 10 -ta 10 -td 60 -aet CLPIPE_LOAD -aec "$1" -R "$opt" \
      +sd +sp '*.dcm' "$HOST" "$2" $dirs >>"$3" 2>&1 || return 1
  done < <("$PY" - "$EXPECTED" "$DATA" <<'EOF'
import json, os, sys
desc = json.load(open(sys.argv[1], encoding="utf-8"))
groups = {}
for rec in desc["instances"]:
    folder = os.path.join(sys.argv[2], os.path.dirname(rec["path"]))
    groups.setdefault(rec["TransferSyntaxUID"], {})[folder] = None
for ts, folders in sorted(groups.items()):
    print(ts, " ".join(folders), sep="\t")
EOF
  )
}

# serve <name>: bring up server <name> with the data set, using these functions and variables
# of the server (defined below):
#   <name>_config    write its configuration files as *.new (installed when they differ)
#   <name>_launch    check its ports, start it in the background, wait until it answers
#   <name>_ok        it answers (C-ECHO; Orthanc: also QIDO-RS)
#   <name>_count     how many instances it holds
#   <name>_wipe      forget all its data (only while it is stopped)
#   <name>_load      send it the data set
#   DIR_<name> (state folder, with its "loaded" marker), RE_<name> (its command line),
#   LOAD_<name> (how it is loaded: another way of loading means loading again)
serve() {
  local name=$1 dir_var=DIR_$1 re_var=RE_$1 load_var=LOAD_$1 changed=0 f n
  local dir=${!dir_var} re=${!re_var} pidfile=$D/pids/$1.pid marker="$DATA_ID ${!load_var}"
  "${name}_config"
  for f in "$dir"/*.new; do
    [ -e "$f" ] || continue
    if cmp -s "$f" "${f%.new}"; then rm -f "$f"; else mv "$f" "${f%.new}"; changed=1; fi
  done
  # the "loaded" marker says which data set the server holds, and how it was loaded (any
  # byte of the data set changed, or the way of loading: load again)
  loaded() { [ "$(cat "$dir/loaded" 2>/dev/null)" = "$marker" ]; }
  if alive "$pidfile" "$re"; then
    if ! loaded || [ "$("${name}_count")" != "$N_INSTANCES" ]; then
      log "$name: does not hold the current data set: emptying it and loading it again"
      rm -f "$dir/loaded"
    elif [ $changed = 0 ]; then
      waitfor 15 "${name}_ok" || fail "$name (running, but not answering)" "$dir/$name.log"
      log "$name already running with the data set"
      return 0
    else
      log "$name: configuration changed: restarting it"
    fi
    stop_together "$name" "$pidfile" "$re" # fully gone (Orthanc: else 'SQLite: database is locked')
  fi
  loaded || "${name}_wipe"
  "${name}_launch" "$pidfile"
  alive "$pidfile" "$re" || fail "$name (pid $(cat "$pidfile") is not $name)" "$dir/$name.log"
  if loaded && [ "$("${name}_count")" != "$N_INSTANCES" ]; then
    log "$name: lost part of its data while stopped: emptying it and loading it again"
    stop_together "$name" "$pidfile" "$re"
    rm -f "$dir/loaded"
    "${name}_wipe"
    "${name}_launch" "$pidfile"
  fi
  log "$name started (pid $(cat "$pidfile"))"
  if ! loaded; then
    "${name}_load" || fail "loading the data set into $name (storescu)" "$dir/load.log" "$dir/$name.log"
    n=$("${name}_count")
    [ "$n" = "$N_INSTANCES" ] || fail "$name holds ${n:-?} instances after loading, not $N_INSTANCES" "$dir/load.log" "$dir/$name.log"
    echo "$marker" >"$dir/loaded"
    log "$name: loaded $n instances"
  fi
}

# ---------------------------------------------------------------- Orthanc
DIR_orthanc=$D/orthanc
RE_orthanc='^([^ ]*/)?Orthanc( |$)'
LOAD_orthanc="storescu, every transfer syntax as it is"
orthanc_config() {
  cat >"$DIR_orthanc/orthanc.json.new" <<EOF
{
  "Name" : "CLPIPE-TEST",
  "StorageDirectory" : "$DIR_orthanc/db",
  "IndexDirectory" : "$DIR_orthanc/db",
  "Plugins" : [ "$ORTHANC_PLUGIN" ],
  "HttpPort" : $HTTP_PORT,
  "RemoteAccessAllowed" : false,
  "AuthenticationEnabled" : false,
  "HttpTimeout" : 60,
  "DicomServerEnabled" : true,
  "DicomAet" : "ORTHANC",
  "DicomPort" : $ORTHANC_PORT,
  "DicomCheckCalledAet" : false,
  "UnknownSopClassAccepted" : true,
  "DicomAlwaysAllowEcho" : true,
  "DicomAlwaysAllowStore" : true,
  "DicomAlwaysAllowFind" : true,
  "DicomAlwaysAllowGet" : true,
  "DicomAlwaysAllowMove" : true,
  "DicomModalities" : {
    "clpipe" : [ "CLPIPE", "$HOST", $MOVE_PORT ]
  },
  "DicomScuTimeout" : 30,
  "SynchronousCMove" : true,
  "SaveJobs" : false,
  "StorageCompression" : false,
  "OverwriteInstances" : true,
  "DicomWeb" : { "Enable" : true, "Root" : "/dicom-web/", "EnableWado" : true, "WadoRoot" : "/wado", "Ssl" : false }
}
EOF
}
orthanc_ok() {
  curl -sf --max-time 5 -o /dev/null "http://$HOST:$HTTP_PORT/dicom-web/studies" && echo_ok ORTHANC "$ORTHANC_PORT"
}
# the instances of the test data set: the benchmarks' patients (PatientID BENCH*, which
# bench/dicom_sources.py and bench/dicom_dimse.py upload and keep) are not counted
orthanc_count() {
  "$PY" - "http://$HOST:$HTTP_PORT" <<'PYEOF' 2>/dev/null
import json, sys, urllib.request
base = sys.argv[1]
def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(base + path, data=data), timeout=5) as answer:
        return json.load(answer)
total = call("/statistics")["CountInstances"]
bench = call("/tools/find", {"Level": "Patient", "Query": {"PatientID": "BENCH*"}})
print(total - sum(int(call(f"/patients/{p}/statistics")["CountInstances"]) for p in bench))
PYEOF
}
orthanc_wipe() { rm -rf "$DIR_orthanc/db"; }
orthanc_launch() {
  mkdir -p "$DIR_orthanc/db"
  check_port "Orthanc (HTTP)" "$HTTP_PORT" "$PORT_HINT"
  check_port "Orthanc (DICOM)" "$ORTHANC_PORT" "$PORT_HINT"
  daemon "$1" "$DIR_orthanc/orthanc.log" Orthanc "$DIR_orthanc/orthanc.json"
  waitfor 60 orthanc_ok ||
    fail "Orthanc (not answering on HTTP $HTTP_PORT and DICOM $ORTHANC_PORT after 60 s)" "$DIR_orthanc/orthanc.log"
}
orthanc_load() { load_storescu ORTHANC "$ORTHANC_PORT" "$DIR_orthanc/load.log"; }

# ---------------------------------------------------------------- dcmqrscp
DIR_dcmqrscp=$D/dcmqrscp
RE_dcmqrscp='^([^ ]*/)?dcmqrscp( |$)'
LOAD_dcmqrscp="storescu, RLE decompressed"
dcmqrscp_config() {
  cat >"$DIR_dcmqrscp/dcmqrscp.cfg.new" <<EOF
# written by scripts/infra/dicom-up.sh
NetworkTCPPort  = $DCMQRSCP_PORT
MaxPDUSize      = 65536
MaxAssociations = 16

HostTable BEGIN
clpipe = (CLPIPE, $HOST, $MOVE_PORT)
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
DCMQRSCP  $DIR_dcmqrscp/db  RW  (500, 1024mb)  ANY
AETable END
EOF
  # its command line options, one per line: a change restarts it like a change of the above
  # -dhl: no reverse DNS look-up per association
  printf '%s\n' -dhl >"$DIR_dcmqrscp/dcmqrscp.args.new"
}
dcmqrscp_ok() { echo_ok DCMQRSCP "$DCMQRSCP_PORT"; }
dcmqrscp_count() { find "$DIR_dcmqrscp/db" -maxdepth 1 -type f ! -name index.dat 2>/dev/null | wc -l; }
dcmqrscp_wipe() { rm -rf "$DIR_dcmqrscp/db"; }
dcmqrscp_launch() {
  mkdir -p "$DIR_dcmqrscp/db"
  check_port dcmqrscp "$DCMQRSCP_PORT" "$PORT_HINT"
  local args
  mapfile -t args <"$DIR_dcmqrscp/dcmqrscp.args"
  daemon "$1" "$DIR_dcmqrscp/dcmqrscp.log" dcmqrscp "${args[@]}" -c "$DIR_dcmqrscp/dcmqrscp.cfg"
  waitfor 30 dcmqrscp_ok || fail "dcmqrscp (no C-ECHO on $DCMQRSCP_PORT after 30 s)" "$DIR_dcmqrscp/dcmqrscp.log"
}
# dcmqrscp cannot convert between transfer syntaxes that need a codec, and sends each instance
# of a C-GET/C-MOVE on the first context accepted for its SOP class: an RLE file would fail
# (0xA702) whenever a client's first MR context is not RLE, and an uncompressed one whenever
# it is. So it holds the RLE series decompressed, and every series can be retrieved.
dcmqrscp_load() {
  load_storescu DCMQRSCP "$DCMQRSCP_PORT" "$DIR_dcmqrscp/load.log" "$DIR_dcmqrscp/decompressed" || return 1
  rm -rf "$DIR_dcmqrscp/decompressed"
}

# ---------------------------------------------------------------- pynetdicom's qrscp
DIR_qrscp=$D/qrscp
RE_qrscp='run_qrscp\.py'
LOAD_qrscp="storescu, every transfer syntax as it is"
qrscp_config() {
  cat >"$DIR_qrscp/qrscp.ini.new" <<EOF
# written by scripts/infra/dicom-up.sh (pynetdicom's qrscp app)
[DEFAULT]
    ae_title: QRSCP
    port: $QRSCP_PORT
    max_pdu: 65536
    acse_timeout: 30
    dimse_timeout: 30
    network_timeout: 30
    bind_address: $HOST
    instance_location: $DIR_qrscp/instances
    database_location: $DIR_qrscp/instances.sqlite
    log_identifier: False

# C-MOVE destinations
[CLPIPE]
    address: $HOST
    port: $MOVE_PORT
EOF
  # pynetdicom never sets TCP_NODELAY itself: without it every C-STORE sub-operation of a
  # C-GET or C-MOVE waits ~40 ms for a delayed ACK on loopback. This wrapper turns Nagle off
  # on every association socket and SQLite's fsync off, then runs the app unchanged.
  cat >"$DIR_qrscp/run_qrscp.py.new" <<'EOF'
"""pynetdicom's qrscp app, with TCP_NODELAY on every association socket and SQLite without
fsync (written by scripts/infra/dicom-up.sh)."""
import socket
import sys

from pynetdicom import transport
from sqlalchemy import event
from sqlalchemy.engine import Engine

_init = transport.AssociationSocket.__init__


def _nodelay_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.socket is not None:
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


transport.AssociationSocket.__init__ = _nodelay_init


# a test server: its SQLite index need not survive a power cut, and syncing it to disk after
# every stored instance makes loading ~10x slower
@event.listens_for(Engine, "connect")
def _no_fsync(dbapi_connection, _record):
    dbapi_connection.execute("PRAGMA synchronous = OFF")


from pynetdicom.apps.qrscp.qrscp import main  # noqa: E402

main(sys.argv[1:])
EOF
}
qrscp_ok() { echo_ok QRSCP "$QRSCP_PORT"; }
qrscp_count() { find "$DIR_qrscp/instances" -type f 2>/dev/null | wc -l; }
qrscp_wipe() { rm -rf "$DIR_qrscp/instances" "$DIR_qrscp/instances.sqlite"; }
qrscp_launch() {
  check_port qrscp "$QRSCP_PORT" "$PORT_HINT"
  daemon "$1" "$DIR_qrscp/qrscp.log" "$PY" "$DIR_qrscp/run_qrscp.py" -c "$DIR_qrscp/qrscp.ini"
  waitfor 30 qrscp_ok || fail "qrscp (no C-ECHO on $QRSCP_PORT after 30 s)" "$DIR_qrscp/qrscp.log"
}
qrscp_load() { load_storescu QRSCP "$QRSCP_PORT" "$DIR_qrscp/load.log"; }

serve orthanc
serve dcmqrscp
serve qrscp

# ---------------------------------------------------------------- what a client needs
cat >"$D/env.sh.new" <<EOF
export CLPIPE_ORTHANC_HTTP=http://$HOST:$HTTP_PORT
export CLPIPE_ORTHANC_DICOMWEB=http://$HOST:$HTTP_PORT/dicom-web
export CLPIPE_ORTHANC_DIMSE=ORTHANC@$HOST:$ORTHANC_PORT
export CLPIPE_DCMQRSCP_DIMSE=DCMQRSCP@$HOST:$DCMQRSCP_PORT
export CLPIPE_QRSCP_DIMSE=QRSCP@$HOST:$QRSCP_PORT
export CLPIPE_MOVE_PORT=$MOVE_PORT
export CLPIPE_DICOM_DATA=$DATA
export CLPIPE_DICOM_EXPECTED=$EXPECTED
EOF
mv "$D/env.sh.new" "$D/env.sh"
cat "$D/env.sh" >&3
log "done; the same exports are in $D/env.sh"
