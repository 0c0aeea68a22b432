"""Benchmark the file:// source: clpipe's native engine copying a scanner export folder
against `cp -r` and `rsync -a` of the same folder, in one run, on the same data.

    .venv/bin/python bench/dicom_folder.py           # full run, writes bench/results/dicom_folder.md
    .venv/bin/python bench/dicom_folder.py --quick   # a small tree, every peer and check, nothing saved

The trees are clpipe's synthetic export (``clpipe.testing.dicomdata.make_file_tree``:
nested folders, text and JSON files mixed in, a file without preamble, duplicate copies),
cached in bench/.cache/ (delete it to reclaim ~750 MB): "MR slices" (5,107 instances of
256x256, 128 kB each, like real MR images) and "small files" (the same at 64x64, ~9 kB:
the per-file cost laid bare).

Peers, each a subprocess writing into a fresh folder, in rounds (cp, native, native with
one job, the clpipe command; then again), so a burst of load from other work on the
machine hits peers of the same round alike:

- ``cp -r TREE DEST``: every file of the tree, nothing checked (the floor);
- ``rsync -a TREE/ DEST/``: rsync's copy, then again into it (rsync's no-op: it compares
  size and time of every file, on both sides, and copies nothing);
- the Python floor (``python_floor.py``, no-op only, against rsync's copy): rsync's no-op
  checks written in plain Python (interpreter start, the walk, two ``stat`` calls a file)
  and nothing else: not a sync tool, the least any Python process can take, so that the
  native no-op's distance to rsync is split into what Python costs and what clpipe adds;
- native: ``dicom_folder_engine.py``, the engine with FolderSource as clpipe's runner
  drives it (the stamp's check, lock, manifest, listing cache, run, save, a new stamp)
  without the CLI around it;
  interpreter start and clpipe's imports included (not this benchmark's); its phases
  (listing, copying, saving the manifest), the jobs it ran (a local folder: no more than
  the CPUs, see FolderSource.max_jobs) and the headers served by the listing cache are
  in the table;
- ``clpipe dicom sync -c CONFIG -submit``: the whole command (config, logs, audit CSV);
- no-op: the same native or clpipe run again into the synced folder. "native no-op": the
  stamp the full run left (sync/quick.py) checked first, without the lock and before the
  engine is imported: the tree walked and each dropoff file stat'ed, nothing written.
  "native no-op, no stamp": the run as before the stamp (lock, manifest, the listing from
  the listing cache, the engine's check of each series); "no stamp nor listing cache":
  every header read again too (as before both).

The measured processes find their bytecode cached (as after ``pip install``; in the work
folder, PYTHONPYCACHEPREFIX), whatever PYTHONDONTWRITEBYTECODE says in the caller's
environment.

Before every run the benchmark calls ``sync`` (the previous run's dirty pages are not
written during the next). The trees stay in the page cache (dropping it needs
privileges). Each result is checked: cp's copy file by file against the tree's
description (DICOM files by SHA-256), native's dropoff for each instance once, byte for
byte. The goal (native full sync within 1.5x of cp -r) is judged on the median of the
rounds' native/cp ratios; the best-of-each ratio is shown beside it.
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
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib import MB, last_line, run_measured

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "dicom_folder.md"
ENGINE = BENCH / "dicom_folder_engine.py"  # one native run in a fresh process
FLOOR = BENCH / "python_floor.py"  # the least a Python process can do for a no-op
CACHE = BENCH / ".cache"
STATE_DIR = ".clpipe-sync"  # the native engine's bookkeeping in the dropoff: not a synced file
JOBS = 4
GOAL = 1.5  # native full sync time / cp -r time
NO_STAMP = "no-op, no stamp"  # the native no-op listing the tree from the listing cache (as before the stamp)
NO_CACHE = "no-op, no stamp nor listing cache"  # ... reading every header again (as before both)
# (label, make_file_tree scale, image rows = columns)
TREES = {
    "full": [("MR slices", 37, 256), ("small files", 37, 64)],
    "quick": [("quick", 2, 32)],  # ~280 files: the code paths, not the speed
}


# ---------------------------------------------------------------------------- data


def generator_digest() -> str:
    from clpipe.testing import dicomdata

    return hashlib.sha1(Path(dicomdata.__file__).read_bytes()).hexdigest()[:10]


def export_tree(label: str, scale: int, size: int, work: Path, cached: bool) -> tuple[Path, dict]:
    """The tree and its description; full runs keep it in bench/.cache/ (keyed by the
    arguments and the generator's source), quick runs make a small one in ``work``."""
    from clpipe.testing.dicomdata import load_expected, make_file_tree, write_expected

    base = CACHE if cached else work
    name = f"dicom-folder-s{scale}-r{size}-{generator_digest()}"
    tree, expected = base / name, base / f"{name}.expected.json"
    if expected.is_file() and tree.is_dir():
        return tree, load_expected(expected)
    print(f"making the {label} tree (scale {scale}, {size}x{size}) in {tree} ...", flush=True)
    partial = base / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    desc = make_file_tree(partial, scale=scale, rows=size, cols=size)
    os.replace(partial, tree)
    desc["root"] = str(tree)
    write_expected(desc, expected)  # written last: its presence says the tree is whole
    # a file changed less than RACY_NS ago is trusted by neither the listing cache nor the
    # stamp (sync/quick.py): a tree made now is left that long, as a real export would be
    from clpipe.sync.quick import RACY_NS

    time.sleep(RACY_NS / 1e9 + 0.2)
    return tree, desc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_copy(dest: Path, desc: dict) -> str:
    """``cp -r``: the same files as the tree, DICOM ones byte for byte."""
    want = {f["path"]: f.get("sha256") for f in desc["tree"]["dicom_files"]}
    want.update({f["path"]: None for f in desc["tree"]["other_files"]})
    got = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    missing, extra = sorted(want.keys() - got), sorted(got - want.keys())
    differ = sorted(rel for rel, sha in want.items() if sha and rel in got and _sha256(dest / rel) != sha)
    return _problems(missing, extra, differ)


def check_dropoff(dest: Path, desc: dict) -> str:
    """The native engine: each instance once, as ``<folder>/<SOPInstanceUID>.dcm``,
    byte for byte the instance's file."""
    want = {i["SOPInstanceUID"]: i["sha256"] for i in desc["instances"]}
    got: dict[str, list[Path]] = {}
    for path in dest.rglob("*.dcm"):
        if STATE_DIR not in path.relative_to(dest).parts:
            got.setdefault(path.name[:-4], []).append(path)
    others = [p for p in dest.rglob("*") if p.is_file() and STATE_DIR not in p.relative_to(dest).parts and p.suffix != ".dcm"]
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys()) + [str(p) for p in others]
    extra += [f"{uid} ({len(paths)} copies)" for uid, paths in got.items() if len(paths) > 1]
    differ = sorted(uid for uid, paths in got.items() if uid in want and _sha256(paths[0]) != want[uid])
    return _problems(missing, extra, differ)


def _problems(missing: list, extra: list, differ: list) -> str:
    found = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (("missing", missing), ("extra", extra), ("differ", differ)) if v]
    return "INVALID: " + ", ".join(found) if found else ""


# ---------------------------------------------------------------------------- the peers


def cp_command(tree: Path, dest: Path) -> list[str]:
    return ["cp", "-r", str(tree), str(dest)]


def rsync_command(tree: Path, dest: Path) -> list[str]:
    """rsync's own copy of a folder: every file, times and modes kept; again into the
    copy, it finds nothing to do (same size and time)."""
    return ["rsync", "-a", f"{tree}/", f"{dest}/"]


def floor_command(tree: Path, copy: Path) -> list[str]:
    """The least a Python process can do for a no-op (bench/python_floor.py): walk the tree
    and compare each file's size and time with its copy's, as rsync's no-op does; exits 1
    if a file differs."""
    return [sys.executable, str(FLOOR), str(tree), str(copy)]


def engine_command(tree: Path, dest: Path, jobs: int, kind: str = "full") -> list[str]:
    """The engine in a fresh process (bench/dicom_folder_engine.py: interpreter start and
    clpipe's imports counted, not this benchmark's); ``kind`` NO_STAMP or NO_CACHE: without
    the stamp, or without the stamp and the listing cache."""
    flags = {NO_STAMP: ["--no-stamp"], NO_CACHE: ["--no-cache"]}.get(kind, [])
    return [sys.executable, str(ENGINE), str(tree), str(dest), str(jobs), *flags]


def cli_project(work: Path, tree: Path, dest: Path, env: dict) -> Path | str:
    """A clpipe project (``clpipe project_setup``) whose SourceURL is the tree; or why not."""
    root = work / f"project-{dest.name}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clpipe",
            "project_setup",
            "-project_title",
            "bench",
            "-project_dir",
            str(root),
            "-source_url",
            "fw://lab/study/",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return f"clpipe project_setup failed: {last_line(proc.stdout + proc.stderr)}"
    config = root / "clpipe_config.json"
    data = json.loads(config.read_text())
    data["SourceOptions"].pop("LayoutTemplate", None)  # Flywheel's fields: the DICOM default layout instead
    data["SourceOptions"].update(SourceURL=tree.absolute().as_uri(), DropoffDirectory=str(dest), TempDirectory=str(root / "tmp"))
    config.write_text(json.dumps(data, indent=2))
    dry = subprocess.run(cli_command(config)[:-1], env=env, capture_output=True, text=True, timeout=120)
    if dry.returncode != 0:
        return last_line(dry.stdout + dry.stderr)
    return config


def cli_command(config: Path) -> list[str]:
    """What a user types (the last argument, -submit, makes it run)."""
    return [sys.executable, "-m", "clpipe", "dicom", "sync", "-c", str(config), "-submit"]


# ---------------------------------------------------------------------------- measuring


@dataclass
class Run:
    tree: str
    peer: str  # cp | native | clpipe
    kind: str  # full | no-op
    round: int
    files: int = 0
    nbytes: int = 0
    seconds: float | None = None
    rss_mb: float | None = None
    cpu: float | None = None
    status: str = "ok"
    phases: str = ""  # native: list / copy / save seconds
    import_s: float | None = None  # native: clpipe's imports
    list_s: float | None = None  # native: the listing, with the engine's check of each series

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def name(self) -> str:
        return f"{self.peer} {self.kind}"


def measure(run: Run, cmd: list[str], env: dict, log: Path, timeout: float) -> str:
    """Run ``cmd`` (benchlib.run_measured) after writing out the previous run's dirty pages.
    Returns its output; a non-zero exit or the timeout fails the run."""
    os.sync()  # the previous run's dirty pages are written now, not during this run
    m = run_measured(cmd, env, log, timeout)
    run.seconds, run.cpu, run.rss_mb = m.seconds, m.cpu, m.rss_mb
    run.status = m.failure(timeout) or run.status
    return m.output


def engine_report(run: Run, output: str, want_copied: int) -> None:
    """Read the engine's JSON line: phases for the table, counts for the check."""
    try:
        data = json.loads(last_line(output))
    except ValueError:
        if run.ok:
            run.status = f"FAILED: no report ({last_line(output)[:120]})"
        return
    run.import_s, run.list_s = data["import_s"], data["list_s"]
    run.phases = f"import {data['import_s']:.2f} / list {data['list_s']:.2f} / copy {data['copy_s']:.2f} / save {data['save_s']:.2f}"
    if data.get("jobs"):
        run.phases += f" ({data['jobs']} {'job' if data['jobs'] == 1 else 'jobs'})"
    if data.get("cached"):
        run.phases += f"; {data['cached']:,} headers from the listing cache"
    if data.get("stamp"):
        run.phases += "; nothing changed since the stamp (import: start-up to the check; list: the check)"
    copied = data["created"] + data["updated"]
    if run.ok and copied != want_copied:
        run.status = f"INVALID: copied {copied} instances, expected {want_copied}"


def timed_run(run: Run, cmd: list[str], env: dict, work: Path, timeout: float) -> str:
    print(f"  [{run.tree}, round {run.round}] {run.name} ...", end=" ", flush=True)
    slug = re.sub(r"\W+", "-", f"{run.tree}-{run.round}-{run.name}").strip("-")
    output = measure(run, cmd, env, work / f"{slug}.log", timeout)
    print(f"{run.seconds:.2f} s, {run.rss_mb:.0f} MB, {run.status}", flush=True)
    return output


def bench_tree(label: str, tree: Path, desc: dict, work: Path, env: dict, rounds: int, jobs: int, timeout: float) -> list[Run]:
    """``rounds`` x (cp -r, native full + no-op, native with one job, clpipe CLI full +
    no-op), each into a fresh folder."""
    instances, nbytes = desc["counts"]["instances"], desc["counts"]["bytes"]
    tree_files = len(desc["tree"]["dicom_files"]) + len(desc["tree"]["other_files"])
    tree_bytes = sum(f["size"] for f in desc["tree"]["dicom_files"] + desc["tree"]["other_files"])
    slug = re.sub(r"\W+", "-", label)
    cp_dest, native_dest, cli_dest = work / f"{slug}-cp", work / f"{slug}-native", work / f"{slug}-cli"
    config = cli_project(work, tree, cli_dest, env)
    runs: list[Run] = []
    for n in range(1, rounds + 1):
        shutil.rmtree(cp_dest, ignore_errors=True)
        run = Run(label, "cp -r", "full", n, tree_files, tree_bytes)
        timed_run(run, cp_command(tree, cp_dest), env, work, timeout)
        if run.ok:
            run.status = check_copy(cp_dest, desc) or "ok"
        runs.append(run)
        shutil.rmtree(cp_dest, ignore_errors=True)

        for kind in ("full", "no-op"):  # rsync -a, then again into its copy (nothing to do)
            run = Run(label, "rsync -a", kind, n, tree_files, tree_bytes if kind == "full" else 0)
            if not shutil.which("rsync"):
                run.status = "not available: rsync is not installed"
            else:
                timed_run(run, rsync_command(tree, cp_dest), env, work, timeout)
                if run.ok:
                    run.status = check_copy(cp_dest, desc) or "ok"
            runs.append(run)
        run = Run(label, "Python floor", "no-op", n, tree_files, 0)  # rsync's no-op checks, in Python, nothing else
        if not cp_dest.is_dir():
            run.status = "not available: no rsync copy to compare with"
        else:
            timed_run(run, floor_command(tree, cp_dest), env, work, timeout)
        runs.append(run)
        shutil.rmtree(cp_dest, ignore_errors=True)

        for peer, peer_jobs, kinds in (("native", jobs, ("full", "no-op", NO_STAMP, NO_CACHE)), ("native jobs=1", 1, ("full",))):
            shutil.rmtree(native_dest, ignore_errors=True)
            for kind in kinds:
                run = Run(label, peer, kind, n, instances, nbytes if kind == "full" else 0)
                output = timed_run(run, engine_command(tree, native_dest, peer_jobs, kind), env, work, timeout)
                engine_report(run, output, instances if kind == "full" else 0)
                if run.ok:
                    run.status = check_dropoff(native_dest, desc) or "ok"
                runs.append(run)
            shutil.rmtree(native_dest, ignore_errors=True)

        for kind in ("full", "no-op"):
            run = Run(label, "clpipe dicom sync", kind, n, instances, nbytes if kind == "full" else 0)
            if isinstance(config, str):
                run.status = f"not available: {config}"
            else:
                if kind == "full":
                    shutil.rmtree(cli_dest, ignore_errors=True)
                timed_run(run, cli_command(config), env, work, timeout)
                if run.ok:
                    run.status = check_dropoff(cli_dest, desc) or "ok"
            runs.append(run)
        shutil.rmtree(cli_dest, ignore_errors=True)
    return runs


# ---------------------------------------------------------------------------- reporting


def best(runs: list[Run], tree: str, name: str) -> Run | None:
    done = [r for r in runs if r.tree == tree and r.name == name and r.ok]
    return min(done, key=lambda r: r.seconds) if done else None


def median_of(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def paired(runs: list[Run], tree: str, name: str, base: str = "cp -r full") -> list[float]:
    """``name`` / ``base`` of the same round, round by round: the two ran back to back, so a
    burst of load from other work on the machine tends to hit both."""
    rounds: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.tree == tree and r.ok and r.name in (name, base):
            rounds.setdefault(r.round, {})[r.name] = r.seconds
    return [p[name] / p[base] for _, p in sorted(rounds.items()) if len(p) == 2]


def goals(runs: list[Run], trees: list[str]) -> list[tuple[str, str, str, str]]:
    """The goal on the median of the round-by-round ratios (robust to a load burst in one
    round); the best-of-each ratio and the per-round ratios beside it."""
    rows = []
    for tree in trees:
        cp = best(runs, tree, "cp -r full")
        for name, target in (
            ("native full", f"<= {GOAL}"),
            ("native jobs=1 full", "(for information)"),
            ("clpipe dicom sync full", "(for information)"),
        ):
            what = f"{tree}: {name} / cp -r full, median of the rounds' ratios"
            ratios, peer = paired(runs, tree, name), best(runs, tree, name)
            if not ratios or cp is None or peer is None:
                rows.append((what, "n/a", target, "n/a (a run failed, see above)"))
                continue
            value = median_of(ratios)
            detail = f"{value:.2f} (best of each: {peer.seconds / cp.seconds:.2f}; rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
            verdict = ("met" if value <= GOAL else "NOT met") if target.startswith("<=") else ""
            rows.append((what, detail, target, verdict))
        for name, base, target in (  # issue 15: no slower than rsync -a, full and no-op
            ("native full", "rsync -a full", "<= 1.0"),
            ("native no-op", "rsync -a no-op", "<= 1.0"),
            ("Python floor no-op", "rsync -a no-op", "(for information: the least a Python process can do)"),
            ("native no-op", "Python floor no-op", "(for information)"),
            (f"native {NO_STAMP}", "rsync -a no-op", "(for information: before the stamp)"),
            (f"native {NO_CACHE}", "rsync -a no-op", "(for information: before the stamp and the listing cache)"),
            ("clpipe dicom sync full", "rsync -a full", "(for information)"),
            ("clpipe dicom sync no-op", "rsync -a no-op", "(for information)"),
        ):
            what = f"{tree}: {name} / {base}, median of the rounds' ratios"
            ratios, peer, ref = paired(runs, tree, name, base), best(runs, tree, name), best(runs, tree, base)
            if not ratios or ref is None or peer is None:
                rows.append((what, "n/a", target, "n/a (a run failed or was not available, see above)"))
                continue
            value = median_of(ratios)
            detail = (
                f"{value:.2f} (best of each: {peer.seconds:.2f} s / {ref.seconds:.2f} s = {peer.seconds / ref.seconds:.2f}; "
                f"rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
            verdict = ("met" if value <= 1.0 else "NOT met") if target.startswith("<=") else ""
            rows.append((what, detail, target, verdict))
    return rows


def rsync_version() -> str:
    if not shutil.which("rsync"):
        return "not installed"
    out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"version (\S+)", out)
    return f"rsync {found[1] if found else '?'}"


def machine() -> str:
    fs = subprocess.run(["stat", "-f", "-c", "%T", tempfile.gettempdir()], capture_output=True, text=True).stdout.strip()
    return f"{benchlib.machine()}, work folder on {fs or '?'}, load average at start {os.getloadavg()[0]:.1f}"


def table(runs: list[Run], header: list[str], trees: list[str]) -> str:
    out = header + [
        "",
        "| tree | round | run | seconds | files/s | MB/s | peak RSS (MB) | CPU s | native phases (s) | result |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in runs:
        if r.seconds is None:
            out.append(f"| {r.tree} | {r.round} | {r.name} | | | | | | | {r.status} |")
            continue
        done = not r.status.startswith(("FAILED", "TIMEOUT"))
        fps = f"{r.files / r.seconds:,.0f}" if done else "-"
        mbs = f"{r.nbytes / MB / r.seconds:.1f}" if done and r.nbytes else "-"
        rss = f"{r.rss_mb:.0f}" if r.rss_mb else "-"  # (a run that ended before the first 50 ms sample)
        out.append(f"| {r.tree} | {r.round} | {r.name} | {r.seconds:.2f} | {fps} | {mbs} | {rss} | {r.cpu:.2f} | {r.phases} | {r.status} |")
    out += ["", "| goal | value | target | verdict |", "| --- | ---: | --- | --- |"]
    out += [f"| {' | '.join(g)} |" for g in goals(runs, trees)]
    out += no_op_breakdown(runs, trees)
    return "\n".join(out) + "\n"


def no_op_breakdown(runs: list[Run], trees: list[str]) -> list[str]:
    """Where the native no-op's seconds go (medians over the rounds), beside rsync's."""
    lines = []
    for tree in trees:
        done = [r for r in runs if r.tree == tree and r.name == "native no-op" and r.ok and r.list_s is not None]
        rsync = [r.seconds for r in runs if r.tree == tree and r.name == "rsync -a no-op" and r.ok and r.seconds is not None]
        floor = [r.seconds for r in runs if r.tree == tree and r.name == "Python floor no-op" and r.ok and r.seconds is not None]
        if not done or not rsync:
            continue
        total = median_of([r.seconds for r in done if r.seconds is not None])
        imports = median_of([r.import_s for r in done if r.import_s is not None])
        listing = median_of([r.list_s for r in done if r.list_s is not None])
        lines.append(
            f"- {tree}, where the native no-op's {total:.2f} s go (medians): the stamp module's import {imports:.2f} s, "
            f"the stamp's check (the walk, a `stat` of each file on both sides) {listing:.2f} s, the rest (interpreter "
            f"start, exit) {max(0.0, total - imports - listing):.2f} s; rsync's whole no-op: {median_of(rsync):.2f} s"
            + (f"; the Python floor (start, walk, rsync's two `stat` calls a file): {median_of(floor):.2f} s" if floor else "")
        )
    return ["", *lines] if lines else []


def describe(label: str, desc: dict, scale: int, size: int) -> str:
    c, t = desc["counts"], desc["tree"]
    other = len(t["other_files"])
    total = sum(f["size"] for f in t["dicom_files"] + t["other_files"])
    return (
        f"{label}: `make_file_tree(scale={scale}, rows=cols={size})`: {len(t['dicom_files']) + other:,} files "
        f"({total / MB:,.1f} MB) in nested folders, of which {c['instances']:,} instances ({c['bytes'] / MB:,.1f} MB) "
        f"in {c['series']} series, {len(t['duplicates'])} duplicate copies, {other} non-DICOM files"
    )


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small tree, one round, results not saved")
    ap.add_argument("--rounds", type=int, help="times each peer runs (default 5; --quick: 1)")
    ap.add_argument("--jobs", type=int, default=JOBS, help=f"native engine's parallel series, at most (default {JOBS})")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    ap.add_argument(
        "--workdir",
        type=Path,
        help="where the copies go (default: a temp folder; put it on the filesystem you care about: the trees are read from bench/.cache/)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    rounds = args.rounds or (1 if args.quick else 5)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="clpipe-bench-folder-", dir=args.workdir))
    env = dict(os.environ, PYTHONWARNINGS="ignore", HOME=str(work / "home"))
    # bytecode cached, as after `pip install` (the first run of each peer writes it, in the work folder)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    (work / "home").mkdir()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    try:
        runs: list[Run] = []
        lines = []
        for label, scale, size in TREES[mode]:
            tree, desc = export_tree(label, scale, size, work, cached=not args.quick)
            lines.append(describe(label, desc, scale, size))
            runs += bench_tree(label, tree, desc, work, env, rounds, args.jobs, args.timeout)
        header = [
            "# dicom_folder benchmark: the file:// source",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
            *[f"- tree {line}" for line in lines],
            f"- peers, alternating, {rounds} round(s), each into a fresh folder after `sync`: `cp -r TREE DEST`; "
            f"`rsync -a TREE/ DEST/` ({rsync_version()}), then the same again into its copy (rsync no-op: nothing to do); "
            "Python floor = `bench/python_floor.py TREE COPY` against rsync's copy: rsync's no-op checks (walk, size and "
            "time of each file on both sides) in plain Python and nothing else, the least a Python process can take; "
            f"native = the engine with FolderSource, jobs={args.jobs} (native jobs=1: one job; for a folder whose reading "
            "does not wait on I/O the engine runs at most as many series at once as there are CPUs: the jobs it ran "
            "are in the phases column), in a fresh Python process "
            "(`bench/dicom_folder_engine.py`: interpreter start and clpipe's imports included); `clpipe dicom sync -c CONFIG "
            "-submit` = the whole command (config, log, audit CSV and summary included); no-op = the same again "
            "into the synced folder: native no-op = the stamp's check (sync/quick.py: the walk of the tree and a `stat` "
            "of each file the last run left in the dropoff, compared with the stamp that run wrote; no lock taken, "
            "nothing written, clpipe's engine not imported) finding nothing changed, then the last run's counts; "
            f"native {NO_STAMP} = the run as before the stamp, the file headers served by the listing cache in the "
            f"dropoff's state folder (lock, manifest, the engine's check of each series); native {NO_CACHE}: every "
            "header read again, as before the cache; the clpipe command's no-op checks the stamp under its lock, after "
            "its own imports, config and logs",
            "- bytecode cached for the measured processes (as after `pip install`): PYTHONPYCACHEPREFIX in the work folder",
            "- the trees are in the page cache for every peer (they are read before the first run); "
            "dropping the cache needs privileges a shared machine does not give",
            "- files/s and MB/s: files and bytes written (cp -r: every file of the tree; native: each instance once)",
            "- native phases: clpipe's imports; the listing (walk, stat, headers) with the engine's check of each series "
            "against the manifest and the dropoff, made as the listing streams in; the copies; saving the manifest; "
            "the rest of the seconds is the interpreter's start, the lock and the exit (native no-op: the stamp "
            "module's import, then its check as the listing)",
            "- peak RSS: sampled every 50 ms; `-` for a run that ended before the first sample",
        ]
        text = table(runs, header, [label for label, _, _ in TREES[mode]])
        print()
        print(text)
        if args.quick:
            print("(--quick: results not saved)")
        else:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(text)
            print(f"saved {RESULTS.relative_to(ROOT)}")
        bad = [r for r in runs if not r.ok and not r.status.startswith("not available")]
        return 1 if bad else 0
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
