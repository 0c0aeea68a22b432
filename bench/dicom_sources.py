"""Benchmark clpipe's DICOM sources, each against a plain peer on the same data in the same server.

    .venv/bin/python bench/dicom_sources.py                  # every section, writes bench/results/dicom_sources.md
    .venv/bin/python bench/dicom_sources.py --only dicomweb   # one section (its part of the results file only)
    .venv/bin/python bench/dicom_sources.py --quick           # small data sets, every code path, nothing saved

The servers are the real ones of scripts/infra/dicom-up.sh (its exports, or the env.sh it
writes). A section is one function registered in SECTIONS; it returns its rows (one per
peer run, each run a subprocess measured the same way) and its goals; the shared printer
makes one Markdown table per section. bench/README.md explains the rows and the goals.

Data a section adds to a shared server belongs to patients whose PatientID starts with
``BENCH`` (the tests leave those out) and is removed again at the end (``--keep-data``
keeps it for the next run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from benchlib import MB, Run, last_line, machine, orthanc_data_lock, run_measured

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "dicom_sources.md"
CACHE = BENCH / ".cache"
STATE_DIR = ".clpipe-sync"  # the native engine's bookkeeping in the dropoff: not a synced file
JOBS = 4  # parallel series retrievals of the native engine
HTTP_TIMEOUT = 60.0
BENCH_PREFIX = "BENCH"  # PatientIDs of benchmark data in shared servers: tests leave them out
#: this benchmark's own patients (BENCH01..03), matched exactly: dicom_dimse.py's BENCHDIMSE*
#: patients (left in Orthanc by its --keep) are neither taken for this data set nor deleted
OWN_PATIENTS = BENCH_PREFIX + "0*"
START = 'eval "$(scripts/infra/dicom-up.sh)"'
PLANNED = ("dicomweb",)  # the sections, in the order they run (file://: bench/dicom_folder.py)


# ============================================================================ shared framework


@dataclass
class Section:
    key: str
    title: str
    lines: list[str] = field(default_factory=list)  # what was measured, on what
    runs: list[Run] = field(default_factory=list)
    goals: list[tuple[str, str, str, str]] = field(default_factory=list)  # (goal, value, target, verdict)


@dataclass
class Bench:
    """What every section gets: options, the work folder, the servers' exports."""

    quick: bool
    timeout: float
    work: Path
    keep_data: bool
    infra: dict[str, str]
    env: dict[str, str]


SECTIONS: dict[str, Callable[[Bench], Section]] = {}
WORKERS: dict[str, Callable[[list[str]], int]] = {}  # peers run as `dicom_sources.py --worker NAME ARGS...`


def section(key: str):
    def register(func: Callable[[Bench], Section]) -> Callable[[Bench], Section]:
        SECTIONS[key] = func
        return func

    return register


def worker(name: str):
    def register(func: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        WORKERS[name] = func
        return func

    return register


def worker_command(name: str, *args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, *map(str, args)]


def infra_exports() -> dict[str, str]:
    """dicom-up.sh's exports: the environment first, else the env.sh it writes."""
    found = {k: v for k, v in os.environ.items() if k.startswith("CLPIPE_")}
    env_file = Path(os.environ.get("CLPIPE_INFRA", "/tmp/clpipe-infra")) / "dicom" / "env.sh"
    if "CLPIPE_ORTHANC_HTTP" not in found and env_file.is_file():
        found.update(re.findall(r"^export (\w+)=(.*)$", env_file.read_text(), re.M))
    return found


def measure(run: Run, cmd: list[str], env: dict, log: Path, timeout: float, cwd: Path | None = None) -> Run:
    """Run ``cmd`` (benchlib.run_measured); a non-zero exit or the timeout fails the run."""
    m = run_measured(cmd, env, log, timeout, cwd)
    run.seconds, run.cpu, run.rss_mb = m.seconds, m.cpu, m.rss_mb
    run.status = m.failure(timeout) or run.status
    return run


def measured(bench: Bench, run: Run, cmd: list[str], check: Callable[[], str], env: dict | None = None) -> Run:
    """Measure one peer run, then check what it wrote (``check``: "" when right)."""
    slug = re.sub(r"\W+", "-", run.name).strip("-")
    print(f"  {run.name} ...", end=" ", flush=True)
    measure(run, cmd, env or bench.env, bench.work / f"{slug}.log", bench.timeout, cwd=bench.work)
    if run.ok:
        run.status = check() or "ok"
    print(f"{run.seconds:.1f} s, {run.rss_mb:.0f} MB, {run.status}", flush=True)
    return run


def goal(
    runs: list[Run],
    what: str,
    names: list[str],
    value: Callable[[dict[str, Run]], float],
    fmt: str,
    target: str = "",
    met: Callable[[float], bool] | None = None,
) -> tuple[str, str, str, str]:
    """(goal, value, target, verdict); ``n/a`` with the reason when a run it needs is not ok."""
    by_name = {r.name: r for r in runs}
    bad = [f"{n}: {by_name[n].status if n in by_name else 'not run'}" for n in names if n not in by_name or not by_name[n].ok]
    if bad:
        return what, "n/a", target or "-", "n/a (" + "; ".join(b[:80] for b in bad) + ")"
    v = value(by_name)
    verdict = "-" if met is None else ("met" if met(v) else "NOT met")
    return what, fmt.format(v), target or "-", verdict


def render(sec: Section, quick: bool) -> str:
    """One section as Markdown: what was measured, the runs, the goals."""
    out = [f"## {sec.title}{' (--quick)' if quick else ''}", "", f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}"]
    out += [f"- {line}" for line in sec.lines]
    out += ["", "| run | seconds | files/s | MB/s | peak RSS (MB) | CPU s | result |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sec.runs:
        if r.seconds is None:
            out.append(f"| {r.name} | | | | | | {r.status} |")
            continue
        done = not r.status.startswith(("FAILED", "TIMEOUT"))
        fps = f"{r.files / r.seconds:,.0f}" if done else "-"
        mbs = f"{r.nbytes / MB / r.seconds:.1f}" if done and not r.noop else "-"
        out.append(f"| {r.name} | {r.seconds:.2f} | {fps} | {mbs} | {r.rss_mb:.0f} | {r.cpu:.1f} | {r.status} |")
    if sec.goals:
        out += ["", "| goal | value | target | verdict |", "| --- | ---: | --- | --- |"]
        out += [f"| {' | '.join(g)} |" for g in sec.goals]
    return "\n".join(out) + "\n"


def save(rendered: dict[str, str]) -> None:
    """Write the sections that ran into the results file, keeping the others as they were
    (each section sits between its own markers)."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# DICOM sources benchmark\n\nWritten by `bench/dicom_sources.py`; see bench/README.md.\n"
    )
    for key in PLANNED:
        if key not in rendered:
            continue
        block = f"<!-- section:{key} -->\n{rendered[key]}<!-- end:{key} -->\n"
        pattern = re.compile(rf"<!-- section:{key} -->\n.*?<!-- end:{key} -->\n", re.S)
        text = pattern.sub(lambda _, block=block: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


# ============================================================================ DICOMweb

# The data set: clpipe.testing.dicomdata with another seed (other UIDs than the test data)
# and its patients renamed BENCH01..03 (plain characters: a server that does not
# percent-decode queries, like Orthanc 1.10, still finds them for the peer).
DICOMWEB_DATA = {"full": dict(scale=16, size=128), "quick": dict(scale=2, size=32)}
BENCH_PATIENTS = {"SUB01": "BENCH01", "SUB02": "BENCH02", "SUB 03/x": "BENCH03"}
DATA_VERSION = "1"  # change when the renaming below changes
SERIES_PEER = f"dicomweb-client retrieve_series, {JOBS} threads"


@dataclass
class DataSet:
    folder: Path
    files: dict[str, tuple[str, int, str]]  # SOPInstanceUID -> (path under folder, size, sha256)
    series: int

    @property
    def nbytes(self) -> int:
        return sum(size for _, size, _ in self.files.values())


def bench_dataset(scale: int, size: int) -> DataSet:
    """The benchmark's data set, made once and cached under bench/.cache/ by its parameters,
    the generator's source and the pydicom version."""
    import pydicom

    from clpipe.testing import dicomdata

    key = hashlib.sha1(
        json.dumps([scale, size, DATA_VERSION, pydicom.__version__]).encode() + Path(dicomdata.__file__).read_bytes()
    ).hexdigest()[:16]
    folder = CACHE / f"dicomweb-{key}"
    index = folder / "index.json"
    if not index.exists():
        shutil.rmtree(folder, ignore_errors=True)
        desc = dicomdata.make_dataset(folder / "data", scale=scale, rows=size, cols=size, seed="bench")
        files = {}
        for rec in desc["instances"]:
            path = folder / "data" / rec["path"]
            ds = pydicom.dcmread(path)
            ds.PatientID = BENCH_PATIENTS[ds.PatientID]
            ds.save_as(path)
            data = path.read_bytes()
            files[rec["SOPInstanceUID"]] = ("data/" + rec["path"], len(data), hashlib.sha256(data).hexdigest())
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"files": files, "series": desc["counts"]["series"]}))
        tmp.replace(index)
    stored = json.loads(index.read_text())
    return DataSet(folder, {uid: tuple(v) for uid, v in stored["files"].items()}, stored["series"])


class Orthanc:
    """Orthanc's REST API, to load and remove the benchmark's patients."""

    def __init__(self, base: str):
        import httpx

        self.base = base.rstrip("/")
        self.http = httpx.Client(base_url=self.base, timeout=HTTP_TIMEOUT, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def find(self, level: str) -> list[str]:
        body = {"Level": level, "Query": {"PatientID": OWN_PATIENTS}}
        return self.http.post("/tools/find", json=body).raise_for_status().json()

    def versions(self) -> str:
        system = self.http.get("/system").raise_for_status().json()
        plugin = self.http.get("/plugins/dicom-web")
        web = plugin.json().get("Version", "?") if plugin.status_code == 200 else "?"
        return f"Orthanc {system.get('Version', '?')}, DICOMweb plugin {web}"

    def remove_bench(self) -> int:
        patients = self.find("Patient")
        for ident in patients:
            self.http.delete(f"/patients/{ident}").raise_for_status()
        return len(patients)

    def load(self, data: DataSet) -> None:
        """Upload the files as they are (POST /instances stores the bytes it receives)."""
        if len(self.find("Instance")) == len(data.files):
            return
        self.remove_bench()
        local = threading.local()
        clients = []

        def upload(rel: str) -> None:
            if not hasattr(local, "http"):
                import httpx

                local.http = httpx.Client(base_url=self.base, timeout=HTTP_TIMEOUT, trust_env=False)
                clients.append(local.http)
            body = (data.folder / rel).read_bytes()
            local.http.post("/instances", content=body, headers={"Content-Type": "application/dicom"}).raise_for_status()

        try:
            with ThreadPoolExecutor(JOBS) as pool:
                list(pool.map(upload, [rel for rel, _, _ in data.files.values()]))
        finally:
            for client in clients:
                client.close()
        if len(self.find("Instance")) != len(data.files):
            raise SystemExit(f"Orthanc holds {len(self.find('Instance'))} {OWN_PATIENTS} instances after the upload, not {len(data.files)}")


def check_dropoff(dest: Path, data: DataSet) -> str:
    """Empty when ``dest`` holds every instance once, as ``<SOPInstanceUID>.dcm``, byte for
    byte the uploaded file (Orthanc serves what it stores); else what is wrong."""
    found: dict[str, list[Path]] = {}
    for root, dirs, files in os.walk(dest):
        if root == str(dest):
            dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in files:
            found.setdefault(name, []).append(Path(root, name))
    want = {f"{uid}.dcm": rec for uid, rec in data.files.items()}
    missing = sorted(want.keys() - found.keys())
    extra = sorted(found.keys() - want.keys())
    twice = sorted(name for name, paths in found.items() if len(paths) > 1)
    differ = sorted(name for name in want.keys() & found.keys() if hashlib.sha256(found[name][0].read_bytes()).hexdigest() != want[name][2])
    problems = [
        f"{len(v)} {what} (e.g. {v[0]})" for what, v in (("missing", missing), ("extra", extra), ("twice", twice), ("differ", differ)) if v
    ]
    return "INVALID: " + ", ".join(problems) if problems else ""


def native_project(bench: Bench, source_url: str, dest: Path) -> Path | str:
    """A clpipe project (``clpipe project_setup``) syncing into ``dest`` with JOBS parallel
    series, or why it could not be made."""
    root = bench.work / "native-project"
    for url in (source_url, "fw://bench/placeholder/"):  # `dicom sync -source_url` names the source anyway
        shutil.rmtree(root, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "-m", "clpipe", "project_setup", "-project_title", "bench", "-project_dir", str(root), "-source_url", url],
            env=bench.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode == 0:
            break
    else:
        return f"clpipe project_setup failed: {last_line(proc.stdout + proc.stderr)}"
    config = root / "clpipe_config.json"
    data = json.loads(config.read_text())
    data["SourceOptions"].pop("LayoutTemplate", None)  # the DICOM default layout, whichever URL made the project
    data["SourceOptions"].update(DropoffDirectory=str(dest), TempDirectory=str(root / "tmp"), CommandLineOpts=f"-y -j {JOBS}")
    config.write_text(json.dumps(data, indent=2))
    return config


def native_command(config: Path, source_url: str) -> list[str]:
    """How the native engine is run: the one place to change if its flags change."""
    return [
        sys.executable,
        "-m",
        "clpipe",
        "dicom",
        "sync",
        "-c",
        str(config),
        "-source_url",
        source_url,
        "-patient_id",
        OWN_PATIENTS,
        "-batch_config",
        "",
        "-submit",
    ]


@worker("dicomweb-engine")
def engine_worker(args: list[str]) -> int:
    """The native engine without the CLI (used when `clpipe dicom sync` is not available):
    the DICOMweb source and the engine, as sync/run.py runs them."""
    url, dest = args
    from clpipe.sources.dicom import DicomQuery, SourceSettings, entries, parse_source_url
    from clpipe.sources.dicomweb import DicomWebSource
    from clpipe.sync.engine import Engine, Options
    from clpipe.sync.manifest import SyncState

    dropoff = Path(dest)
    source = DicomWebSource(parse_source_url(url), SourceSettings(jobs=JOBS))
    state = SyncState(dropoff, "bench")
    try:
        state.acquire()
        state.load()
        outcome = Engine(source, state, Options(dropoff=dropoff, zip_tmp=dropoff.parent / "zip-tmp", jobs=JOBS)).run(
            entries(source, DicomQuery(patient_id=OWN_PATIENTS))
        )
        state.save()
    finally:
        state.release()
        source.close()
    print(outcome.summary())
    return 1 if outcome.failed else 0


@worker("dicomweb-client")
def dicomweb_client_worker(args: list[str]) -> int:
    """The peer: dicomweb-client, one instance at a time, as a plain script would do it:
    search_for_instances per patient, then retrieve_instance and write each file."""
    url, dest, patients = args
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url, timeout=HTTP_TIMEOUT)
    tags = {"study": "0020000D", "series": "0020000E", "sop": "00080018"}
    written = 0
    for patient in patients.split(","):
        for found in client.search_for_instances(search_filters={"PatientID": patient}, get_remaining=True):
            study, series, sop = (found[tags[k]]["Value"][0] for k in ("study", "series", "sop"))
            ds = client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
            folder = Path(dest, series)
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{sop}.dcm")
            written += 1
    print(f"dicomweb-client: wrote {written} instances")
    return 0


@worker("dicomweb-client-series")
def dicomweb_client_series_worker(args: list[str]) -> int:
    """The strongest dicomweb-client peer: search_for_series per patient, then one
    retrieve_series (one multipart request per series, application/dicom, transfer syntax
    *) per series, ``threads`` series at a time (a DICOMwebClient per thread), each
    instance written as ``<series>/<SOPInstanceUID>.dcm``."""
    url, dest, patients, threads = args
    local = threading.local()
    from dicomweb_client.api import DICOMwebClient

    def client() -> DICOMwebClient:
        if not hasattr(local, "client"):
            local.client = DICOMwebClient(url, timeout=HTTP_TIMEOUT)
        return local.client

    series = []
    for patient in patients.split(","):
        for found in client().search_for_series(search_filters={"PatientID": patient}, get_remaining=True):
            series.append((found["0020000D"]["Value"][0], found["0020000E"]["Value"][0]))

    def fetch(uids: tuple[str, str]) -> int:
        study, ser = uids
        folder = Path(dest, ser)
        folder.mkdir(parents=True, exist_ok=True)
        datasets = client().retrieve_series(study, ser, media_types=(("application/dicom", "*"),))
        for ds in datasets:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm")
        return len(datasets)

    with ThreadPoolExecutor(int(threads)) as pool:
        written = sum(pool.map(fetch, series))
    print(f"dicomweb-client: wrote {written} instances of {len(series)} series")
    return 0


def dicomweb_client_version() -> str:
    try:
        from importlib.metadata import version

        return version("dicomweb-client")
    except Exception:  # noqa: BLE001 - only for the report
        return "not installed"


@section("dicomweb")
def dicomweb_section(bench: Bench) -> Section:
    """The native engine (`clpipe dicom sync`: one WADO-RS request per series, JOBS series at a
    time) against dicomweb-client retrieving instance by instance, on Orthanc."""
    sec = Section("dicomweb", "DICOMweb: native engine vs dicomweb-client, per instance")
    base = bench.infra.get("CLPIPE_ORTHANC_HTTP")
    web = bench.infra.get("CLPIPE_ORTHANC_DICOMWEB")
    if not base or not web:
        sec.lines.append(f"not run: the DICOM test servers are not up; run `{START}`")
        return sec
    params = DICOMWEB_DATA["quick" if bench.quick else "full"]
    t0 = time.perf_counter()
    data = bench_dataset(**params)
    orthanc = Orthanc(base)
    try:
        orthanc.load(data)
        print(
            f"  data set ready in Orthanc in {time.perf_counter() - t0:.1f} s: {len(data.files):,} instances, "
            f"{data.series} series, {data.nbytes / MB:.1f} MB"
        )
        source_url = "dicomweb+" + web
        files, nbytes = len(data.files), data.nbytes
        sec.lines += [
            f"server: {orthanc.versions()} on 127.0.0.1 (scripts/infra/dicom-up.sh)",
            f"data: clpipe.testing.dicomdata scale {params['scale']}, {params['size']}x{params['size']} pixels, "
            f"seed 'bench', patients {', '.join(BENCH_PATIENTS.values())}: {files:,} instances in {data.series} series, "
            f"{nbytes / MB:.1f} MB ({nbytes:,} bytes); uploaded as is with POST /instances",
        ]

        dest = bench.work / "dropoff-native"
        config = native_project(bench, source_url, dest)
        reason = config if isinstance(config, str) else _unavailable(bench, native_command(config, source_url))
        if reason:
            print(f"  clpipe dicom sync not available ({reason}): the engine is run directly")
            command, how = worker_command("dicomweb-engine", source_url, dest), "the engine run directly (bench worker)"
        else:
            command, how = native_command(config, source_url), f"`clpipe dicom sync -patient_id '{OWN_PATIENTS}'`"
        for kind in ("full", "no-op"):
            run = measured(bench, Run(f"native {kind}", files, nbytes, noop=kind == "no-op"), command, lambda: check_dropoff(dest, data))
            sec.runs.append(run)
            if not run.ok:
                break
        if len(sec.runs) == 2 and sec.runs[1].ok and "0 created, 0 updated" not in (bench.work / "native-no-op.log").read_text():
            sec.runs[1].status = "INVALID: the re-sync transferred something"

        peer_dest = bench.work / "dropoff-peer"
        peer = worker_command("dicomweb-client", web, peer_dest, ",".join(BENCH_PATIENTS.values()))
        sec.runs.append(measured(bench, Run("dicomweb-client loop", files, nbytes), peer, lambda: check_dropoff(peer_dest, data)))
        shutil.rmtree(peer_dest, ignore_errors=True)
        peer = worker_command("dicomweb-client-series", web, peer_dest, ",".join(BENCH_PATIENTS.values()), JOBS)
        sec.runs.append(measured(bench, Run(SERIES_PEER, files, nbytes), peer, lambda: check_dropoff(peer_dest, data)))
        sec.lines += [
            f"native: {how}, {JOBS} series at a time, one WADO-RS request per series "
            "(multipart/related; transfer-syntax=*), into an empty dropoff, then again (no-op)",
            f"peer: dicomweb-client {dicomweb_client_version()}, search_for_instances per patient, then "
            "retrieve_instance (application/dicom, transfer-syntax *) and write each file, one at a time",
            f"peer `{SERIES_PEER}`: dicomweb-client, search_for_series per patient, then retrieve_series (one "
            f"multipart request per series, application/dicom, transfer-syntax *) {JOBS} series at a time (a "
            "DICOMwebClient per thread), each instance written with `save_as`",
            "every run is checked: each instance once as <SOPInstanceUID>.dcm, byte for byte the uploaded file",
            "peak RSS: max over time (50 ms samples) of the summed RSS of the process tree; MB = 10^6 bytes",
        ]
    finally:
        if not bench.keep_data:
            removed = orthanc.remove_bench()
            print(f"  removed the {removed} {OWN_PATIENTS} patients from Orthanc")
        orthanc.close()
    sec.goals = [
        goal(
            sec.runs,
            "full sync: native speed-up over the dicomweb-client loop",
            ["native full", "dicomweb-client loop"],
            lambda r: r["dicomweb-client loop"].seconds / r["native full"].seconds,
            "{:.1f}x",
            ">= 2x",
            lambda v: v >= 2,
        ),
        goal(
            sec.runs,
            f"full sync: native speed-up over {SERIES_PEER}",
            ["native full", SERIES_PEER],
            lambda r: r[SERIES_PEER].seconds / r["native full"].seconds,
            "{:.2f}x",
            ">= 1.5x",
            lambda v: v >= 1.5,
        ),
        goal(sec.runs, "no-op re-sync: native seconds", ["native no-op"], lambda r: r["native no-op"].seconds, "{:.2f} s"),
        goal(
            sec.runs,
            "native peak RSS (full and no-op)",
            ["native full", "native no-op"],
            lambda r: max(r["native full"].rss_mb, r["native no-op"].rss_mb),
            "{:.0f} MB",
        ),
    ]
    return sec


def _unavailable(bench: Bench, command: list[str]) -> str:
    """Why clpipe rejects a command, checked without -submit (nothing is synced)."""
    proc = subprocess.run(
        [a for a in command if a != "-submit"], env=bench.env, capture_output=True, text=True, timeout=120, cwd=bench.work
    )
    return "" if proc.returncode == 0 else last_line(proc.stdout + proc.stderr)


# ============================================================================ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=PLANNED, action="append", help="run only this section (may repeat)")
    ap.add_argument("--quick", action="store_true", help="small data sets, results not saved")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per run (default 600)")
    ap.add_argument("--workdir", type=Path, help="where dropoffs go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, dropoffs)")
    ap.add_argument("--keep-data", action="store_true", help=f"leave the {OWN_PATIENTS} data in the servers")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return WORKERS[args.worker[0]](args.worker[1:])
    infra = infra_exports()
    if "CLPIPE_ORTHANC_HTTP" not in infra:
        ap.error(f"the DICOM test servers are not set up: run `{START}` first")
    with orthanc_data_lock():  # its BENCH* patients are uploaded and deleted
        return run_benchmark(args, infra)


def run_benchmark(args: argparse.Namespace, infra: dict) -> int:
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="clpipe-dicom-bench-", dir=args.workdir))
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONWARNINGS="ignore", NO_PROXY="127.0.0.1,localhost", HOME=str(work))
    for var in ("CLPIPE_DICOMWEB_TOKEN", "CLPIPE_DICOMWEB_USER", "CLPIPE_DICOMWEB_PASSWORD"):
        env.pop(var, None)
    bench = Bench(quick=args.quick, timeout=args.timeout, work=work, keep_data=args.keep_data, infra=infra, env=env)
    rendered: dict[str, str] = {}
    try:
        for key in args.only or PLANNED:
            print(f"[{key}]")
            rendered[key] = render(SECTIONS[key](bench), args.quick)
            print("\n" + rendered[key])
        if not args.quick and rendered:
            save(rendered)
            print(f"saved to {RESULTS}")
        return 0
    finally:
        benchlib.leave(work, args.keep)


if __name__ == "__main__":
    sys.exit(main())
