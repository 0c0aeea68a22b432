"""Benchmark the DIMSE source: clpipe's engine retrieving by C-GET against dcmtk's `getscu`
and a plain pynetdicom C-GET, on the same studies in the same Orthanc, in one run.

    .venv/bin/python bench/dicom_dimse.py           # 2,209 and 6,625 instances, 5 tries a row; writes bench/results/dicom_dimse.md
    .venv/bin/python bench/dicom_dimse.py --quick   # 277 instances, one try a row; nothing saved

The server is the Orthanc of scripts/infra/dicom-up.sh (its exports, or the env.sh it
writes). The data set is clpipe.testing.dicomdata at ``--scale`` with its own seed and its
patients renamed BENCHDIMSE01..03; it is uploaded through Orthanc's REST API before the
runs and deleted again at the end (only those patients; the tests leave every BENCH*
patient out). Every row is a subprocess into an empty folder, checked afterwards: exactly
the data set's SOP Instance UIDs, and every file's dataset (the bytes after the file meta)
equal to the uploaded one; getscu asks for uncompressed Explicit VR only, so Orthanc
re-encodes some instances for it: those must hold the same elements and pixels.

Rows (each run ``--repeat`` times, the median shown, every try listed):

* getscu, per patient: one dcmtk ``getscu -P`` (PATIENT level, no listing needed) per
  patient, one after the other, from ``sh`` with TCP_NODELAY=1; "3 at once": in parallel.
  getscu, per series, xargs -P N: one Study Root ``getscu -S`` per series, N at a time.
* pynetdicom C-GET, per patient: ``bench/dicom_dimse.py --pynetdicom`` in a fresh
  interpreter: one pynetdicom association and Patient Root C-GET per patient (the storage
  contexts clpipe offers, SCP role selection, unlimited PDUs, TCP_NODELAY, event logging
  off), each instance written from ``event.encoded_dataset()`` (never decoded); "3 at
  once": the three patients in threads. The field library's speed on the same data: the
  measured reason clpipe speaks DIMSE itself (an informational goal row).
* native C-GET, 4 jobs: ``bench/dicom_dimse_native.py`` in a fresh interpreter: a
  DimseSource and the Engine as ``clpipe dicom`` runs them (C-FIND listing of the BENCHDIMSE
  patients, then one C-GET per series on pooled associations) into an empty dropoff; then
  the no-op re-sync into the same dropoff (nothing may be retrieved). 4 jobs are asked (the
  default); the PACS is on this machine, so the engine reads all the associations from
  one thread (DimseSource.one_thread): the associations column shows how many it used.
* native C-GET, 4 jobs, a thread per series: the same with one thread per association, as
  from a PACS elsewhere (one_thread off): what the one thread saves. With a thread each,
  a PACS on this machine gets one series per CPU at a time (DimseSource.max_jobs).
* native C-GET, 4 jobs, a thread per series, no CPU cap: 4 threads all the same (as
  before the cap); 1 job; 4 jobs with a new association per series (no pool); C-MOVE with 4 jobs (to our
  storage SCP on $CLPIPE_MOVE_PORT, where Orthanc knows AE CLPIPE).

Columns: seconds = wall time of the subprocess (interpreter start and imports included);
in-process s = the native run's listing and retrieval alone; CPU s = user + system time of
the process tree (not Orthanc's); Orthanc CPU s = the server's own during the row; cores
busy = both CPU times over the wall time (the machine has 2); peak RSS = summed over the
process tree, 50 ms samples; MB = 10^6 bytes. Goal (issue 15): native C-GET with 4 jobs
at least as fast as the fastest getscu row of the same run (per patient, one after the
other or 3 at once; per series from xargs -P 2, 4 or 8): its seconds / native seconds >= 1; and, informational, the same ratio
against the faster pynetdicom row. Every row writes into a folder of its own, none deleted
before the whole run ends (see run_section: deleting files slows the next ones' creation),
and each row starts after a ``sync`` (untimed): none shares the disk with the writeback of
the upload or of the rows before it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib import MB, machine, orthanc_data_lock, run_measured
from dicom_dimse_native import PREFIX

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "dicom_dimse.md"
CACHE = BENCH / ".cache"
PATIENTS = {"SUB01": "BENCHDIMSE01", "SUB02": "BENCHDIMSE02", "SUB 03/x": "BENCHDIMSE03"}
SEED = "bench-dimse"  # other UIDs than the test data set (and the DICOMweb benchmark's)
SIZES = {"full": dict(scale=16, size=64), "quick": dict(scale=2, size=32)}  # --scale 16: 2,209 instances
JOBS = 4
NO_CAP = "native C-GET, 4 jobs, a thread per series, no CPU cap"  # 4 threads although the PACS is on this machine
THREADS = "native C-GET, 4 jobs, a thread per series"  # as from a PACS elsewhere (DimseSource.one_thread off)
GETSCU_PARALLEL = (2, 4, 8)  # getscu processes side by side, one per series (xargs -P)
HTTP_TIMEOUT = 60.0
START = 'eval "$(scripts/infra/dicom-up.sh)"'


# ----------------------------------------------------------------------------- the data set


@dataclass
class DataSet:
    folder: Path
    files: dict[str, tuple[str, str]]  # SOPInstanceUID -> (path under folder, sha256 of the dataset after the file meta)
    patients: list[str]
    series: int
    nbytes: int


def dataset_part(data: bytes) -> bytes:
    """A Part-10 file's bytes after its file meta group: what a retrieval must keep."""
    if data[128:132] != b"DICM":
        return data
    group_length = struct.unpack("<I", data[140:144])[0]  # (0002,0000) UL, right after DICM
    return data[144 + group_length :]


def bench_dataset(scale: int, size: int) -> DataSet:
    """Made once and cached under bench/.cache/ by its parameters, the generator's source and
    pydicom's version."""
    import pydicom

    from clpipe.testing import dicomdata

    key = hashlib.sha1(
        json.dumps([scale, size, SEED, sorted(PATIENTS.items()), pydicom.__version__]).encode() + Path(dicomdata.__file__).read_bytes()
    ).hexdigest()[:16]
    folder = CACHE / f"dimse-{key}"
    index = folder / "index.json"
    if not index.exists():
        shutil.rmtree(folder, ignore_errors=True)
        desc = dicomdata.make_dataset(folder / "data", scale=scale, rows=size, cols=size, seed=SEED)
        files, nbytes = {}, 0
        for rec in desc["instances"]:
            path = folder / "data" / rec["path"]
            ds = pydicom.dcmread(path)
            ds.PatientID = PATIENTS[ds.PatientID]
            ds.save_as(path)
            data = path.read_bytes()
            nbytes += len(data)
            files[rec["SOPInstanceUID"]] = ("data/" + rec["path"], hashlib.sha256(dataset_part(data)).hexdigest())
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"files": files, "series": desc["counts"]["series"], "bytes": nbytes}))
        tmp.replace(index)
    stored = json.loads(index.read_text())
    return DataSet(
        folder, {uid: tuple(v) for uid, v in stored["files"].items()}, sorted(PATIENTS.values()), stored["series"], stored["bytes"]
    )


class Orthanc:
    """Orthanc's REST API: load and remove the benchmark's patients (only ours: BENCHDIMSE*)."""

    def __init__(self, base: str):
        import httpx

        self.http = httpx.Client(base_url=base.rstrip("/"), timeout=HTTP_TIMEOUT, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def ours(self) -> list[str]:
        body = {"Level": "Patient", "Query": {"PatientID": PREFIX + "*"}}
        return self.http.post("/tools/find", json=body).raise_for_status().json()

    def remove(self) -> int:
        patients = self.ours()
        for ident in patients:
            self.http.delete(f"/patients/{ident}").raise_for_status()
        return len(patients)

    def upload(self, data: DataSet) -> None:
        def send(rel: str) -> None:
            body = (data.folder / rel).read_bytes()
            for attempt in range(3):  # Orthanc answers 500 now and then while other clients write to it
                answer = self.http.post("/instances", content=body, headers={"Content-Type": "application/dicom"})
                if answer.status_code < 500 or attempt == 2:
                    answer.raise_for_status()
                    return
                time.sleep(1.0)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, [rel for rel, _ in data.files.values()]))
        stats = [self.http.get(f"/patients/{p}/statistics").raise_for_status().json() for p in self.ours()]
        held = sum(int(s["CountInstances"]) for s in stats)
        if held != len(data.files):
            raise SystemExit(f"Orthanc holds {held} of the benchmark's {len(data.files)} instances after the upload")

    def version(self) -> str:
        return self.http.get("/system").raise_for_status().json().get("Version", "?")


def servers() -> dict[str, str]:
    names = ("CLPIPE_ORTHANC_HTTP", "CLPIPE_ORTHANC_DIMSE", "CLPIPE_MOVE_PORT")
    env = {k: os.environ[k] for k in names if os.environ.get(k)}
    env_file = Path(os.environ.get("CLPIPE_INFRA", "/tmp/clpipe-infra")) / "dicom" / "env.sh"
    if len(env) < len(names) and env_file.is_file():
        found = dict(re.findall(r"^export (\w+)=(.*)$", env_file.read_text(), re.M))
        env = {k: found[k] for k in names if k in found}
    if len(env) < len(names):
        raise SystemExit(f"the DICOM test servers are not set up: run `{START}` (as root)")
    return env


# ----------------------------------------------------------------------------- the peers


def this_module() -> list[str]:
    """A fresh interpreter running this file's main() as an imported module (its bytecode
    cached like clpipe's: a script run by name is compiled at every start, ~8 ms here)."""
    return [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import dicom_dimse; sys.exit(dicom_dimse.main(sys.argv[1:]))",
    ]


def native_command(
    address: str,
    dest: Path,
    jobs: int = JOBS,
    retrieve: str = "get",
    reuse: bool = True,
    move_port: int = 0,
    cap: bool = True,
    one_thread: bool = True,
) -> list[str]:
    """A fresh interpreter running one native sync (bench/dicom_dimse_native.py: only the
    engine's imports, none of this benchmark's), its bytecode cached as clpipe's."""
    return [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import dicom_dimse_native; sys.exit(dicom_dimse_native.main(sys.argv[1:]))",
        address,
        str(dest),
        str(jobs),
        retrieve,
        "1" if reuse else "0",
        str(move_port),
        "1" if cap else "0",
        "1" if one_thread else "0",
    ]


def getscu_command(host: str, port: int, aet: str, patient: str, dest: Path) -> list[str]:
    """dcmtk's getscu: one Patient Root C-GET of a whole patient into a folder."""
    return [
        "getscu",
        "-aet",
        "CLPIPE",
        "-aec",
        aet,
        "-P",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        f"PatientID={patient}",
        "-to",
        "30",
        "-ta",
        "30",
        "-td",
        "60",
        "-od",
        str(dest),
        host,
        str(port),
    ]


def getscu_shell(host: str, port: int, aet: str, patients: list[str], dest: Path, parallel: bool) -> list[str]:
    """The getscu peer: one getscu per patient, one after the other or all at once, from a
    shell (no interpreter start in its time); TCP_NODELAY=1 as dcmtk reads it (else ~45 ms
    per instance); a failed getscu fails the row."""
    calls = [shlex.join(getscu_command(host, port, aet, p, dest)) for p in patients]
    if parallel:
        script = " ".join(f"{c} & p{i}=$!;" for i, c in enumerate(calls))
        script += " rc=0; " + " ".join(f"wait $p{i} || rc=1;" for i in range(len(calls))) + " exit $rc"
    else:
        script = " && ".join(calls)
    return ["sh", "-c", f"mkdir -p {shlex.quote(str(dest))} || exit 1; export TCP_NODELAY=1; {script}"]


def series_list(data: DataSet) -> list[tuple[str, str]]:
    """(StudyInstanceUID, SeriesInstanceUID) of every series of the data set, read once
    from its files and cached beside them (what a user of getscu gets from a findscu)."""
    cached = data.folder / "series.json"
    if not cached.exists():
        import pydicom

        found = set()
        for rel, _ in data.files.values():
            ds = pydicom.dcmread(data.folder / rel, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            found.add((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(found)))
        tmp.replace(cached)
    return [tuple(pair) for pair in json.loads(cached.read_text())]


def getscu_series_shell(host: str, port: int, aet: str, series: list[tuple[str, str]], dest: Path, parallel: int) -> list[str]:
    """The getscu peer as a user runs it for speed: one Study Root getscu per series
    (QueryRetrieveLevel=SERIES), ``parallel`` at a time from ``xargs -P``; the series'
    UIDs given (a user gets them from one findscu first: not timed here, in getscu's
    favour); a failed getscu fails the row (xargs exits non-zero)."""
    call = shlex.join(getscu_command(host, port, aet, "", dest)).replace(
        "-P -k QueryRetrieveLevel=PATIENT -k PatientID=",
        '-S -k QueryRetrieveLevel=SERIES -k StudyInstanceUID="$0" -k SeriesInstanceUID="$1"',
    )
    pairs = " ".join(f"{study} {uid}" for study, uid in series)  # UIDs: digits and dots only
    return [
        "sh",
        "-c",
        f"mkdir -p {shlex.quote(str(dest))} || exit 1; export TCP_NODELAY=1; "
        f"printf '%s %s\\n' {pairs} | xargs -P {parallel} -n 2 sh -c {shlex.quote('exec ' + call)}",
    ]


def pynetdicom_main(address: str, dest: Path, patients: list[str], parallel: bool) -> int:
    """The pynetdicom peer (a subprocess of the benchmark), in its fastest documented setup:
    one Patient Root C-GET per patient on an association of its own (one after the other, or
    all at once in threads), the same storage contexts as clpipe (one per SOP class and
    transfer syntax, so Orthanc sends each instance as stored) with SCP role selection,
    unlimited PDUs, Nagle off, pynetdicom's event logging off, and every instance written
    as it arrived (``event.encoded_dataset()``: never decoded). A JSON summary last."""
    import socket

    from pydicom.dataset import Dataset
    from pynetdicom import AE, _config, build_role, evt
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet as GET_MODEL

    from clpipe.sources.dimse import COMPRESSED, EXPLICIT_LE, IMAGE_STORAGE, IMPLICIT_LE, OTHER_STORAGE

    _config.LOG_HANDLER_LEVEL = "none"  # no logging handlers on the DIMSE messages
    started = time.perf_counter()
    aet, _, hostport = address.partition("@")
    host, port = hostport.rsplit(":", 1)
    ae = AE(ae_title="CLPIPE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(GET_MODEL)
    storage = [(c, (EXPLICIT_LE, IMPLICIT_LE, *COMPRESSED)) for c in IMAGE_STORAGE]
    storage += [(c, (EXPLICIT_LE, IMPLICIT_LE)) for c in OTHER_STORAGE]
    for sop_class, syntaxes in storage:
        for syntax in syntaxes:
            ae.add_requested_context(sop_class, syntax)
    roles = [build_role(sop_class, scp_role=True) for sop_class, _ in storage]
    dest.mkdir(parents=True, exist_ok=True)

    def store(event) -> int:
        (dest / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    def nodelay(event) -> None:  # pynetdicom has no socket option of its own: set on the connected socket
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(patient: str) -> str:
        assoc = ae.associate(
            host, int(port), ae_title=aet, max_pdu=0, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, store), (evt.EVT_CONN_OPEN, nodelay)]
        )
        if not assoc.is_established:
            return f"{patient}: association not established"
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientID = "PATIENT", patient
        final = None
        try:
            for status, _ in assoc.send_c_get(query, GET_MODEL):
                final = status
        finally:
            assoc.release()
        if not final or final.Status != 0 or final.get("NumberOfFailedSuboperations", 0):
            return f"{patient}: C-GET ended with {final.Status if final else 'no response'}"
        return ""

    with ThreadPoolExecutor(len(patients) if parallel else 1) as pool:
        errors = [e for e in pool.map(get, patients) if e]
    print(json.dumps({"errors": errors[:3], "associations": len(patients), "seconds": round(time.perf_counter() - started, 3)}))
    return 1 if errors else 0


def pynetdicom_command(address: str, patients: list[str], dest: Path, parallel: bool) -> list[str]:
    return [*this_module(), "--pynetdicom", address, str(dest), ",".join(patients), "1" if parallel else "0"]


# ----------------------------------------------------------------------------- measuring


@dataclass
class Run(benchlib.Run):
    associations: str = "-"
    server_cpu: float | None = None  # Orthanc's user + system seconds during the run (None: not found)
    engine_seconds: float | None = None  # native: listing + retrieval, without interpreter start and imports
    tries: list | None = None  # the wall times of every try (the row shows the median)

    @property
    def ok(self) -> bool:
        return self.status.startswith("ok")


def median(runs: list[Run]) -> Run:
    """The run of median wall time; a failed or invalid try is shown instead, whatever its time."""
    bad = [r for r in runs if not r.ok]
    if bad:
        return bad[0]
    ordered = sorted(runs, key=lambda r: r.seconds)
    chosen = ordered[len(ordered) // 2]
    chosen.tries = [r.seconds for r in runs]
    return chosen


def row_environment(work: Path) -> dict[str, str]:
    """The environment of every row: Python's bytecode cached (in ``work``, never in the
    source tree) and compiled before the first row, as an installed clpipe runs; without
    it, a tree whose environment sets PYTHONDONTWRITEBYTECODE (as this one's does) makes
    every native run compile the clpipe modules changed since their .pyc was written
    (~35 ms a run)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONWARNINGS="ignore", PYTHONPYCACHEPREFIX=str(work / "pycache"))
    warm = (
        "import dicom_dimse, dicom_dimse_native, pynetdicom, "
        "clpipe.sources.dicom, clpipe.sources.dimse, clpipe.sync.engine, clpipe.sync.manifest"
    )
    subprocess.run([sys.executable, "-c", warm], env=dict(env, PYTHONPATH=str(BENCH)), cwd=ROOT, check=True, timeout=120)
    return env


ROW_ENV: dict[str, str] = {}  # set by run_benchmark (row_environment)


def orthanc_pid() -> int | None:
    """The pid of the Orthanc of scripts/infra/dicom-up.sh (its pid file), or None."""
    pidfile = Path(os.environ.get("CLPIPE_INFRA", "/tmp/clpipe-infra")) / "dicom" / "pids" / "orthanc.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
        if Path(f"/proc/{pid}/comm").read_text().strip() == "Orthanc":
            return pid
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_cpu(pid: int | None) -> float | None:
    """User + system seconds a process has used so far (/proc/<pid>/stat), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14 and 15)


def measure(run: Run, cmd: list[str], log: Path, timeout: float, server: int | None = None) -> str:
    """Run ``cmd`` (benchlib.run_measured); its output. A non-zero exit or the timeout fails
    the run. ``server``: the pid of the server whose CPU time during the run is recorded."""
    before = process_cpu(server)
    m = run_measured(cmd, ROW_ENV or dict(os.environ, PYTHONWARNINGS="ignore"), log, timeout)
    after = process_cpu(server)
    run.server_cpu = after - before if before is not None and after is not None else None
    run.seconds, run.cpu, run.rss_mb = m.seconds, m.cpu, m.rss_mb
    run.status = m.failure(timeout) or run.status
    return m.output


def same_elements(path: Path, original: Path) -> bool:
    """The same data elements (pixel data compared decoded when one side is RLE)."""
    import pydicom
    from pydicom.pixels import get_decoder

    got, want = pydicom.dcmread(path), pydicom.dcmread(original)
    if {e.tag for e in got} != {e.tag for e in want}:
        return False
    for elem in want:
        if elem.keyword != "PixelData" and got[elem.tag].value != elem.value:
            return False
    pixels = {}
    for name, ds in (("got", got), ("want", want)):
        syntax = ds.file_meta.TransferSyntaxUID
        pixels[name] = bytes(get_decoder(syntax).as_buffer(ds)[0]) if syntax.is_compressed else ds.PixelData
    return pixels["got"] == pixels["want"]


def check(dest: Path, data: DataSet, name_to_uid, exact: bool = True) -> str:
    """Exactly the data set's instances, each dataset byte for byte as uploaded; not
    ``exact``: a dataset the server re-encoded (getscu asks for uncompressed Explicit VR
    only) must hold the same elements and pixels."""
    found: dict[str, Path] = {}
    for path in dest.rglob("*"):
        if path.is_file() and ".clpipe-sync" not in path.parts:
            uid = name_to_uid(path.name)
            if uid in found:
                return f"INVALID: {uid} twice"
            found[uid] = path
    missing, extra = set(data.files) - set(found), set(found) - set(data.files)
    if missing or extra:
        return f"INVALID: {len(missing)} missing, {len(extra)} extra"
    differ = [uid for uid, path in found.items() if hashlib.sha256(dataset_part(path.read_bytes())).hexdigest() != data.files[uid][1]]
    if differ and not exact:
        wrong = [uid for uid in differ if not same_elements(found[uid], data.folder / data.files[uid][0])]
        if not wrong:
            return f"ok ({len(differ)} re-encoded: Orthanc sends getscu Explicit VR, RLE decompressed)"
        differ = wrong
    return f"INVALID: {len(differ)} datasets differ (e.g. {differ[0]})" if differ else "ok"


def native_uid(name: str) -> str:
    return name.removesuffix(".dcm")


def getscu_uid(name: str) -> str:
    return name.split(".", 1)[1] if "." in name else name  # getscu writes <modality>.<SOPInstanceUID>


# ----------------------------------------------------------------------------- report


def versions() -> str:
    import pydicom
    import pynetdicom

    proc = subprocess.run(["getscu", "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"getscu v(\d+\.\d+\.\d+)", proc.stdout + proc.stderr)
    return f"pydicom {pydicom.__version__}, pynetdicom {pynetdicom.__version__}, dcmtk {found[1] if found else '?'}"


def table(runs: list[Run], header: list[str]) -> str:
    out = header + [
        "",
        "| run | seconds (median) | tries | in-process s | files/s | MB/s | peak RSS (MB) | CPU s | Orthanc CPU s | cores busy "
        "| associations | result |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        if r.seconds is None:
            out.append(f"| {r.name} | | | | | | | | | | | {r.status} |")
            continue
        fps = f"{r.files / r.seconds:,.0f}"
        mbs = f"{r.nbytes / MB / r.seconds:.1f}" if not r.noop else "-"
        tries = ", ".join(f"{t:.2f}" for t in r.tries) if r.tries else "-"
        inside = f"{r.engine_seconds:.2f}" if r.engine_seconds is not None else "-"
        server = f"{r.server_cpu:.2f}" if r.server_cpu is not None else "-"
        busy = f"{(r.cpu + r.server_cpu) / r.seconds:.2f}" if r.server_cpu is not None and r.cpu is not None and r.seconds else "-"
        out.append(
            f"| {r.name} | {r.seconds:.2f} | {tries} | {inside} | {fps} | {mbs} | {r.rss_mb:.0f} | {r.cpu:.2f} | {server} | {busy} | "
            f"{r.associations} | {r.status} |"
        )
    by = {r.name: r for r in runs}
    native = by.get("native C-GET, 4 jobs")
    out += ["", "| goal | value | target | verdict |", "| --- | ---: | --- | --- |"]
    getscu = [r for r in runs if r.name.startswith("getscu")]
    out.append(goal(native, getscu, "the fastest getscu configuration (its fastest row)", ""))
    pynetdicom = [by.get("pynetdicom C-GET, per patient"), by.get("pynetdicom C-GET, per patient, 3 at once")]
    out.append(
        goal(native, pynetdicom, "pynetdicom C-GET (its faster row)", " (informational: the measured reason clpipe speaks DIMSE itself)")
    )
    out.append(
        goal(
            by.get(NO_CAP),
            getscu,
            "the fastest getscu configuration (its fastest row)",
            " (informational: 4 associations in 4 threads although the PACS shares this machine's CPUs, as before the cap)",
            native_label="native C-GET (4 jobs, a thread per series, no CPU cap)",
        )
    )
    return "\n".join(out) + "\n"


def goal(native: Run | None, peers: list[Run | None], label: str, note: str, native_label: str = "native C-GET (4 jobs)") -> str:
    """The goal row: the fastest of ``peers`` (all must be ok) seconds / native seconds >= 1."""
    if not (native and native.ok and peers and all(p and p.ok for p in peers)):
        return f"| {native_label} vs {label} | - | >= 1.0x | n/a: a row is missing or not ok{note} |"
    peer = min(peers, key=lambda p: p.seconds)
    ratio = peer.seconds / native.seconds
    name = f"`{peer.name}`"
    spread = ""
    if native.tries and peer.tries and min(native.tries) <= max(peer.tries) and min(peer.tries) <= max(native.tries):
        # the medians decide the verdict; say when single tries would have decided either way
        spread = (
            f" (the tries overlap: native {min(native.tries):.2f}-{max(native.tries):.2f} s, "
            f"the peer {min(peer.tries):.2f}-{max(peer.tries):.2f} s)"
        )
    return (
        f"| {native_label} vs {label}: {name} seconds / native seconds (CPU s: "
        f"{peer.cpu:.1f} vs {native.cpu:.1f}) | {ratio:.3f}x | >= 1.0x | "
        f"{'met' if ratio >= 1.0 else 'NOT met'}{spread}{note} |"
    )


# ----------------------------------------------------------------------------- main


def run_section(args, env: dict, orthanc: Orthanc, work: Path, scale: int, size: int) -> tuple[str, list[Run]]:
    """Load one data set into Orthanc, run every row ``args.repeat`` times, remove it; the
    section's Markdown and its rows."""
    aet, _, hostport = env["CLPIPE_ORTHANC_DIMSE"].partition("@")
    host, port = hostport.rsplit(":", 1)
    address = env["CLPIPE_ORTHANC_DIMSE"]
    t0 = time.perf_counter()
    data = bench_dataset(scale, size)
    print(
        f"data set --scale {scale}: {len(data.files):,} instances, {data.nbytes / MB:.1f} MB ({time.perf_counter() - t0:.1f} s)", flush=True
    )
    if orthanc.remove():
        print("removed the benchmark's patients left in Orthanc by an earlier run")
    t0 = time.perf_counter()
    orthanc.upload(data)
    print(f"uploaded to Orthanc in {time.perf_counter() - t0:.1f} s", flush=True)
    series = series_list(data)
    server = orthanc_pid()
    tries: dict[str, list[Run]] = {}
    load_before = os.getloadavg()

    def row(
        name: str,
        cmd: list[str],
        dest: Path,
        name_to_uid,
        noop: bool = False,
        exact: bool = True,
        associations: str = "-",
    ) -> None:
        run = Run(name, len(data.files), data.nbytes, noop=noop, associations=associations)
        print(f"  {name} ...", end=" ", flush=True)
        os.sync()  # the rows before (and the upload) written out: no row shares the disk with their writeback
        text = measure(run, cmd, work / (re.sub(r"\W+", "-", f"{scale} {name}") + ".log"), args.timeout, server)
        if run.ok:
            run.status = check(dest, data, name_to_uid, exact)
            summary = [ln for ln in text.splitlines() if ln.startswith("{")]
            if summary:
                info = json.loads(summary[-1])
                run.associations, run.engine_seconds = str(info.get("associations", "-")), info.get("seconds")
                if noop and info.get("created"):
                    run.status = f"INVALID: the no-op re-sync retrieved {info['created']} instances"
        print(f"{run.seconds:.2f} s, {run.status}", flush=True)
        tries.setdefault(name, []).append(run)

    # Every row writes into a folder of its own, and none is deleted before the whole run
    # ends (not between the sections either: creating files after 143,000 were deleted was
    # 7x slower for minutes on this ext4, measured 31 us a file before, 170-310 us for the
    # 200 s after; a 65 s wait, before 2026-12-07 05:40, left the next section's first
    # rounds slow for every row): on a file system that avoids reusing recently freed inodes (ext4 without a
    # journal skips each inode freed in the last minute, five more while its inode table
    # block is not written back, looking every one up for every new file), creating files
    # after thousands were deleted costs several times the system time (measured here:
    # 0.4 ms instead of 0.08 ms a file), so deleting one row's files would slow the next
    # row, whichever it is.
    for attempt in range(args.repeat):
        print(f"round {attempt + 1} of {args.repeat}")
        rounds = work / f"round-{scale}-{attempt + 1}"
        for parallel in (False, True):
            dest = rounds / f"getscu-{int(parallel)}"
            name = "getscu, per patient" + (", 3 at once" if parallel else "")
            row(
                name,
                getscu_shell(host, int(port), aet, data.patients, dest, parallel),
                dest,
                getscu_uid,
                exact=False,
                associations=str(len(data.patients)),
            )
        for parallel in GETSCU_PARALLEL:
            dest = rounds / f"getscu-series-{parallel}"
            row(
                f"getscu, per series, xargs -P {parallel}",
                getscu_series_shell(host, int(port), aet, series, dest, parallel),
                dest,
                getscu_uid,
                exact=False,
                associations=str(len(series)),
            )
        for parallel in (False, True):
            dest = rounds / f"pynetdicom-{int(parallel)}"
            name = "pynetdicom C-GET, per patient" + (", 3 at once" if parallel else "")
            row(name, pynetdicom_command(address, data.patients, dest, parallel), dest, native_uid)
        dest = rounds / "native"
        row("native C-GET, 4 jobs", native_command(address, dest), dest, native_uid)
        row("native C-GET, 4 jobs, no-op re-sync", native_command(address, dest), dest, native_uid, noop=True)
        dest = rounds / "native-threads"
        row(THREADS, native_command(address, dest, one_thread=False), dest, native_uid)
        dest = rounds / "native-nocap"
        row(NO_CAP, native_command(address, dest, cap=False, one_thread=False), dest, native_uid)
        dest = rounds / "native-1"
        row("native C-GET, 1 job", native_command(address, dest, jobs=1), dest, native_uid)
        dest = rounds / "native-noreuse"
        row("native C-GET, 4 jobs, new association per series", native_command(address, dest, reuse=False), dest, native_uid)
        dest = rounds / "native-move"
        row("native C-MOVE, 4 jobs", native_command(address, dest, retrieve="move", move_port=args.move_port), dest, native_uid)
    if not args.keep:
        orthanc.remove()  # (the rows' folders stay until the whole run ends: see above)
    load_after = os.getloadavg()
    runs = [median(group) for group in tries.values()]
    header = [
        f"## --scale {scale}: {len(data.files):,} instances",
        "",
        f"- data: clpipe.testing.dicomdata --scale {scale} ({size}x{size} pixels, seed {SEED!r}), patients "
        f"{', '.join(data.patients)}: {len(data.files):,} instances in {data.series} series, {data.nbytes / MB:.1f} MB; "
        "Explicit and Implicit VR, one RLE series, one 8-frame Enhanced MR",
        f"- load average (1, 5, 15 min) before the first row: {', '.join(f'{x:.2f}' for x in load_before)}; after the last: "
        f"{', '.join(f'{x:.2f}' for x in load_after)} (the machine is shared: other work runs beside the benchmark)",
    ]
    return table(runs, header), runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data set, results not saved")
    ap.add_argument("--scale", default="", help="data set sizes, comma-separated (dicomdata --scale; default 16,48; --quick 2)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    ap.add_argument("--workdir", type=Path, help="where the runs write (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder and the data in Orthanc")
    ap.add_argument("--repeat", type=int, help="tries per row, the median is shown (default 5, --quick 1)")
    ap.add_argument("--output", type=Path, default=RESULTS, help=f"where the tables are saved (default {RESULTS})")
    ap.add_argument(
        "--move-port", type=int, help="port of the C-MOVE row's storage SCP (default $CLPIPE_MOVE_PORT: Orthanc knows AE CLPIPE there)"
    )
    ap.add_argument("--pynetdicom", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pynetdicom:
        address, dest, patients, parallel = args.pynetdicom
        return pynetdicom_main(address, Path(dest), patients.split(","), parallel == "1")
    with orthanc_data_lock():  # its BENCHDIMSE* patients are uploaded and deleted
        return run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> int:
    if not shutil.which("getscu"):
        raise SystemExit("getscu not found: install dcmtk (scripts/infra/dicom-up.sh does)")
    env = servers()
    args.repeat = args.repeat or (1 if args.quick else 5)
    args.move_port = args.move_port or int(env["CLPIPE_MOVE_PORT"])
    size = SIZES["quick" if args.quick else "full"]["size"]
    scales = [int(x) for x in args.scale.split(",") if x.strip()] or ([SIZES["quick"]["scale"]] if args.quick else [16, 48])
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="clpipe-bench-dimse-", dir=args.workdir))
    ROW_ENV.update(row_environment(work))
    orthanc = Orthanc(env["CLPIPE_ORTHANC_HTTP"])
    sections, runs = [], []
    try:
        for scale in scales:
            text, section_runs = run_section(args, env, orthanc, work, scale, size)
            sections.append(text)
            runs += section_runs
        header = [
            f"# dicom_dimse benchmark{' (--quick)' if args.quick else ''}",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}",
            f"- server: Orthanc {orthanc.version()} of scripts/infra/dicom-up.sh on 127.0.0.1 (TCP_NODELAY=1), {versions()}",
            f"- rows write under {work.parent} (--workdir); Python rows run with their bytecode compiled before the first "
            "row (PYTHONPYCACHEPREFIX in the work folder), as an installed clpipe runs",
            "- native = `bench/dicom_dimse_native.py` (a fresh interpreter importing only what the run needs: "
            "DimseSource + Engine as `clpipe dicom` "
            "runs them: C-FIND listing, then C-GET (or C-MOVE) per series, into an empty dropoff; clpipe's own "
            "DICOM network code); getscu = one dcmtk `getscu -P` (Patient Root, PATIENT level) per patient, "
            "or one `getscu -S` (Study Root, SERIES level) per series from `xargs -P N` (the series' UIDs given), "
            "TCP_NODELAY=1, from sh; pynetdicom = `bench/dicom_dimse.py --pynetdicom` (a fresh interpreter: one "
            "pynetdicom association and Patient Root C-GET per patient, clpipe's storage contexts with SCP role "
            "selection, max PDU unlimited, TCP_NODELAY, LOG_HANDLER_LEVEL none, files from "
            "`event.encoded_dataset()`)",
            f"- tries per row: {args.repeat}, the median shown; in-process s = the native (or pynetdicom) run "
            "without interpreter start and imports (native: ~0.08 s; pynetdicom's import, with pydicom's and numpy's: ~0.3 s)",
            "- every row writes into a folder of its own, none deleted before the whole run ends: on this ext4 (no journal) "
            "creating files after many were deleted is several times slower for minutes (measured: 31 us a file before "
            "143,000 files were deleted, 170-310 us for the 200 s after), which made the first rounds after a section's "
            "deletion slow for every row; before each row, `sync` (untimed) writes out what the upload "
            "and the rows before left dirty, so that no row shares the disk with another's writeback",
            "- every row checked: exactly the data set's SOP Instance UIDs, each dataset (after the file meta) "
            "byte for byte as uploaded (getscu: same elements and pixels where Orthanc re-encoded for it); "
            "seconds = wall time of the subprocess; CPU s = user + system of its process tree (not Orthanc's); "
            "Orthanc CPU s = the server's user + system time during the row (/proc/<pid>/stat of the Orthanc of "
            "dicom-up.sh); cores busy = (CPU s + Orthanc CPU s) / seconds: near 2 on this 2-core machine, the row "
            "was bound by CPU, client and server together; "
            "peak RSS summed over the process tree (50 ms samples); MB = 10^6 bytes",
            "",
        ]
        text = "\n".join(header) + "\n" + "\n".join(sections)
        print("\n" + text)
        if not args.quick:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
            print(f"saved to {args.output}")
        return 0 if all(r.ok for r in runs) else 1
    finally:
        if not args.keep:
            try:
                orthanc.remove()
            except Exception as exc:  # noqa: BLE001 - say it, do not hide the run's own error
                print(f"could not remove the benchmark's patients from Orthanc: {exc}")
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} and the benchmark's patients in Orthanc")
        orthanc.close()


if __name__ == "__main__":
    sys.exit(main())
