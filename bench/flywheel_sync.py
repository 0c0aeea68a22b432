"""Benchmark `clpipe dicom flywheel_sync`: the native engine against the real `fw sync` and a
raw-download floor, in one run, on one project served by the bundled Flywheel test server.

    .venv/bin/python bench/flywheel_sync.py               # full run, writes bench/results/flywheel_sync.md
    .venv/bin/python bench/flywheel_sync.py --skip-large  # without the 100,000-file project
    .venv/bin/python bench/flywheel_sync.py --quick       # tiny projects: a smoke test of every path

Every peer runs as a subprocess into a fresh dropoff; its result is compared with the
project's expected files. bench/README.md explains the rows and the goals.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import benchlib
import httpx
from benchlib import MB, isolated_env, machine, run_measured

from clpipe.testing import fwserver

# The test server answers with two writes (headers, then body); with Nagle's algorithm on, the
# body waits for the client's delayed ACK (~40 ms): ~25 requests/s per connection, whoever the
# client is. Real servers send without that wait, so the benchmark turns it off.
fwserver._Handler.disable_nagle_algorithm = True

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "flywheel_sync.md"
MILLION_RESULTS = BENCH / "results" / "flywheel_million.md"
DEFAULT_FW = Path.home() / ".cache" / "clpipe-tests" / "fw-18.5.1" / "bin" / "fw"
KEY = "bench-key"
JOBS = 4  # fw sync -j and the floor's worker threads
STATE_DIR = ".clpipe-sync"  # the native engine's bookkeeping in the dropoff: not a synced file
# Projects (make_demo_project arguments). "main": zipped series; "large": single DICOM files.
SIZES = {
    "full": {
        "main": dict(subjects=4, sessions=5, acquisitions=10, slices=50, rows=128, cols=128),
        "large": dict(subjects=4, sessions=5, acquisitions=10, slices=500, zipped=False),
    },
    "quick": {
        "main": dict(subjects=1, sessions=2, acquisitions=2, slices=5, rows=32, cols=32),
        "large": dict(subjects=1, sessions=2, acquisitions=2, slices=100, zipped=False),
    },
}
# --million: the large project's tree (20 sessions x 10 acquisitions) with more single files per
# acquisition; the growth curve's sizes (--quick: a tiny tree)
MILLION_SIZES = {"full": [100_000, 300_000, 1_000_000], "quick": [400, 1_200]}
MILLION_TREE = {"full": dict(subjects=4, sessions=5, acquisitions=10), "quick": dict(subjects=1, sessions=2, acquisitions=2)}
MILLION_NOOP_SECONDS = 30  # issue 15: a no-op re-sync of a million files under 30 s
MILLION_RSS_MB = 200  # ... and under 200 MB


# ---------------------------------------------------------------------------- the peers' commands


def fw_command(fw: Path, source: str, dest: Path, tmp: Path) -> list[str]:
    return [str(fw), "sync", "-j", str(JOBS), "--include", "dicom", "-y", "--tmp-path", str(tmp), source, str(dest)]


def native_command(config: Path) -> list[str]:
    """How the native engine is run: the one place to change if its flags change."""
    return [sys.executable, "-m", "clpipe", "dicom", "flywheel_sync", "-c", str(config), "-engine", "native", "-submit"]


def floor_command(base_url: str, project_id: str, dest: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--floor", base_url, project_id, str(dest)]


def floor_main(base_url: str, project_id: str, dest: Path) -> int:
    """The floor: ONE download/targets request, then JOBS threads that GET every target and
    unpack zips into their folder (members flattened to base names), as fw does."""
    headers = {"Authorization": f"scitran-user {os.environ['FLOOR_API_KEY']}"}

    def client() -> httpx.Client:
        return httpx.Client(base_url=base_url, headers=headers, timeout=60, trust_env=False)

    body = {"nodes": [{"level": "project", "_id": project_id}], "filters": [{"types": {"+": ["dicom"]}}]}
    with client() as c:
        resp = c.post("/api/download/targets", params={"type": "full", "prefix": ""}, json=body)
    targets = [json.loads(line) for line in resp.raise_for_status().text.splitlines() if line]
    local, clients = threading.local(), []

    def fetch(t: dict) -> None:
        if not hasattr(local, "client"):
            local.client = client()
            clients.append(local.client)
        url = f"/api/containers/{t['container_id']}/files/{quote(t['filename'], safe='')}"
        data = local.client.get(url).raise_for_status().content
        rel = t["dst_path"].split("/", 2)[2]  # without "/<project>/"
        if t["filetype"] == "dicom" and t["filename"].lower().endswith("zip"):
            folder = dest / re.sub(r"(\.(dcm|dicom))?\.zip$", "", rel, flags=re.IGNORECASE)
            folder.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for m in zf.infolist():
                    if not m.is_dir():
                        (folder / os.path.basename(m.filename)).write_bytes(zf.read(m))
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(data)

    try:
        with ThreadPoolExecutor(JOBS) as pool:
            list(pool.map(fetch, targets))
    finally:
        for c in clients:
            c.close()
    return 0


# ------------------------------------------------------------------------- project and checking


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def load_project(label: str, params: dict) -> tuple[fwserver.Project, dict[str, tuple[int, bytes]]]:
    """The project and its expected dropoff (relative path -> size, digest), cached on disk
    under bench/.cache/ by parameters and by the generator's source."""
    source = Path(fwserver.__file__).read_bytes()
    key = hashlib.sha1(json.dumps([label, params], sort_keys=True).encode() + source).hexdigest()
    path = BENCH / ".cache" / f"{label}-{key[:16]}.pickle"
    if path.exists():
        return pickle.loads(path.read_bytes())
    project = fwserver.make_demo_project(label=label, fast=True, single_dicoms=False, **params)
    expected = {rel: (len(data), digest(data)) for rel, data in project.expected_dicom_paths(strip_root=True).items()}
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(pickle.dumps((project, expected), protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(tmp, path)
    return project, expected


def check(dest: Path, expected: dict[str, tuple[int, bytes]]) -> str:
    """Empty when ``dest`` holds exactly the expected files, byte for byte; else what differs."""
    got = {}
    for root, dirs, files in os.walk(dest):
        if root == str(dest):
            dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                data = fh.read()
            got[os.path.relpath(path, dest)] = (len(data), digest(data))
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    differ = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (("missing", missing), ("extra", extra), ("differ", differ)) if v]
    return "INVALID: " + ", ".join(problems) if problems else ""


# ------------------------------------------------------------------------------------ measuring


@dataclass
class Run(benchlib.Run):
    requests: int | None = None


def measure(run: Run, cmd: list[str], env: dict, log: Path, timeout: float, srv, cwd: Path | None = None) -> Run:
    """Run ``cmd`` (benchlib.run_measured) and count the requests the server saw; a non-zero
    exit or a timeout fails the run."""
    before = len(srv.requests)
    m = run_measured(cmd, env, log, timeout, cwd)
    run.seconds, run.cpu, run.rss_mb, run.requests = m.seconds, m.cpu, m.rss_mb, len(srv.requests) - before
    run.status = m.failure(timeout, 120) or run.status
    return run


def sync_pair(
    peer: str,
    make_cmd,
    dest: Path,
    expected: dict,
    env: dict,
    work: Path,
    timeout: float,
    srv,
    noop: bool = True,
    label: str = "",
    after=None,
) -> list[Run]:
    """A full sync into the empty ``dest``, then (if ``noop``) a re-sync with nothing changed;
    then ``after()`` (more runs on the synced dropoff) if both went well."""
    files, nbytes = len(expected), sum(size for size, _ in expected.values())
    runs = []
    for kind in ("full", "no-op") if noop else ("full",):
        run = Run(f"{peer} {label}{kind}", files, nbytes, noop=kind == "no-op")
        slug = re.sub(r"\W+", "-", run.name)
        print(f"  {run.name} ...", end=" ", flush=True)
        measure(run, make_cmd(), env, work / f"{slug}.log", timeout, srv, cwd=work)
        if run.ok:
            run.status = check(dest, expected) or "ok"
        print(f"{run.seconds:.1f} s, {run.rss_mb:.0f} MB, {run.status}", flush=True)
        runs.append(run)
        if run.status.startswith(("FAILED", "TIMEOUT")):
            break  # a re-sync after a failed sync measures nothing useful
    if after is not None and runs and all(r.ok for r in runs):
        runs += after()
    shutil.rmtree(dest, ignore_errors=True)
    return runs


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def native_config(work: Path, name: str, source: str, dest: Path, env: dict) -> Path | str:
    """A clpipe project made by `clpipe project_setup`, syncing ``source`` into ``dest``
    (or why it could not be made)."""
    root = work / name
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", "project_setup", "-project_title", name, "-project_dir", str(root), "-source_url", source],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return f"clpipe project_setup failed: {last_line(proc)}"
    config = root / "clpipe_config.json"
    data = json.loads(config.read_text())
    data["SourceOptions"].pop("LayoutTemplate", None)  # Flywheel's layout, as fw sync writes it: compared with fw's
    data["SourceOptions"].update(DropoffDirectory=str(dest), TempDirectory=str(root / "tmp"))
    config.write_text(json.dumps(data, indent=2))
    return config


def native_unavailable(config: Path, env: dict) -> str:
    """Why clpipe rejects the native command, checked without -submit (nothing is synced)."""
    cmd = [a for a in native_command(config) if a != "-submit"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return "" if proc.returncode == 0 else last_line(proc)


def status_runs(config: Path, expected: dict, env: dict, work: Path, timeout: float, srv, label: str) -> list[Run]:
    """`clpipe dicom status` (the table, then -json) on the synced dropoff; the JSON checked
    (every expected file counted in a complete session)."""
    runs = []
    for flag in ("", "-json"):
        run = Run(f"status {label}{flag or 'table'}".strip(), len(expected))
        cmd = [sys.executable, "-m", "clpipe", "dicom", "status", "-c", str(config), *([flag] if flag else [])]
        print(f"  {run.name} ...", end=" ", flush=True)
        log = work / (re.sub(r"\W+", "-", run.name) + ".log")
        measure(run, cmd, env, log, timeout, srv, cwd=work)
        if run.ok and flag:
            data = json.loads(log.read_text())
            files = sum(session.get("files", 0) for session in data.get("sessions", []))
            complete = all(session.get("state") == "complete" for session in data.get("sessions", []))
            run.status = "ok" if files == len(expected) and complete else f"INVALID: {files} files in the sessions, complete={complete}"
        print(f"{run.seconds:.2f} s, {run.status}", flush=True)
        runs.append(run)
    return runs


def run_native(work, project, expected, env, timeout, srv, label="", status=False) -> list[Run]:
    name = f"native-{label.strip() or 'main'}"
    dest = work / f"dropoff-{name}"
    config = native_config(work, name, f"fw://{project.group}/{project.label}/", dest, env)
    reason = config if isinstance(config, str) else native_unavailable(config, env)
    if reason:
        print(f"  native: not available: {reason}")
        return [
            Run(f"native {label}{kind}", len(expected), status=f"not available: {reason}", noop=kind == "no-op")
            for kind in ("full", "no-op")
        ]
    after = (lambda: status_runs(config, expected, env, work, timeout, srv, label)) if status else None
    return sync_pair("native", lambda: native_command(config), dest, expected, env, work, timeout, srv, label=label, after=after)


# ------------------------------------------------------------------------------------ reporting


def goals(runs: dict[str, Run]) -> list[tuple[str, str, str, str]]:
    """(goal, value, target, verdict) for each goal of the issue."""

    def row(what, names, value, fmt, target, met) -> tuple[str, str, str, str]:
        bad = [f"{n}: {runs[n].status if n in runs else 'not run'}" for n in names if n not in runs or not runs[n].ok]
        if bad:
            return what, "n/a", target, "n/a (" + "; ".join(b[:80] for b in bad) + ")"
        v = value()
        return what, fmt.format(v), target, "met" if met(v) else "NOT met"

    sec = lambda n: runs[n].seconds  # noqa: E731
    large = getattr(runs.get("native large no-op"), "files", 0) or 100_000
    main_runs, large_runs = ["native full", "native no-op"], ["native large full", "native large no-op"]
    rss = lambda names: max(runs[n].rss_mb for n in names)  # noqa: E731
    return [
        row(
            "full sync: native speed-up over fw sync",
            ["fw full", "native full"],
            lambda: sec("fw full") / sec("native full"),
            "{:.1f}x",
            ">= 5x",
            lambda v: v >= 5,
        ),
        row(
            "full sync: native time / floor time",
            ["native full", "floor full"],
            lambda: sec("native full") / sec("floor full"),
            "{:.2f}",
            "<= 1.5",
            lambda v: v <= 1.5,
        ),
        row(
            "no-op re-sync: native speed-up over fw sync",
            ["fw no-op", "native no-op"],
            lambda: sec("fw no-op") / sec("native no-op"),
            "{:.0f}x",
            ">= 50x",
            lambda v: v >= 50,
        ),
        row(
            "native peak RSS, main project (full and no-op)", main_runs, lambda: rss(main_runs), "{:.0f} MB", "< 150 MB", lambda v: v < 150
        ),
        row(
            f"native peak RSS, {large:,}-file project (full and no-op)",
            large_runs,
            lambda: rss(large_runs),
            "{:.0f} MB",
            "< 150 MB",
            lambda v: v < 150,
        ),
        row(
            f"{large:,}-file no-op re-sync, native",
            ["native large no-op"],
            lambda: sec("native large no-op"),
            "{:.2f} s",
            "< 5 s",
            lambda v: v < 5,
        ),
    ]


def describe(label: str, p: dict, expected: dict, project) -> str:
    nbytes = sum(size for size, _ in expected.values())
    served = sum(f.size for _, f in project.iter_files() if f.type == "dicom")
    how = (
        f"{p['slices']} slices each, zipped ({p.get('rows', 8)}x{p.get('cols', 8)} uint16)"
        if p.get("zipped", True)
        else f"{p['slices']} single DICOM files each (8x8 uint16)"
    )
    return (
        f"`fw://lab/{label}/`: {p['subjects']} subjects x {p['sessions']} sessions x "
        f"{p['acquisitions']} acquisitions, {how}: {len(expected):,} files, "
        f"{nbytes / MB:,.1f} MB ({nbytes:,} bytes) in the dropoff; {served / MB:,.1f} MB served"
    )


def table(runs: list[Run], header: list[str], goal_rows: list | None = None) -> str:
    out = header + [
        "",
        "| run | seconds | files/s | MB/s | peak RSS (MB) | CPU s | requests | result |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        if r.seconds is None:
            out.append(f"| {r.name} | | | | | | | {r.status} |")
            continue
        done = not r.status.startswith(("FAILED", "TIMEOUT"))
        fps = f"{r.files / r.seconds:,.0f}" if done else "-"
        mbs = f"{r.nbytes / MB / r.seconds:.1f}" if done and not r.noop else "-"
        out.append(f"| {r.name} | {r.seconds:.2f} | {fps} | {mbs} | {r.rss_mb:.0f} | {r.cpu:.1f} | {r.requests:,} | {r.status} |")
    out += ["", "| goal | value | target | verdict |", "| --- | ---: | --- | --- |"]
    out += [f"| {' | '.join(g)} |" for g in (goal_rows if goal_rows is not None else goals({r.name: r for r in runs}))]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------ --million: the growth curve


def million_params(files: int, quick: bool) -> dict:
    tree = MILLION_TREE["quick" if quick else "full"]
    folders = tree["subjects"] * tree["sessions"] * tree["acquisitions"]
    return dict(tree, slices=max(1, files // folders), zipped=False)


def million(args, env: dict, work: Path) -> int:
    """The native engine on the large project's tree at each size of MILLION_SIZES (or
    --million-sizes): full sync, then the no-op re-sync, each checked file by file; the
    floor on the smallest size (files/s against a raw floor on the same project). One
    server per size, the project alone on it; logged in with $FLYWHEEL_API_KEY (no fw)."""
    quick = args.quick
    sizes = [int(x) for x in args.million_sizes.split(",")] if args.million_sizes else MILLION_SIZES["quick" if quick else "full"]
    runs: list[Run] = []
    described = []
    for n, files in enumerate(sizes):
        params = million_params(files, quick)
        t0 = time.perf_counter()
        label = "many" if files == 100_000 and not quick else f"many{files}"
        project, expected = load_project(label, params)
        described.append(describe(label, params, expected, project))
        print(f"project {label} ({len(expected):,} files) ready in {time.perf_counter() - t0:.1f} s", flush=True)
        timeout = max(args.timeout, 3 * len(expected) / 1000)  # ~330 files/s at least (the full sync of 100,000: ~800)
        with fwserver.FlywheelTestServer([project], api_keys={KEY}) as srv:
            run_env = dict(env, FLYWHEEL_API_KEY=srv.login_key(KEY))
            runs += run_native(work, project, expected, run_env, timeout, srv, f"{len(expected):,} ", status=True)
            if n == 0:
                dest = work / "dropoff-floor"
                runs += sync_pair(
                    "floor",
                    lambda url=srv.base_url, pid=project.id, dest=dest: floor_command(url, pid, dest),
                    dest,
                    expected,
                    dict(env, FLOOR_API_KEY=KEY),
                    work,
                    timeout,
                    srv,
                    noop=False,
                    label=f"{len(expected):,} ",
                )
        del project, expected
    header = [
        f"# flywheel_sync benchmark: the growth curve (`--million`){' (--quick)' if quick else ''}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}",
        *[f"- project {d}" for d in described],
        f"- native = `{' '.join(native_command(Path('CONFIG'))[1:])}` (its own default concurrency), logged in with "
        "`FLYWHEEL_API_KEY`; each size: a full sync into an empty dropoff, then the no-op re-sync; floor = "
        f"{JOBS} threads, raw GET per file (bench/README.md), on the smallest size only",
        "- server: FlywheelTestServer in the benchmark process on 127.0.0.1, TCP_NODELAY on, one per size; "
        "its own CPU (listing, every file request) is in every number and shares the 2 cores",
        "- every run checked file by file (BLAKE2) against the project's expected dropoff",
        "- peak RSS: max over time (50 ms samples) of the summed RSS of the process tree; MB = 10^6 bytes",
    ]
    text = table(runs, header, million_goals(runs, sizes)) + "\n" + growth_curve(runs)
    print("\n" + text)
    if not quick and not args.million_sizes:  # (other sizes: not the growth curve the results file holds)
        benchlib.save_results(MILLION_RESULTS, text)
    elif args.million_sizes:
        print("(--million-sizes: results not saved)")
    return 0 if all(r.ok for r in runs) else 1


def growth_curve(runs: list[Run]) -> str:
    """Seconds, files/s and peak RSS of the native runs by project size, and the RSS each
    further 100,000 files cost (from the size before)."""
    by = {r.name: r for r in runs}
    sizes = sorted({r.files for r in runs if r.name.startswith("native ")})
    out = [
        "## Growth curve (native)",
        "",
        "| files | full s | full files/s | full peak RSS (MB) | no-op s | no-op files/s | no-op peak RSS (MB) "
        "| no-op RSS per 100k more files (MB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    previous = None
    for files in sizes:
        full, noop = by.get(f"native {files:,} full"), by.get(f"native {files:,} no-op")
        cells = []
        for r in (full, noop):
            if r is None or r.seconds is None or not r.ok:
                cells += ["-", "-", (r.status[:60] if r else "not run")]
            else:
                cells += [f"{r.seconds:.1f}", f"{r.files / r.seconds:,.0f}", f"{r.rss_mb:.0f}"]
        slope = "-"
        if previous and noop and noop.ok and previous[1].ok:
            slope = str(round((noop.rss_mb - previous[1].rss_mb) / ((files - previous[0]) / 100_000)))  # (an int: never "-0")
        if noop is not None:
            previous = (files, noop)
        out.append(f"| {files:,} | {' | '.join(cells)} | {slope} |")
    return "\n".join(out) + "\n"


def million_goals(runs: list[Run], sizes: list[int]) -> list[tuple[str, str, str, str]]:
    by = {r.name: r for r in runs}
    natives = sorted({r.files for r in runs if r.name.startswith("native ")})
    small, big = (natives[0], natives[-1]) if natives else (sizes[0], sizes[-1])

    def row(what, names, value, fmt, target, met) -> tuple[str, str, str, str]:
        bad = [f"{n}: {by[n].status if n in by else 'not run'}" for n in names if n not in by or not by[n].ok]
        if bad:
            return what, "n/a", target, "n/a (" + "; ".join(b[:80] for b in bad) + ")"
        if len(set(names)) < len(names):  # (the growth between two sizes, run at one size)
            return what, "n/a", target, "n/a (one project size)"
        v = value()
        return what, fmt.format(v), target, "-" if met is None else "met" if met(v) else "NOT met"

    noop_small, noop_big = f"native {small:,} no-op", f"native {big:,} no-op"
    full_small, floor = f"native {small:,} full", f"floor {small:,} full"
    return [
        row(
            f"{big:,}-file no-op re-sync, native",
            [noop_big],
            lambda: by[noop_big].seconds,
            "{:.1f} s",
            f"< {MILLION_NOOP_SECONDS} s",
            lambda v: v < MILLION_NOOP_SECONDS,
        ),
        row(
            f"{big:,}-file no-op re-sync, native peak RSS",
            [noop_big],
            lambda: by[noop_big].rss_mb,
            "{:.0f} MB",
            f"< {MILLION_RSS_MB} MB",
            lambda v: v < MILLION_RSS_MB,
        ),
        row(
            f"no-op memory growth with unchanged files, {small:,} to {big:,} files",
            [noop_small, noop_big],
            lambda: round((by[noop_big].rss_mb - by[noop_small].rss_mb) / ((big - small) / 100_000), 1) + 0.0,  # (+ 0.0: never "-0.0")
            "{:.1f} MB per 100k files",
            "none (< 1 MB per 100k files)",
            lambda v: v < 1,
        ),
        row(
            f"`clpipe dicom status` on {big:,} files (table; -json)",
            [f"status {big:,} table", f"status {big:,} -json"],
            lambda: max(by[f"status {big:,} table"].seconds, by[f"status {big:,} -json"].seconds),
            "{:.2f} s",
            "< 10 s",
            lambda v: v < 10,
        ),
        row(
            f"{small:,}-file full sync: native files/s / raw floor files/s",
            [full_small, floor],
            lambda: by[floor].seconds / by[full_small].seconds,
            "{:.2f}",
            "(for information)",
            None,
        ),
    ]


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny projects, results not saved")
    ap.add_argument("--skip-large", action="store_true", help="skip the 100,000-file project")
    ap.add_argument(
        "--million",
        action="store_true",
        help="instead: the growth curve of the native engine at 100,000, 300,000 and 1,000,000 files "
        f"(about an hour; writes {MILLION_RESULTS.relative_to(BENCH.parent)})",
    )
    ap.add_argument("--million-sizes", metavar="N,N,...", help="--million at these project sizes (files; results not saved)")
    ap.add_argument(
        "--fw",
        type=Path,
        default=Path(os.environ.get("CLPIPE_TEST_FW", DEFAULT_FW)),
        help=f"the fw command (flywheel-cli 18.5.1; default {DEFAULT_FW})",
    )
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    ap.add_argument("--workdir", type=Path, help="where dropoffs go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    ap.add_argument("--floor", nargs=3, metavar=("URL", "PROJECT_ID", "DEST"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.floor:
        return floor_main(args.floor[0], args.floor[1], Path(args.floor[2]))
    if not args.fw.exists() and not args.million:
        ap.error(f"fw not found at {args.fw} (run scripts/setup.sh, or pass --fw)")
    sizes = SIZES["quick" if args.quick else "full"]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="clpipe-bench-", dir=args.workdir))
    home = work / "home"
    env = isolated_env(home, args.fw)
    runs: list[Run] = []
    if args.million:
        try:
            return million(args, env, work)
        finally:
            benchlib.leave(work, args.keep)
    try:
        t0 = time.perf_counter()
        project, expected = load_project("study", sizes["main"])
        header = [
            f"# flywheel_sync benchmark{' (--quick)' if args.quick else ''}",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}",
            f"- project: {describe('study', sizes['main'], expected, project)}",
        ]
        print(f"project ready in {time.perf_counter() - t0:.1f} s; work folder {work}")
        with fwserver.FlywheelTestServer([project], api_keys={KEY}) as srv:
            login = subprocess.run([str(args.fw), "login", srv.login_key(KEY)], env=env, capture_output=True, text=True, timeout=120)
            if login.returncode != 0:
                raise SystemExit(f"fw login failed:\n{login.stdout}{login.stderr}")
            source = f"fw://{project.group}/{project.label}/"
            dest, tmp = work / "dropoff-fw", work / "fw-tmp"
            tmp.mkdir()
            runs += sync_pair("fw", lambda: fw_command(args.fw, source, dest, tmp), dest, expected, env, work, args.timeout, srv)
            runs += run_native(work, project, expected, env, args.timeout, srv)
            dest = work / "dropoff-floor"
            runs += sync_pair(
                "floor",
                lambda: floor_command(srv.base_url, project.id, dest),
                dest,
                expected,
                dict(env, FLOOR_API_KEY=KEY),
                work,
                args.timeout,
                srv,
                noop=False,
            )
            if args.skip_large:
                runs += [Run(f"native large {kind}", status="skipped (--skip-large)") for kind in ("full", "no-op")]
            else:
                big, big_expected = load_project("many", sizes["large"])
                header.append(f"- large project: {describe('many', sizes['large'], big_expected, big)}")
                srv.projects[:] = [big]  # served alone, like the main project
                runs += run_native(work, big, big_expected, env, args.timeout, srv, "large ")
        header += [
            f"- peers: fw = flywheel-cli {fw_version(args.fw)} `fw sync -j {JOBS}`; "
            f"native = `{' '.join(native_command(Path('CONFIG'))[1:])}`; "
            f"floor = {JOBS} threads, raw GET + unzip",
            "- server: FlywheelTestServer in the benchmark process on 127.0.0.1, TCP_NODELAY on (see bench/README.md)",
            "- peak RSS: max over time (50 ms samples) of the summed RSS of the process tree; MB = 10^6 bytes",
        ]
        text = table(runs, header)
        print("\n" + text)
        if not args.quick:
            benchlib.save_results(RESULTS, text)
        return 0
    finally:
        benchlib.leave(work, args.keep)


def fw_version(fw: Path) -> str:
    found = sorted(fw.parent.parent.glob("lib/python*/site-packages/flywheel_cli-*.dist-info"))
    name = found[-1].name if found else "flywheel_cli-(unknown version)"
    return name.removeprefix("flywheel_cli-").removesuffix(".dist-info")


if __name__ == "__main__":
    sys.exit(main())
