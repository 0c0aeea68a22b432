"""Reliability of `clpipe dicom flywheel_sync` / `clpipe dicom sync`: kills, network faults,
full and read-only disks, concurrent runs, bad input, hostile names and secrets, each run as a
user runs it (a real `python -m clpipe ... -submit` subprocess, local run, no batch system).

    .venv/bin/python bench/reliability.py           # full run (~6 min on 2 cores, as root), writes bench/results/reliability.md
    .venv/bin/python bench/reliability.py --quick   # a few of each (~1 min), nothing saved

It prints one document of tables and ends with the totals of the done criteria of issue 11
(corrupted files, silently lost files, internal errors, leaked secrets: all must be 0).
bench/README.md explains every column. Servers: the bundled Flywheel test server (in this
process), the test Orthanc of scripts/infra/dicom-up.sh (DICOMweb and DIMSE) and a folder
made with clpipe.testing.dicomdata; everything on 127.0.0.1. Disk scenarios need root
(tmpfs and read-only bind mounts), the secrets scenario needs strace.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unicodedata
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
import reliabilitylib as rl
from benchlib import machine

from clpipe.testing import dicomdata, fwserver
from clpipe.testing.faultproxy import FaultProxy

fwserver._Handler.disable_nagle_algorithm = True  # as bench/flywheel_sync.py: no 40 ms per request

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "reliability.md"
KEY = "reliability-bench-key"
FILES = r"^/api/containers/[^/]+/files/[^/]+$"  # a Flywheel file download
RETRIEVE = r"^/dicom-web/studies/[^/]+/series/[^/]+$"  # a DICOMweb series retrieval (WADO-RS)
QIDO = r"^/dicom-web/(studies|series)$"  # a DICOMweb search
DICOM_VARS = ("CLPIPE_ORTHANC_HTTP", "CLPIPE_ORTHANC_DICOMWEB", "CLPIPE_ORTHANC_DIMSE", "CLPIPE_DICOM_DATA", "CLPIPE_DICOM_EXPECTED")

MODES: dict[str, dict[str, Any]] = {
    "full": dict(
        kills={"Flywheel native": 20, "DICOMweb": 10, "DIMSE": 10, "file://": 10},
        pairs=3,
        stall=70.0,
        tree_scale=4,
        bad_every=1,
        names="all",
        disk="all",
        secrets="all",
    ),
    "quick": dict(
        kills={"Flywheel native": 3, "DICOMweb": 2, "DIMSE": 2, "file://": 2},
        pairs=1,
        stall=0.0,
        tree_scale=1,
        bad_every=7,
        names="few",
        disk="few",
        secrets="few",
    ),
}
# projects of the Flywheel test server (make_demo_project arguments)
KILL_PROJECT: dict[str, Any] = dict(label="kills", subjects=2, sessions=2, acquisitions=4, slices=12, rows=64, cols=64, fast=True)
SMALL_PROJECT: dict[str, Any] = dict(label="small", subjects=2, sessions=1, acquisitions=3, slices=6, rows=32, cols=32, fast=True)


# ------------------------------------------------------------------------------ the report


@dataclass
class Section:
    title: str
    intro: list[str]
    header: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.intro:
            lines += [*self.intro, ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("| " + " | ".join("---" for _ in self.header) + " |")
        for row in self.rows:
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines) + "\n"


def cell(value: object) -> str:
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 220 else text[:217] + "..."


@dataclass
class Totals:
    corrupted: list[str] = field(default_factory=list)  # "where: n"
    lost: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)

    @staticmethod
    def _sum(items: list[str]) -> int:
        return sum(int(x.rsplit(": ", 1)[1]) for x in items)


# ------------------------------------------------------------------------------ context


class Ctx:
    """What every scenario shares: the work folder, the runs made, the totals."""

    def __init__(self, args: argparse.Namespace, work: Path, stack: ExitStack):
        self.args, self.work, self.stack = args, work, stack
        self.mode = MODES["quick" if args.quick else "full"]
        self.rng = random.Random(args.seed)
        self.timeout = args.timeout
        self.runs: list[tuple[str, rl.Result]] = []  # (scenario, result) of every run
        self.totals = Totals()
        self.sections: list[Section] = []
        self.dicom = dicom_env()
        self.dicom_problem = "" if self.dicom else ('DICOM test servers not set up (run `eval "$(scripts/infra/dicom-up.sh)"` as root)')
        self._n = 0
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path:
        with self._lock:  # the stall row runs in a thread of its own
            self._n += 1
            n = self._n
        path = self.work / f"{n:04d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:60]}"
        path.mkdir(parents=True)
        return path

    def record(self, scenario: str, result: rl.Result) -> rl.Result:
        self.runs.append((scenario, result))
        return result

    def run(
        self,
        scenario: str,
        argv: list[str],
        env: dict,
        timeout: float | None = None,
        cwd: Path | None = None,
        prefix: list[str] | None = None,
    ) -> rl.Result:
        return self.record(scenario, rl.run(argv, env, timeout or self.timeout, cwd=cwd, prefix=prefix))

    def cleanup(self, path: Path) -> None:
        if not self.args.keep:
            shutil.rmtree(path, ignore_errors=True)

    def server(self, projects: list, keys: set[str] | None = None) -> fwserver.FlywheelTestServer:
        srv = fwserver.FlywheelTestServer(projects, api_keys=keys or {KEY})
        self.stack.enter_context(srv)
        return srv


def dicom_env() -> dict[str, str]:
    """The exports of scripts/infra/dicom-up.sh: from the environment, else from its env.sh
    (as tests/conftest.py reads them), else from /tmp/dicom.env; {} when not set up."""
    names = (*DICOM_VARS, "CLPIPE_DCMQRSCP_DIMSE")  # dcmqrscp: a PACS that checks the called AE title
    env = {k: os.environ[k] for k in names if os.environ.get(k)}
    for path in (Path(os.environ.get("CLPIPE_INFRA", "/tmp/clpipe-infra")) / "dicom" / "env.sh", Path("/tmp/dicom.env")):
        if all(k in env for k in DICOM_VARS) or not path.is_file():
            continue
        found = dict(re.findall(r"^export (\w+)=(.*)$", path.read_text(), re.MULTILINE))
        env = {k: found[k] for k in names if k in found}
    ok = all(k in env for k in DICOM_VARS) and Path(env["CLPIPE_DICOM_EXPECTED"]).is_file()
    return env if ok else {}


def fw_home(folder: Path, login: str | None) -> Path:
    """A HOME whose saved Flywheel login (the file `fw login` writes) is ``login``."""
    home = folder / "home"
    (home / ".config" / "flywheel").mkdir(parents=True, exist_ok=True)
    if login is not None:
        (home / ".config" / "flywheel" / "user.json").write_text(json.dumps({"key": login}))
    return home


def write_config(folder: Path, url: str, dropoff: Path | None = None, project: Path | None = None, **source: Any) -> Path:
    """A legacy clpipe_config.json as `clpipe project_setup` writes it (its keys and defaults),
    with the SourceOptions given; ``None`` values remove a key."""
    project = project or folder / "project"
    project.mkdir(parents=True, exist_ok=True)
    options = {
        "SourceURL": url,
        "DropoffDirectory": str(dropoff or project / "data_DICOMs"),
        "TempDirectory": str(project / "flywheel_tmp"),
        "CommandLineOpts": "-y",
        "TimeUsage": "1:0:0",
        "MemUsage": "10000",
        "CoreUsage": "1",
    }
    for key, value in source.items():
        if value is None:
            options.pop(key, None)
        else:
            options[key] = value
    config = {
        "ProjectTitle": "reliability",
        "Authors/Contributors": "SET AUTHOR",
        "ProjectDirectory": str(project),
        "EmailAddress": "SET EMAIL ADDRESS",
        "SourceOptions": options,
        "DICOMToBIDSOptions": {"DICOMDirectory": options["DropoffDirectory"]},
        "BatchConfig": "",
    }
    path = folder / "clpipe_config.json"
    path.write_text(json.dumps(config, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ sources


@dataclass
class Kind:
    """One source kind as the kill, fault and disk scenarios use it."""

    name: str
    url: str
    command: str  # "flywheel_sync" or "sync"
    login: str | None = None  # the saved Flywheel login
    source: dict = field(default_factory=dict)  # extra SourceOptions
    truth: Callable[[Path], str] | None = None  # checks a reference dropoff against the source: "" or a problem
    reference: dict[str, str] = field(default_factory=dict)  # relative path -> digest, from a clean run
    ref_dropoff: Path | None = None
    ref_result: rl.Result | None = None
    t_lock: float | None = None  # seconds after the start when the clean run held the lock
    t_end: float = 0.0
    problem: str = ""  # why this kind cannot be measured

    def argv(self, config: Path) -> list[str]:
        return rl.clpipe("dicom", self.command, "-c", str(config), "-submit")

    def env(self, ctx: Ctx, folder: Path) -> dict:
        return rl.base_env(fw_home(folder, self.login))

    def trial(self, ctx: Ctx, name: str, dropoff: Path | None = None, **source: Any) -> tuple[Path, list[str], dict, Path]:
        """A fresh project for one run: (folder, argv, env, dropoff)."""
        folder = ctx.folder(f"{self.name}-{name}")
        dropoff = dropoff or folder / "dropoff"
        config = write_config(folder, self.url, dropoff, **{**self.source, **source})
        return folder, self.argv(config), self.env(ctx, folder), dropoff


def flywheel_kind(ctx: Ctx, srv: fwserver.FlywheelTestServer, label: str, name: str = "Flywheel native") -> Kind:
    project = srv.project(label)
    expected = {rel: rl.digest(data) for rel, data in project.expected_dicom_paths(strip_root=True).items()}
    contents = sorted(expected.values())

    def truth(dropoff: Path) -> str:
        found = rl.digests(dropoff)
        if found == expected:
            return ""
        if sorted(found.values()) == contents:
            return "same bytes as the project's DICOM files, under other names than fw's"
        missing, extra = len(set(expected) - set(found)), len(set(found) - set(expected))
        differ = sum(1 for k in set(found) & set(expected) if found[k] != expected[k])
        return f"differs from the project: {missing} missing, {extra} extra, {differ} differ"

    return Kind(name, f"fw://{project.group}/{project.label}/", "flywheel_sync", login=srv.login_key(KEY), truth=truth)


def dicom_truth(records: list[dict], root: Path) -> Callable[[Path], str]:
    """A check that a dropoff holds each instance once, as ``<SOPInstanceUID>.dcm``, with the
    data set of the generated file (file meta aside: a server writes its own)."""
    want = {r["SOPInstanceUID"]: root / r["path"] for r in records}

    def truth(dropoff: Path) -> str:
        found: dict[str, Path] = {}
        extra = 0
        for rel, path in rl.synced_files(dropoff).items():
            uid = Path(rel).name.removesuffix(".dcm")
            if uid in want and uid not in found:
                found[uid] = path
            else:
                extra += 1
        differ = sum(1 for uid, path in found.items() if not rl.same_dataset(path.read_bytes(), want[uid].read_bytes()))
        missing = len(set(want) - set(found))
        return "" if not (differ or missing or extra) else f"{missing} instances missing, {differ} differ, {extra} extra files"

    return truth


def dicom_kinds(ctx: Ctx, tree_root: Path, tree_desc: dict) -> list[Kind]:
    kinds = []
    if ctx.dicom:
        expected = dicomdata.load_expected(ctx.dicom["CLPIPE_DICOM_EXPECTED"])
        truth = dicom_truth(expected["instances"], Path(ctx.dicom["CLPIPE_DICOM_DATA"]))
        query = {"Query": {"PatientID": "SUB*"}}  # the benchmarks' BENCH* patients are left out
        kinds.append(Kind("DICOMweb", "dicomweb+" + ctx.dicom["CLPIPE_ORTHANC_DICOMWEB"], "sync", source=query, truth=truth))
        kinds.append(Kind("DIMSE", "dimse://" + ctx.dicom["CLPIPE_ORTHANC_DIMSE"], "sync", source=query, truth=truth))
    else:
        kinds += [Kind("DICOMweb", "", "sync", problem=ctx.dicom_problem), Kind("DIMSE", "", "sync", problem=ctx.dicom_problem)]
    kinds.append(Kind("file://", f"file://{tree_root}", "sync", truth=dicom_truth(tree_desc["instances"], tree_root)))
    return kinds


def calibrate(ctx: Ctx, kind: Kind) -> None:
    """A clean run into a fresh dropoff: the reference every other run of this kind is judged
    by (checked against the source itself), and the timings the kills are spread over."""
    if kind.problem:
        return
    _folder, argv, env, dropoff = kind.trial(ctx, "reference")
    result, seen = rl.run_and_kill(argv, env, delay=ctx.timeout, watch=dropoff / rl.STATE_DIR / "lock", limit=ctx.timeout)
    ctx.record(f"reference {kind.name}", result)
    kind.ref_result, kind.ref_dropoff = result, dropoff
    kind.t_lock, kind.t_end = seen, result.seconds
    if result.code != 0:
        kind.problem = f"the clean reference run failed (exit {result.status}): {result.message()}"
        return
    kind.reference = rl.digests(dropoff)
    if not kind.reference:
        kind.problem = "the clean reference run wrote no files"


# ------------------------------------------------------------------------------ scenario: kills


def kills(ctx: Ctx, kinds: list[Kind]) -> None:
    section = Section(
        "Kills",
        [
            "Each kill: a real run in its own process group, `SIGKILL` to the whole group after a random delay "
            "(seeded: a quarter of them before the moment the reference run took the dropoff's lock, counted from the "
            "start; the rest counted from the moment the lock appears, spread over the rest of the reference run's time), "
            "then a final clean run into the same dropoff. Flywheel downloads are slowed to 0.25 s each. Kills that came "
            "after the run had ended are not counted (attempts shows them). Files are judged against the clean reference "
            "run of the same source, which is itself checked against the source (see *Reference runs*).",
        ],
        [
            "source",
            "kills (attempts)",
            "killed holding the lock",
            "corrupted files after a kill",
            "partial hidden files after a kill",
            "re-fetched files that had landed whole",
            "final run exit statuses",
            "lock problems",
            "after the final run: missing / corrupted",
            "internal errors",
        ],
    )
    for kind in kinds:
        wanted = ctx.mode["kills"][kind.name]
        if kind.problem:
            section.rows.append([kind.name, f"not measured: {kind.problem}", *[""] * 8])
            continue
        t_lock = kind.t_lock if kind.t_lock is not None else 0.0
        landed = attempts = holding = corrupted = hidden = refetched = lock_problems = missing_after = bad_after = 0
        internal = 0
        statuses: dict[str, int] = {}
        examples: list[str] = []
        refetch_unknown = 0
        while landed < wanted and attempts < 2 * wanted + 5:
            attempts += 1
            early = ctx.rng.random() < 0.25 and t_lock > 0.05
            # before the lock: from the start; after it: from the moment the lock appears, so
            # that a slower start (a loaded machine) does not move the kill out of the transfer
            delay = ctx.rng.uniform(0.05, t_lock) if early else ctx.rng.uniform(0.0, max(kind.t_end - t_lock, 0.05))
            folder, argv, env, dropoff = kind.trial(ctx, f"kill{attempts}")
            killed, _ = rl.run_and_kill(
                argv,
                env,
                delay=delay,
                watch=dropoff / rl.STATE_DIR / "lock",
                after_watch=not early and kind.t_lock is not None,
                limit=ctx.timeout,
            )
            ctx.record(f"kill {kind.name}", killed)
            if not killed.killed:
                ctx.cleanup(folder)
                continue
            landed += 1
            if (dropoff / rl.STATE_DIR / "lock").exists():
                holding += 1
            after = rl.check(dropoff, kind.reference)
            corrupted += after.bad
            hidden += len(after.hidden)
            when = f"{delay:.2f} s after {'the start' if early else 'the lock'}"
            examples += [f"after kill {landed} ({when}): {p}" for p in (after.corrupted + after.unexpected)[:2]]
            final = ctx.run(f"final run after a kill, {kind.name}", argv, env)
            statuses[final.status] = statuses.get(final.status, 0) + 1
            internal += final.internal or killed.internal
            if final.code != 0 and rl.LOCK_BUSY in final.output:
                lock_problems += 1
            fetched = rl.fetched_paths(final)
            if fetched is None:
                refetch_unknown += 1
            else:
                refetched += len(fetched & after.whole)
            end = rl.check(dropoff, kind.reference)
            bad_after += end.bad
            missing_after += len(end.missing)
            if final.code == 0 and end.missing:
                ctx.totals.lost.append(f"kills {kind.name}: {len(end.missing)}")
            if final.code != 0 and len(examples) < 6:
                examples.append(f"final run after kill {landed} ({when}): exit {final.status}: {final.message()}")
            ctx.cleanup(folder)
        if corrupted + bad_after:
            ctx.totals.corrupted.append(f"kills {kind.name}: {corrupted + bad_after}")
        section.rows.append(
            [
                kind.name,
                f"{landed} ({attempts})",
                holding,
                corrupted,
                hidden,
                f"{refetched}" + (f" ({refetch_unknown} final runs wrote no audit CSV)" if refetch_unknown else ""),
                ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())),
                lock_problems,
                f"{missing_after} / {bad_after}",
                internal,
            ]
        )
        section.notes += [f"- {kind.name}: {e}" for e in examples[:6]]
    ctx.sections.append(section)


def references(ctx: Ctx, kinds: list[Kind]) -> None:
    section = Section(
        "Reference runs",
        [
            "One clean run per source into an empty dropoff; every other run of that source is judged "
            "against its files. Checked against the source: Flywheel, the project's DICOM files as `fw sync` lays them out; "
            "DICOM sources, each instance once as `<SOPInstanceUID>.dcm` with the generated data set (file meta aside). "
            "The times of `fw://lab/kills/` are those of a second clean run with downloads slowed to 0.25 s each, as in the kills."
        ],
        ["source", "SourceURL", "exit", "files", "seconds", "lock taken after (s)", "matches the source"],
    )
    for kind in kinds:
        if kind.ref_result is None:
            section.rows.append([kind.name, kind.url or "-", "-", "-", "-", "-", f"not run: {kind.problem}"])
            continue
        verdict = kind.problem or (kind.truth(kind.ref_dropoff) if kind.truth and kind.ref_dropoff else "") or "yes"
        section.rows.append(
            [
                kind.name,
                f"`{kind.url}`",
                kind.ref_result.status,
                len(kind.reference),
                f"{kind.t_end:.2f}",
                "-" if kind.t_lock is None else f"{kind.t_lock:.2f}",
                verdict,
            ]
        )
    ctx.sections.append(section)


# ------------------------------------------------------------------------------ scenario: faults


def faults(ctx: Ctx, small: Kind, srv: fwserver.FlywheelTestServer, dicomweb: Kind | None) -> None:
    section = Section(
        "Network faults",
        [
            "Each row: a fresh dropoff, one fault switched on for the first 2 matching requests (transient), one run. "
            "Flywheel: the test server's fault switches (`FlywheelTestServer.add_fault`) on file downloads "
            f"(`{FILES}`) unless the row says otherwise; DICOMweb: `clpipe.testing.faultproxy.FaultProxy` between the "
            f"run and Orthanc, on series retrievals (`{RETRIEVE}`) unless the row says otherwise. Expected: exit 0, every file identical."
        ],
        ["source", "fault", "requests hit", "exit", "identical files", "differing files", "missing files", "result"],
    )
    rows: list[tuple[str, str, str, dict[str, Any]]] = [
        ("HTTP 500", FILES, "status", dict(status=500)),
        ("HTTP 503 + Retry-After: 1", FILES, "status", dict(status=503, retry_after="1")),
        ("HTTP 429", FILES, "status", dict(status=429)),
        ("reset before headers (closed, no reply)", FILES, "drop", {}),
        ("reset mid-body (TCP RST after half the body)", FILES, "reset", {}),
        ("truncated body (half, then a clean close)", FILES, "truncate", {}),
        ("flipped bytes, same length (single DICOM files)", r"/files/localizer\.dcm$", "corrupt", {}),
        ("flipped bytes, same length (zips)", r"\.zip$", "corrupt", {}),
        ("HTTP 503 on the listing (download/targets)", r"^/api/download/targets$", "status", dict(status=503)),
    ]
    if "span" in fwserver.FlywheelTestServer.add_fault.__code__.co_varnames:
        rows.append(("flipped zip header (version needed, bytes 4-5)", r"\.zip$", "corrupt", dict(span=(4, 6))))
    if ctx.args.quick:
        rows = [rows[0], rows[4], rows[6]]
    stall_thread = None
    stall_row: list = []
    if ctx.mode["stall"] and not small.problem:
        stall_srv = ctx.server([fwserver.make_demo_project(**SMALL_PROJECT)])
        stall_kind = flywheel_kind(ctx, stall_srv, "small", "Flywheel native")
        stall_kind.reference = small.reference

        def stall() -> None:
            try:
                stall_row.extend(
                    fault_row(
                        ctx,
                        stall_kind,
                        stall_srv,
                        f"stall {ctx.mode['stall']:.0f} s (longer than the 60 s read timeout)",
                        FILES,
                        "delay",
                        dict(delay=ctx.mode["stall"]),
                        timeout=ctx.mode["stall"] * 3 + 60,
                    )
                )
            except Exception as exc:  # noqa: BLE001 - reported in the row
                stall_row.extend(["Flywheel native", "stall", "", "", "", "", "", f"harness error: {exc!r}"])

        stall_thread = threading.Thread(target=stall, daemon=True)
        stall_thread.start()
    for label, pattern, kind, kw in rows:
        if small.problem:
            section.rows.append(["Flywheel native", label, "", "", "", "", "", f"not measured: {small.problem}"])
            continue
        section.rows.append(fault_row(ctx, small, srv, label, pattern, kind, kw))
    if stall_thread is not None:
        stall_thread.join(ctx.mode["stall"] * 3 + 120)
        section.rows.append(stall_row or ["Flywheel native", "stall", "", "", "", "", "", "harness: did not finish"])
    elif not ctx.mode["stall"]:
        section.notes.append("- stall: not run in --quick (it waits out the native engine's 60 s read timeout)")
    if dicomweb is not None:
        if dicomweb.problem:
            section.rows.append(["DICOMweb", "(all)", "", "", "", "", "", f"not measured: {dicomweb.problem}"])
        else:
            dicomweb_faults(ctx, dicomweb, section)
    ctx.sections.append(section)


def fault_row(
    ctx: Ctx,
    kind: Kind,
    srv,
    label: str,
    pattern: str,
    fault_kind: str,
    kw: dict,
    timeout: float | None = None,
    source_name: str = "Flywheel native",
    counted: bool = True,
) -> list:
    srv.clear_faults()
    fault = srv.add_fault(pattern, fault_kind, count=2, method=None if "download/targets" in pattern else "GET", **kw)
    folder, argv, env, dropoff = kind.trial(ctx, f"fault-{fault_kind}")
    try:
        result = ctx.run(f"fault {source_name}: {label}", argv, env, timeout=timeout)
    finally:
        srv.clear_faults()
    got = rl.check(dropoff, kind.reference)
    differing = got.bad
    if counted and differing:
        ctx.totals.corrupted.append(f"fault {label}: {differing}")
    if counted and result.code == 0 and got.missing:
        ctx.totals.lost.append(f"fault {label}: {len(got.missing)}")
    ok = result.code == 0 and not differing and not got.missing
    verdict = "ok" if ok else ("exit 0 but files are wrong" if result.code == 0 else f"FAILED: {result.message()}")
    ctx.cleanup(folder)
    return [source_name, label, fault.hits, result.status, len(got.whole), differing, len(got.missing), verdict]


def dicomweb_faults(ctx: Ctx, kind: Kind, section: Section) -> None:
    proxy = ctx.stack.enter_context(FaultProxy(ctx.dicom["CLPIPE_ORTHANC_HTTP"]))
    base = ctx.dicom["CLPIPE_ORTHANC_DICOMWEB"].removeprefix(ctx.dicom["CLPIPE_ORTHANC_HTTP"])
    proxied = Kind("DICOMweb", f"dicomweb+{proxy.base_url}{base}", "sync", source=kind.source, reference=kind.reference)
    rows: list[tuple[str, str, str, dict[str, Any]]] = [
        ("HTTP 500", RETRIEVE, "status", dict(status=500)),
        ("HTTP 503 + Retry-After: 1", RETRIEVE, "status", dict(status=503, retry_after="1")),
        ("HTTP 429", RETRIEVE, "status", dict(status=429)),
        ("reset before headers (closed, no reply)", RETRIEVE, "drop", {}),
        ("reset mid-body (TCP RST after half the body)", RETRIEVE, "reset", {}),
        ("truncated body (half, then a clean close)", RETRIEVE, "truncate", {}),
        ("HTTP 503 on the search (QIDO-RS)", QIDO, "status", dict(status=503)),
        (
            "flipped bytes, same length (the multipart body's middle third; not in the totals: DICOMweb has no "
            "checksum, so flipped pixels alone could not be caught)",
            RETRIEVE,
            "corrupt",
            {},
        ),
    ]
    if ctx.args.quick:
        rows = [rows[1], rows[4]]
    for label, pattern, fault_kind, kw in rows:
        section.rows.append(
            fault_row(ctx, proxied, proxy, label, pattern, fault_kind, kw, source_name="DICOMweb", counted=fault_kind != "corrupt")
        )


# ------------------------------------------------------------------------------ scenario: full disks


def disk_full(ctx: Ctx, kinds: list[Kind]) -> None:
    section = Section(
        "Full disk",
        [
            "The dropoff (or the project's log folder) on a small tmpfs; then the same again after the filesystem "
            "is grown (`mount -o remount,size=...`). Expected: a non-zero exit with one line naming the folder and "
            "the bytes needed, nothing truncated under a final name, and the next run completing."
        ],
        [
            "source",
            "where",
            "size",
            "exit",
            "first line of stderr",
            "internal error",
            "truncated files under final names",
            "next run with enough space completes",
        ],
    )
    why = rl.can_mount()
    if why:
        section.rows.append(["(all)", "", "", "", f"not measured: {why}", "", "", ""])
        ctx.sections.append(section)
        return
    cases = []
    for kind in kinds:
        if kind.problem:
            continue
        assert kind.ref_dropoff is not None
        total = sum(p.stat().st_size for p in rl.synced_files(kind.ref_dropoff).values())
        half = f"{max(256, total // 2 // 1024)}k"
        if kind.name == "Flywheel native":
            cases += [(kind, "dropoff", "100k"), (kind, "dropoff", half), (kind, "log folder", "1m")]
        elif kind.name == "file://":
            cases += [(kind, "dropoff", "100k"), (kind, "dropoff", half)]
    if ctx.mode["disk"] == "few":
        cases = cases[1:2]  # Flywheel, half the project's size: the first files fit, then the disk fills
    for kind, where, size in cases:
        section.rows.append(disk_row(ctx, kind, where, size))
    ctx.sections.append(section)


def disk_row(ctx: Ctx, kind: Kind, where: str, size: str) -> list:
    folder = ctx.folder(f"disk-{kind.name}-{size}")
    mnt = folder / "mnt"
    rl.mount_tmpfs(mnt, size)
    try:
        filler = None
        if where == "dropoff":
            dropoff, project = mnt, None
        else:  # the project (logs, plan, audit CSV) on a filesystem with 8 KB left; the dropoff elsewhere
            dropoff, project = folder / "dropoff", mnt / "project"
            (project / "logs" / "sync_logs").mkdir(parents=True)
            st = os.statvfs(mnt)
            filler = mnt / "filler"
            with open(filler, "wb") as fh:
                fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 8192))
        config = write_config(folder, kind.url, dropoff, project=project, **kind.source)
        argv, env = kind.argv(config), kind.env(ctx, folder)
        first = ctx.run(f"disk full {kind.name} {where} {size}", argv, env)
        got = rl.check(dropoff, kind.reference)
        if got.bad:
            ctx.totals.corrupted.append(f"disk full {kind.name} {size}: {got.bad}")
        if first.code == 0 and got.missing:
            ctx.totals.lost.append(f"disk full {kind.name} {size}: {len(got.missing)}")
        if filler is not None:
            filler.unlink()
        else:
            rl.remount(mnt, "size=256m")
        second = ctx.run(f"disk full {kind.name} {where} {size}, next run", argv, env)
        end = rl.check(dropoff, kind.reference)
        if second.code == 0 and end.missing:
            ctx.totals.lost.append(f"disk full {kind.name} {size}, next run: {len(end.missing)}")
        if end.bad:
            ctx.totals.corrupted.append(f"disk full {kind.name} {size}, next run: {end.bad}")
        completes = second.code == 0 and not end.missing and not end.bad
        line = first.first_stderr or f"(stderr empty) {first.message()}"
        return [
            kind.name,
            where,
            size,
            first.status,
            line,
            "yes" if first.internal else "no",
            got.bad,
            "yes" if completes else f"no: exit {second.status}, {len(end.missing)} missing: {second.message()}",
        ]
    finally:
        rl.umount(mnt)
        ctx.cleanup(folder)


# ------------------------------------------------------------------------------ scenario: concurrent runs


def stale_lock(dropoff: Path, kind: str) -> None:
    lock = dropoff / rl.STATE_DIR / "lock"
    lock.mkdir(parents=True)
    if kind == "tmp":
        (lock / ".owner.json.4194300.tmp").write_text('{"host": "')  # a kill mid-write, pid long gone
    old = time.time() - 120
    for path in [*lock.iterdir(), lock]:
        os.utime(path, (old, old))


def concurrent(ctx: Ctx, kind: Kind, srv: fwserver.FlywheelTestServer) -> None:
    section = Section(
        "Two runs on one dropoff",
        [
            "Two runs started together on one dropoff (file downloads slowed to 0.25 s each, so a run lasts seconds), "
            "with and without a stale lock left by a killed run (2 minutes old). Expected: exactly one proceeds (exit 0), "
            'the other exits non-zero saying "another sync is writing"; a stale lock is broken; never an internal error.'
        ],
        [
            "dropoff before",
            "pairs",
            "exit statuses (per pair)",
            'exactly one proceeded, the other said "another sync is writing"',
            "internal errors",
            "dropoff complete afterwards",
            "first line of the refused run",
        ],
    )
    if kind.problem:
        section.rows.append(["(all)", "", "", "", "", "", f"not measured: {kind.problem}"])
        ctx.sections.append(section)
        return
    srv.add_fault(FILES, "delay", delay=0.25, method="GET")
    cases = [
        ("empty", None),
        ("stale lock: an owner-less lock/ folder", "empty"),
        ("stale lock: only .owner.json.<pid>.tmp in lock/", "tmp"),
    ]
    try:
        for label, lock_kind in cases:
            statuses, good, internal, complete, refused = [], 0, 0, 0, ""
            for n in range(ctx.mode["pairs"]):
                folder, argv, env, dropoff = kind.trial(ctx, f"pair-{lock_kind}-{n}")
                if lock_kind:
                    stale_lock(dropoff, lock_kind)
                results: list[rl.Result] = []

                def one(argv: list[str] = argv, env: dict = env, results: list = results) -> None:
                    results.append(rl.run(argv, env, ctx.timeout))

                threads = [threading.Thread(target=one) for _ in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                for r in results:
                    ctx.record(f"concurrent: {label}", r)
                codes = sorted(r.status for r in results)
                statuses.append("/".join(codes))
                ok = [r for r in results if r.code == 0]
                no = [r for r in results if r.code != 0]
                if len(ok) == 1 and len(no) == 1 and rl.LOCK_BUSY in no[0].output:
                    good += 1
                internal += sum(r.internal for r in results)
                for r in no:
                    refused = refused or r.message()
                got = rl.check(dropoff, kind.reference)
                if got.bad:
                    ctx.totals.corrupted.append(f"concurrent {label}: {got.bad}")
                if ok and got.missing:
                    ctx.totals.lost.append(f"concurrent {label}: {len(got.missing)}")
                complete += not got.missing and not got.bad
                ctx.cleanup(folder)
            pairs = ctx.mode["pairs"]
            section.rows.append(
                [label, pairs, ", ".join(statuses), f"{good} of {pairs}", internal, f"{complete} of {pairs}", refused or "-"]
            )
    finally:
        srv.clear_faults()
    ctx.sections.append(section)


# ------------------------------------------------------------------------------ scenario: read-only dropoff


def read_only(ctx: Ctx, kind: Kind) -> None:
    section = Section(
        "Read-only dropoff",
        [
            "The dropoff is a read-only bind mount (root ignores chmod 555): empty, or holding a complete earlier sync. "
            "Expected: a non-zero exit with one line saying the folder cannot be written (or, with nothing to do, a clean no-op)."
        ],
        ["dropoff", "exit", "first line", "internal error", "files lost silently"],
    )
    why = rl.can_mount() or kind.problem
    if why:
        section.rows.append(["(all)", "", f"not measured: {why}", "", ""])
        ctx.sections.append(section)
        return
    for label in ("empty", "holding a complete earlier sync"):
        folder = ctx.folder(f"readonly-{label[:5]}")
        real, mnt = folder / "real", folder / "ro"
        real.mkdir()
        config = write_config(folder, kind.url, mnt, **kind.source)
        argv, env = kind.argv(config), kind.env(ctx, folder)
        if label != "empty":
            config_rw = write_config(folder / "rw", kind.url, real, **kind.source)
            ctx.run("read-only: first sync", kind.argv(config_rw), env)
        rl.bind_readonly(real, mnt)
        try:
            result = ctx.run(f"read-only dropoff, {label}", argv, env)
            got = rl.check(mnt, kind.reference)
        finally:
            rl.umount(mnt)
        lost = len(got.missing) if result.code == 0 else 0
        if lost:
            ctx.totals.lost.append(f"read-only {label}: {lost}")
        section.rows.append([label, result.status, result.message(), "yes" if result.internal else "no", lost])
        ctx.cleanup(folder)
    ctx.sections.append(section)


# ------------------------------------------------------------------------------ scenario: bad input


@dataclass
class Bad:
    label: str
    cmd: str = "fw"  # fw: flywheel_sync with a Flywheel config; dicom: dicom sync with a file:// config
    source: dict = field(default_factory=dict)  # SourceOptions changes (None: remove the key)
    top: dict = field(default_factory=dict)  # top-level changes
    args: list[str] = field(default_factory=list)  # more command-line arguments
    env: dict = field(default_factory=dict)
    text: str | None = None  # the config file's whole text instead
    suffix: str = ".json"
    config: str | None = None  # "-c" value instead of the written file ("" : no -c at all)
    login: str | None = "default"  # the saved Flywheel login ("default": the test server's)
    command: str | None = None  # "flywheel_sync" / "sync" instead of the cmd's own


def bad_inputs(ctx: Ctx, srv: fwserver.FlywheelTestServer, tree_root: Path) -> list[Bad]:
    closed = rl.closed_port()
    orthanc = ctx.dicom.get("CLPIPE_ORTHANC_DICOMWEB", f"http://127.0.0.1:{closed}/dicom-web")
    dimse = ctx.dicom.get("CLPIPE_ORTHANC_DIMSE", f"ORTHANC@127.0.0.1:{closed}")
    dimse_host = dimse.split("@", 1)[1]
    checking = ctx.dicom.get("CLPIPE_DCMQRSCP_DIMSE", dimse).split("@", 1)[1]  # Orthanc accepts any called AE title
    a_file = tree_root / "README"
    fw_ok = "fw://lab/small/"
    wrong_key = f"127.0.0.1:{srv.port}:__force_insecure:not-the-key"
    return [
        # the config file itself
        Bad("config file does not exist", config="/nonexistent/clpipe_config.json"),
        Bad("no -c and no clpipe_config.json in the folder", config=""),
        Bad("config path is a folder", config="/tmp"),
        Bad("config: not JSON (trailing comma)", text='{"SourceOptions": {"SourceURL": "fw://lab/small/",}}'),
        Bad("config: empty file", text=""),
        Bad("config: a JSON list", text="[1, 2]"),
        Bad("config: YAML syntax error", text="SourceOptions:\n  SourceURL: [fw://lab\n", suffix=".yaml"),
        Bad("config: not UTF-8", text="\udcff\udcfe{}", suffix=".json"),
        Bad("unknown top-level key (SourceOption)", top={"SourceOption": {}}),
        Bad("unknown key in SourceOptions (SourceUrl)", source={"SourceUrl": fw_ok}),
        Bad("both SourceOptions and source blocks", top={"source": {"source_url": fw_ok}}),
        Bad("SourceOptions is a list", top={"SourceOptions": [fw_ok]}),
        Bad("ProjectDirectory is a number", top={"ProjectDirectory": 5}),
        Bad("BatchConfig is a number", top={"BatchConfig": 3}),
        Bad("BatchConfig names no profile or file", top={"BatchConfig": "noSuchProfile.json"}),
        # wrong types and values
        Bad("SourceURL is a number", source={"SourceURL": 42}),
        Bad("DropoffDirectory is a list", source={"DropoffDirectory": ["/tmp/x"]}),
        Bad("DropoffDirectory under a file", source={"DropoffDirectory": f"{a_file}/dropoff"}),
        Bad("TempDirectory under a file", source={"TempDirectory": f"{a_file}/tmp"}),
        Bad("CommandLineOpts is an object", source={"CommandLineOpts": {"j": 4}}),
        Bad("MaxDelete -5", source={"MaxDelete": "-5"}),
        Bad("Engine turbo", source={"Engine": "turbo"}),
        Bad("TimeUsage 1:75:00", source={"TimeUsage": "1:75:00"}),
        Bad("TimeUsage forever", source={"TimeUsage": "forever"}),
        Bad("TimeUsage -5", source={"TimeUsage": -5}),
        Bad("TimeUsage 0", source={"TimeUsage": "0"}),
        Bad("MemUsage 10Q", source={"MemUsage": "10Q"}),
        Bad("MemUsage 0", source={"MemUsage": 0}),
        Bad("MemUsage -1G", source={"MemUsage": "-1G"}),
        Bad("CoreUsage 0", source={"CoreUsage": "0"}),
        Bad("CoreUsage two", source={"CoreUsage": "two"}),
        Bad("LayoutTemplate with an unknown field", source={"LayoutTemplate": "{subject}/{nosuchfield}"}),
        Bad("LayoutTemplate absolute", source={"LayoutTemplate": "/abs/{subject}"}),
        Bad("LayoutTemplate with ..", source={"LayoutTemplate": "{subject}/../{session}"}),
        Bad("LayoutTemplate unbalanced brace", source={"LayoutTemplate": "{subject/{session}"}),
        Bad("LayoutTemplate is a number", source={"LayoutTemplate": 7}),
        Bad("LayoutTemplate with the fw-cli engine", source={"LayoutTemplate": "{subject}/{session}", "Engine": "fw-cli"}),
        Bad("CommandLineOpts unknown option", source={"CommandLineOpts": "-y --no-such-option"}),
        Bad("CommandLineOpts -j zero", source={"CommandLineOpts": "-y -j zero"}),
        Bad("CommandLineOpts -j 0", source={"CommandLineOpts": "-y -j 0"}),
        Bad("CommandLineOpts unbalanced quote", source={"CommandLineOpts": "-y -i 'dicom"}),
        Bad("CommandLineOpts --config-file (means nothing natively)", source={"CommandLineOpts": "-y --config-file x.yml"}),
        # SourceURL of each scheme
        Bad("fw:// without a project", source={"SourceURL": "fw://lab"}),
        Bad("fw:// with an upper-case group and a space", source={"SourceURL": "fw://Lab Group/study/"}),
        Bad("fw:// below a project", source={"SourceURL": "fw://lab/small/sub-01"}),
        Bad("fw:// project that does not exist", source={"SourceURL": "fw://lab/nosuchproject/"}),
        Bad("unknown scheme ftp://", source={"SourceURL": "ftp://127.0.0.1/x"}),
        Bad("dicomweb+http:// without a host", cmd="dicom", source={"SourceURL": "dicomweb+http:///dicom-web"}),
        Bad("dicomweb+http:// port not a number", cmd="dicom", source={"SourceURL": "dicomweb+http://127.0.0.1:80x/dicom-web"}),
        Bad(
            "dicomweb: user and password in the URL",
            cmd="dicom",
            source={"SourceURL": orthanc.replace("http://", "dicomweb+http://alice:s3cret-pw@")},
        ),
        Bad("dicomweb: a token as the URL's user", cmd="dicom", source={"SourceURL": orthanc.replace("http://", "dicomweb+http://tok3n@")}),
        Bad(
            "dicomweb: wrong path (HTTP 404)",
            cmd="dicom",
            source={"SourceURL": "dicomweb+" + orthanc.replace("/dicom-web", "/no-dicom-web")},
        ),
        Bad("dicomweb: unreachable (closed port)", cmd="dicom", source={"SourceURL": f"dicomweb+http://127.0.0.1:{closed}/dicom-web"}),
        Bad(
            "dicomweb: TOKEN and USER both set",
            cmd="dicom",
            source={"SourceURL": "dicomweb+" + orthanc},
            env={"CLPIPE_DICOMWEB_TOKEN": "t", "CLPIPE_DICOMWEB_USER": "u", "CLPIPE_DICOMWEB_PASSWORD": "p"},
        ),
        Bad("dicomweb: USER without PASSWORD", cmd="dicom", source={"SourceURL": "dicomweb+" + orthanc}, env={"CLPIPE_DICOMWEB_USER": "u"}),
        Bad("dimse:// without an AE title", cmd="dicom", source={"SourceURL": f"dimse://{dimse_host}"}),
        Bad("dimse:// AE title of 20 characters", cmd="dicom", source={"SourceURL": f"dimse://ABCDEFGHIJKLMNOPQRST@{dimse_host}"}),
        Bad("dimse:// port 0", cmd="dicom", source={"SourceURL": "dimse://ORTHANC@127.0.0.1:0"}),
        Bad("dimse: wrong called AE title (dcmqrscp)", cmd="dicom", source={"SourceURL": f"dimse://WRONGAET@{checking}"}),
        Bad("dimse: unreachable (closed port)", cmd="dicom", source={"SourceURL": f"dimse://ORTHANC@127.0.0.1:{closed}"}),
        Bad("dimse: CallingAET of 17 characters", cmd="dicom", source={"SourceURL": f"dimse://{dimse}", "CallingAET": "A" * 17}),
        Bad("dimse: RetrieveMethod fetch", cmd="dicom", source={"SourceURL": f"dimse://{dimse}", "RetrieveMethod": "fetch"}),
        Bad("dimse: RetrieveMethod move without MovePort", cmd="dicom", source={"SourceURL": f"dimse://{dimse}", "RetrieveMethod": "move"}),
        Bad("dimse: MovePort 70000", cmd="dicom", source={"SourceURL": f"dimse://{dimse}", "MovePort": 70000}),
        Bad(
            "dimse: TLSCAFile that does not exist",
            cmd="dicom",
            source={"SourceURL": f"dimse://{dimse}", "TLSCAFile": "/nonexistent/ca.pem"},
        ),
        Bad("NetworkTimeout 0", cmd="dicom", source={"NetworkTimeout": 0}),
        Bad("file:// with a host", cmd="dicom", source={"SourceURL": "file://fileserver/share"}),
        Bad("file:// folder that does not exist", cmd="dicom", source={"SourceURL": "file:///nonexistent/export"}),
        Bad("file:// a file, not a folder", cmd="dicom", source={"SourceURL": f"file://{a_file}"}),
        Bad("Engine fw-cli with a DICOM source", cmd="dicom", source={"Engine": "fw-cli"}),
        Bad("a DICOM SourceURL given to flywheel_sync", cmd="dicom", command="flywheel_sync"),
        # the query
        Bad("Query.StudyDate 20241345", cmd="dicom", source={"Query": {"StudyDate": "20241345"}}),
        Bad("Query.StudyDate 20240230-", cmd="dicom", source={"Query": {"StudyDate": "20240230-"}}),
        Bad("-study_date 2024/13/45", cmd="dicom", args=["-study_date", "2024/13/45"]),
        Bad("Query.StudyDate yesterday", cmd="dicom", source={"Query": {"StudyDate": "yesterday"}}),
        Bad("Query.StudyDate reversed range", cmd="dicom", source={"Query": {"StudyDate": "20240301-20240201"}}),
        Bad("Query.Limit ten", cmd="dicom", source={"Query": {"Limit": "ten"}}),
        Bad("-limit -3", cmd="dicom", args=["-limit", "-3"]),
        Bad("Query unknown key (PatientId)", cmd="dicom", source={"Query": {"PatientId": "SUB01"}}),
        Bad("Query is text", cmd="dicom", source={"Query": "PatientID=SUB01"}),
        Bad("Query.PatientID is a list", cmd="dicom", source={"Query": {"PatientID": ["SUB01"]}}),
        Bad("query flag with a Flywheel source", cmd="fw", command="sync", args=["-patient_id", "SUB01"]),
        # logins and servers
        Bad("not logged in (no saved login)", login=None),
        Bad("saved login holds no key", login=""),
        Bad("saved login of a server that is not running", login=f"127.0.0.1:{closed}:__force_insecure:{KEY}"),
        Bad("expired / revoked API key", login=wrong_key),
        Bad("FLYWHEEL_API_KEY without a site", login=None, env={"FLYWHEEL_API_KEY": "justakey"}),
        # the command line
        Bad("unknown option -sourceurl", args=["-sourceurl", fw_ok]),
        Bad("-batch_config of a file that does not exist", args=["-batch_config", "/nonexistent/batch.json"]),
        Bad("-after without a batch system", args=["-after", "12345"]),
        Bad("-engine turbo", args=["-engine", "turbo"]),
        Bad("-dropoff_dir under a file", args=["-dropoff_dir", f"{a_file}/x"]),
    ]


def bad_input(ctx: Ctx, srv: fwserver.FlywheelTestServer, tree_root: Path) -> None:
    section = Section(
        "Bad input",
        [
            "Each row: one mistake a user can make, in a project that is otherwise right (Flywheel: `fw://lab/small/` on "
            "the test server; `dicom sync`: the file:// tree), run with `-submit`. Expected: a non-zero exit and one line "
            "on stderr that names what to fix; never exit 0, never an internal error or a traceback."
        ],
        ["#", "input", "exit", "first line of output", "flags"],
    )
    items = bad_inputs(ctx, srv, tree_root)
    items = items[:: ctx.mode["bad_every"]]
    exit0 = internal = multi = 0
    for n, bad in enumerate(items, 1):
        result = run_bad(ctx, bad, srv, tree_root)
        flags = []
        if result.code == 0:
            exit0 += 1
            flags.append("EXIT 0")
        if result.internal:
            internal += 1
            flags.append("INTERNAL ERROR")
        if result.multiline_error:
            multi += 1
            flags.append("traceback" if result.traceback else "multi-line stderr")
        if not result.first_stderr:
            flags.append("nothing on stderr")
        section.rows.append([n, bad.label, result.status, result.message()[:200], ", ".join(flags)])
    section.notes.append(
        f"Summary: {len(items)} bad inputs; exit 0: {exit0} (should be 0); internal errors: {internal}; "
        f"multi-line stderr or traceback: {multi}; with nothing on stderr: "
        f"{sum(1 for r in section.rows if 'nothing on stderr' in r[4])}."
    )
    ctx.sections.append(section)


def run_bad(ctx: Ctx, bad: Bad, srv: fwserver.FlywheelTestServer, tree_root: Path) -> rl.Result:
    folder = ctx.folder(f"bad-{bad.label[:30]}")
    login = srv.login_key(KEY) if bad.login == "default" else bad.login
    home = fw_home(folder, login)
    if bad.login == "":
        (home / ".config" / "flywheel" / "user.json").write_text("{}")
    env = {**rl.base_env(home), **bad.env}
    url = "fw://lab/small/" if bad.cmd == "fw" else f"file://{tree_root}"
    config = write_config(folder, url, **bad.source)
    if bad.top:
        data = json.loads(config.read_text())
        for key, value in bad.top.items():
            data[key] = value
        config.write_text(json.dumps(data, indent=4))
    if bad.text is not None:
        config = config.with_suffix(bad.suffix)
        config.write_bytes(bad.text.encode("utf-8", "surrogateescape"))
    command = bad.command or ("flywheel_sync" if bad.cmd == "fw" else "sync")
    argv = rl.clpipe("dicom", command)
    if bad.config is None:
        argv += ["-c", str(config)]
    elif bad.config:
        argv += ["-c", bad.config]
    argv += [*bad.args, "-submit"]
    cwd = folder / "empty"
    cwd.mkdir()
    result = ctx.run(f"bad input: {bad.label}", argv, env, cwd=cwd, timeout=min(ctx.timeout, 120))
    ctx.cleanup(folder)
    return result


# ------------------------------------------------------------------------------ scenario: names


def _content(tag: str) -> bytes:
    """Unique bytes for a test file (a DICOM-like header, then the tag and random bytes)."""
    rng = random.Random(tag)
    return bytes(128) + b"DICM" + tag.encode("utf-8", "surrogateescape") + rng.randbytes(64)


def _zip(members: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in members:
            info = zipfile.ZipInfo(name, (2024, 1, 15, 12, 0, 0))
            zf.writestr(info, _content("member " + name))
    return buf.getvalue()


def _project(label: str, tree: dict) -> fwserver.Project:
    """tree: {subject: {session: {acquisition: [file name or (zip name, members)]}}}"""
    subjects = []
    for sub, sessions in tree.items():
        ses_list = []
        for ses, acqs in sessions.items():
            acq_list = []
            for acq, files in acqs.items():
                out = []
                for f in files:
                    if isinstance(f, tuple):
                        out.append(fwserver.FwFile(f[0], _zip(f[1])))
                    else:
                        out.append(fwserver.FwFile(f, _content(f"{label}/{sub}/{ses}/{acq}/{f}")))
                acq_list.append(fwserver.Acquisition(acq, out))
            ses_list.append(fwserver.Session(ses, acq_list))
        subjects.append(fwserver.Subject(sub, ses_list))
    return fwserver.Project("lab", label, subjects)


def hostile_projects() -> list[tuple[str, fwserver.Project]]:
    nfc, nfd = unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")
    m_nfc, m_nfd = unicodedata.normalize("NFC", "Müller.dcm"), unicodedata.normalize("NFD", "Müller.dcm")
    long_label = "L" * 300
    long_name = "n" * 260
    member = "m" * 300
    return [
        (
            "labels and names that differ only by NFC/NFD",
            _project("nfc", {nfc: {"ses-01": {"T1w": ["a.dcm", m_nfc, m_nfd]}}, nfd: {"ses-01": {"T1w": ["a.dcm"]}}}),
        ),
        (
            "`a/../normal` vs `normal` (labels and names)",
            _project("dotdot", {"sub-01": {"ses-01": {"a/../normal": ["x.dcm"], "normal": ["x.dcm", "b/../y.dcm", "y.dcm"]}}}),
        ),
        (
            "surrounding spaces",
            _project(
                "spaces",
                {
                    "sub-01": {
                        " ses-01": {"T1w": ["a.dcm"]},
                        "ses-01 ": {"T1w": ["a.dcm"]},
                        "ses-01": {"T1w": ["a.dcm", " f.dcm", "f.dcm", "f.dcm "]},
                    }
                },
            ),
        ),
        (
            "control characters",
            _project("control", {"sub-01": {"ses-01": {"T1\tw": ["a.dcm"], "T1\nw": ["a.dcm"], "T1w": ["a.dcm", "b\x01.dcm", "b.dcm"]}}}),
        ),
        (
            "longer than 255 bytes, differing after that",
            _project(
                "long",
                {
                    "sub-01": {
                        "ses-01": {
                            long_label + "1": ["a.dcm"],
                            long_label + "2": ["a.dcm"],
                            "T1w": [long_name + "1.dcm", long_name + "2.dcm"],
                        }
                    }
                },
            ),
        ),
        ("a file named `..` (and `...`)", _project("dots", {"sub-01": {"ses-01": {"T1w": ["..", "...", "x.dcm"]}}})),
        (
            "zip members with 300-character names (and the same base name twice)",
            _project(
                "zipnames", {"sub-01": {"ses-01": {"T1w": [("series.dicom.zip", [f"a/{member}.dcm", f"b/{member}.dcm", "c/short.dcm"])]}}}
            ),
        ),
        (
            '`*:?"<>|\\` in labels and names',
            _project("windows", {"sub*1": {"ses:1?": {'T1 "<>|"': ["a*b?.dcm", "c<d>.dcm", 'e|f".dcm', "g\\h.dcm"]}}}),
        ),
        ("leading `.` or `-`", _project("leading", {"-sub": {".ses": {"-rf": ["-x.dcm", ".y.dcm"], ".hidden": ["z.dcm"]}}})),
    ]


def remote_items(project: fwserver.Project) -> list[bytes]:
    """The contents of every file the project should become locally (zips unpacked)."""
    out = []
    for _node, f in project.iter_files():
        if f.is_zip:
            with zipfile.ZipFile(io.BytesIO(f.content)) as zf:
                out += [zf.read(i) for i in zf.infolist() if not i.is_dir() and i.file_size]
        else:
            out.append(f.content)
    return out


def names(ctx: Ctx, kinds: list[Kind]) -> None:
    section = Section(
        "Hostile and colliding names",
        [
            "Flywheel projects whose labels and file names collide or are hostile, each synced into an empty dropoff "
            "with the default layout and with `LayoutTemplate` `{subject}/{session}/{acquisition}`; and the DICOM data set "
            "(descriptions with `/`, `..`, `*`, `:`, `?`, `<>|`, tabs, non-ASCII) from the reference runs. Every remote file "
            "has unique bytes, so a local file is matched to its remote file by content. Expected: one local file per remote "
            'file, none differing, every name portable (ASCII, no spaces, none of `/\\:*?"<>|`, no control characters, no '
            "leading `.` or `-`, at most 255 bytes), and exit 0 only when every remote file has its own local file."
        ],
        [
            "project",
            "layout",
            "remote files",
            "distinct local files",
            "files whose bytes differ",
            "remote files without a local file",
            "names not portable (e.g.)",
            "exit",
            "first line when not 0",
        ],
    )
    projects = hostile_projects()
    if ctx.mode["names"] == "few":
        projects = [projects[0], projects[4], projects[7]]
    srv = ctx.server([p for _, p in projects])
    for label, project in projects:
        wanted = remote_items(project)
        digests = {rl.digest(d) for d in wanted}
        for layout in ("", "{subject}/{session}/{acquisition}"):
            if ctx.mode["names"] == "few" and layout:
                continue
            folder = ctx.folder(f"names-{project.label}")
            config = write_config(folder, f"fw://lab/{project.label}/", LayoutTemplate=layout or None)
            dropoff = folder / "project" / "data_DICOMs"
            env = rl.base_env(fw_home(folder, srv.login_key(KEY)))
            result = ctx.run(f"names: {label}", rl.clpipe("dicom", "flywheel_sync", "-c", str(config), "-submit"), env)
            local = rl.digests(dropoff)
            differ = sum(1 for v in local.values() if v not in digests)
            lost = len(digests - set(local.values()))
            bad = rl.non_portable(dropoff)
            if differ:
                ctx.totals.corrupted.append(f"names {project.label}: {differ}")
            if result.code == 0 and lost:
                ctx.totals.lost.append(f"names {project.label}: {lost}")
            example = "; ".join(f"`{rl.shown(n)}` ({why})" for n, why in list(bad.items())[:2])
            section.rows.append(
                [
                    label,
                    f"`{layout}`" if layout else "default",
                    len(wanted),
                    len(local),
                    differ,
                    lost,
                    f"{len(bad)}" + (f": {example}" if example else ""),
                    result.status,
                    "" if result.code == 0 else result.message(),
                ]
            )
            ctx.cleanup(folder)
    for kind in kinds:
        if kind.name.startswith("Flywheel") or kind.problem or kind.ref_dropoff is None or kind.ref_result is None:
            continue
        bad = rl.non_portable(kind.ref_dropoff)
        problem = kind.truth(kind.ref_dropoff) if kind.truth else ""
        example = "; ".join(f"`{rl.shown(n)}` ({why})" for n, why in list(bad.items())[:2])
        section.rows.append(
            [
                f"DICOM data set via {kind.name}",
                "default",
                len(kind.reference) if not problem else problem,
                len(kind.reference),
                0 if not problem else "see reference runs",
                0 if not problem else "?",
                f"{len(bad)}" + (f": {example}" if example else ""),
                kind.ref_result.status,
                "",
            ]
        )
    ctx.sections.append(section)


# ------------------------------------------------------------------------------ scenario: secrets


def secrets(ctx: Ctx, small: Kind, dicomweb: Kind | None) -> None:
    section = Section(
        "Secrets",
        [
            "Runs with the Flywheel key (in `FLYWHEEL_API_KEY` or a saved `fw login`) and the DICOMweb login "
            "(`CLPIPE_DICOMWEB_USER`/`PASSWORD`, `CLPIPE_DICOMWEB_TOKEN`) set to unique marker strings, each under "
            "`strace -f -ff -e trace=execve -v` (every program started, with its argv and environment). Counted: markers in "
            "(a) the argv of every process started, (b) the environment of every child that does not need them (all but "
            "the sync job itself), (c) every file under the project, its dropoff, logs and HOME (the saved login itself "
            "and the config file the user wrote excepted), (d) stdout and stderr. All must be 0."
        ],
        ["run", "exit", "(a) argv", "(b) env of children that do not need it", "(c) files", "(d) stdout/stderr", "where"],
    )
    if not shutil.which("strace"):
        section.rows.append(["(all)", "", "", "", "", "", "not measured: strace is not installed"])
        ctx.sections.append(section)
        return
    tag = f"{os.getpid():x}{int(time.time()):x}"
    m = {name: f"MARK{name}{tag}X" for name in ("fwenv", "fwsaved", "fwrejected", "user", "password", "token", "urlpw")}
    srv = ctx.server([fwserver.make_demo_project(**SMALL_PROJECT)], keys={m["fwenv"], m["fwsaved"]})
    site = f"127.0.0.1:{srv.port}:__force_insecure:"
    rows: list[dict] = [
        dict(
            label="Flywheel, key in FLYWHEEL_API_KEY",
            cmd="flywheel_sync",
            url="fw://lab/small/",
            login=None,
            env={"FLYWHEEL_API_KEY": site + m["fwenv"]},
        ),
        dict(label="Flywheel, saved fw login", cmd="flywheel_sync", url="fw://lab/small/", login=site + m["fwsaved"], env={}),
        dict(
            label="Flywheel, a rejected key in FLYWHEEL_API_KEY",
            cmd="flywheel_sync",
            url="fw://lab/small/",
            login=None,
            env={"FLYWHEEL_API_KEY": site + m["fwrejected"]},
        ),
        dict(
            label="Flywheel, downloads refused (HTTP 403), key in FLYWHEEL_API_KEY",
            cmd="flywheel_sync",
            url="fw://lab/small/",
            login=None,
            env={"FLYWHEEL_API_KEY": site + m["fwenv"]},
            fault=True,
        ),
    ]
    if dicomweb is not None and not dicomweb.problem:
        rows += [
            dict(
                label="DICOMweb, CLPIPE_DICOMWEB_USER/PASSWORD",
                cmd="sync",
                url=dicomweb.url,
                login=None,
                env={"CLPIPE_DICOMWEB_USER": m["user"], "CLPIPE_DICOMWEB_PASSWORD": m["password"]},
            ),
            dict(
                label="DICOMweb, CLPIPE_DICOMWEB_TOKEN", cmd="sync", url=dicomweb.url, login=None, env={"CLPIPE_DICOMWEB_TOKEN": m["token"]}
            ),
            dict(
                label="DICOMweb, a password in SourceURL (refused)",
                cmd="sync",
                url=dicomweb.url.replace("+http://", f"+http://alice:{m['urlpw']}@"),
                login=None,
                env={},
            ),
        ]
    elif dicomweb is not None:
        section.notes.append(f"- DICOMweb rows not measured: {dicomweb.problem}")
    if ctx.mode["secrets"] == "few":
        rows = [
            r
            for r in rows
            if r["label"]
            in (
                "Flywheel, key in FLYWHEEL_API_KEY",
                "DICOMweb, CLPIPE_DICOMWEB_USER/PASSWORD",
                "DICOMweb, a password in SourceURL (refused)",
            )
        ]
    markers = list(m.values())
    for row in rows:
        folder = ctx.folder(f"secrets-{row['label'][:20]}")
        home = fw_home(folder, row["login"])
        config = write_config(folder, row["url"], **(dicomweb.source if row["cmd"] == "sync" and dicomweb else {}))
        env = {**rl.base_env(home), **row["env"]}
        traces = ctx.folder(f"strace-{row['label'][:20]}")  # outside the folder searched for secrets
        command = rl.clpipe("dicom", row["cmd"], "-c", str(config), "-submit")
        if row.get("fault"):
            srv.add_fault(FILES, "status", status=403, method="GET")
        try:
            result = ctx.run(f"secrets: {row['label']}", command, env, prefix=rl.strace_prefix(traces))
        finally:
            srv.clear_faults()
        execs = rl.read_strace(traces)
        if not execs:
            section.notes.append(f"- {row['label']}: strace logged no program start ({result.message()})")
        where: list[str] = []
        in_argv = 0
        for e in execs:
            n = sum(" ".join(e.argv).count(mk) for mk in markers)
            if n:
                where.append(f"argv of {Path(e.program).name}")
            in_argv += n
        in_env = 0
        for e in execs:
            if e.argv == command or "_run_plan" in e.argv:  # the command the user ran; the sync job, which needs them
                continue
            n = sum(" ".join(e.env).count(mk) for mk in markers)
            if n:
                where.append(f"environment of {Path(e.program).name}")
            in_env += n
        skip = {config, home / ".config" / "flywheel" / "user.json"}
        files = rl.count_in_files([folder], markers, skip=skip)
        where += [f"file {Path(p).relative_to(folder)}" for p in files]
        in_output = sum(result.output.count(mk) for mk in markers)
        if in_output:
            where.append("output: " + next(ln.strip() for ln in result.output.splitlines() if any(mk in ln for mk in markers))[:120])
        leaked = in_argv + in_env + sum(files.values()) + in_output
        if leaked:
            ctx.totals.leaked.append(f"secrets {row['label']}: {leaked}")
        section.rows.append(
            [row["label"], result.status, in_argv, in_env, sum(files.values()), in_output, "; ".join(dict.fromkeys(where)) or "-"]
        )
        ctx.cleanup(folder)
        ctx.cleanup(traces)
    ctx.sections.append(section)


# ------------------------------------------------------------------------------ main


def internal_errors(ctx: Ctx) -> Section:
    section = Section(
        "Internal errors",
        ["Every run of every scenario whose output says `internal error` or holds a traceback."],
        ["scenario", "exit", "line"],
    )
    for scenario, result in ctx.runs:
        if result.internal:
            line = next((ln.strip() for ln in result.output.splitlines() if any(mk in ln for mk in rl.INTERNAL)), "")
            section.rows.append([scenario, result.status, line])
    if not section.rows:
        section.rows.append(["(none)", "", ""])
    return section


def totals_section(ctx: Ctx) -> tuple[Section, dict[str, int]]:
    internal = sum(1 for _, r in ctx.runs if r.internal)
    values = {
        "corrupted files": Totals._sum(ctx.totals.corrupted),
        "silently lost files": Totals._sum(ctx.totals.lost),
        "internal errors": internal,
        "leaked secrets": Totals._sum(ctx.totals.leaked),
    }
    detail = {
        "corrupted files": ctx.totals.corrupted,
        "silently lost files": ctx.totals.lost,
        "internal errors": [f"{s}" for s, r in ctx.runs if r.internal],
        "leaked secrets": ctx.totals.leaked,
    }
    section = Section(
        "Totals (the done criteria: all 0)",
        [
            "corrupted: files under a final name whose bytes are not the source's, after any kill, fault, full disk, "
            "concurrent run or name collision; silently lost: files missing after a run that exited 0; internal errors: runs "
            "that said `internal error` or printed a traceback; leaked secrets: marker occurrences in the Secrets table."
        ],
        ["criterion", "count", "where"],
    )
    for name, value in values.items():
        where = detail[name]
        shown = "; ".join(dict.fromkeys(where))
        section.rows.append([name, value, shown[:400] or "-"])
    return section, values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few of each scenario (~1 min), results not saved")
    ap.add_argument("--seed", type=int, default=11, help="seed of the kill delays (default 11)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds allowed per run (default 120)")
    ap.add_argument("--workdir", type=Path, help="where the projects and dropoffs go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (every run's project and dropoff)")
    ap.add_argument("--only", help="comma-separated scenarios: kills,faults,disk,concurrent,readonly,bad,names,secrets")
    ap.add_argument("--output", type=Path, help=f"write the table here too (a full run always writes {RESULTS.relative_to(BENCH.parent)})")
    ap.add_argument(
        "--clpipe-src",
        type=Path,
        help="run the clpipe package in this folder (e.g. the src/ of a tree "
        "exported with `git archive`) instead of the installed one; nothing saved",
    )
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if args.clpipe_src:
        if not (args.clpipe_src / "clpipe" / "__init__.py").is_file():
            ap.error(f"--clpipe-src: no clpipe package in {args.clpipe_src}")
        rl.CLPIPE_PATH = str(args.clpipe_src.resolve())
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="clpipe-reliability-", dir=args.workdir))
    started = time.monotonic()
    with ExitStack() as stack:
        stack.callback(lambda: None if args.keep else shutil.rmtree(work, ignore_errors=True))
        stack.callback(rl.umount_everything)
        stack.callback(rl.kill_everything_started)
        ctx = Ctx(args, work, stack)
        print(f"work folder {work}", flush=True)

        def want(name: str) -> bool:
            return only is None or name in only

        def step(name: str, func: Callable[[], None]) -> None:
            if not want(name):
                return
            t0 = time.monotonic()
            print(f"[{time.monotonic() - started:6.1f} s] {name} ...", flush=True)
            try:
                func()
            except Exception:  # noqa: BLE001 - a harness failure is reported as such, the rest still runs
                ctx.sections.append(Section(f"{name}: harness error", [], ["traceback"], [[traceback.format_exc().replace("\n", " / ")]]))
            print(f"[{time.monotonic() - started:6.1f} s] {name} done in {time.monotonic() - t0:.1f} s", flush=True)

        kill_srv = ctx.server([fwserver.make_demo_project(**KILL_PROJECT)])
        small_srv = ctx.server([fwserver.make_demo_project(**SMALL_PROJECT)])
        tree_root = work / "tree"
        tree_desc = dicomdata.make_file_tree(tree_root, scale=ctx.mode["tree_scale"])
        fw_kill = flywheel_kind(ctx, kill_srv, "kills")
        small = flywheel_kind(ctx, small_srv, "small", "Flywheel native (small project)")
        kinds = [fw_kill, *dicom_kinds(ctx, tree_root, tree_desc)]
        dicomweb = next(k for k in kinds if k.name == "DICOMweb")
        for kind in [*kinds, small]:
            calibrate(ctx, kind)
        kill_srv.add_fault(FILES, "delay", delay=0.25, method="GET")  # a run long enough to be killed at many points
        fw_kill.t_lock, fw_kill.t_end = _retime(ctx, fw_kill)
        references(ctx, [*kinds, small])
        step("kills", lambda: kills(ctx, kinds))
        kill_srv.clear_faults()
        step("faults", lambda: faults(ctx, small, small_srv, dicomweb))
        step("disk", lambda: disk_full(ctx, kinds))
        step("concurrent", lambda: concurrent(ctx, fw_kill, kill_srv))
        step("readonly", lambda: read_only(ctx, small))
        step("bad", lambda: bad_input(ctx, small_srv, tree_root))
        step("names", lambda: names(ctx, kinds))
        step("secrets", lambda: secrets(ctx, small, dicomweb))
        ctx.sections.append(internal_errors(ctx))
        totals, values = totals_section(ctx)
        ctx.sections.append(totals)
        elapsed = time.monotonic() - started
        header = [
            f"# Reliability{' (--quick)' if args.quick else ''}",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}",
            f"- {len(ctx.runs)} runs of `python -m clpipe dicom flywheel_sync|sync -submit` (local runs, no batch "
            f"system) in {elapsed:.0f} s; seed {args.seed}; every run bounded by {args.timeout:.0f} s; all servers on 127.0.0.1",
            f"- clpipe tree: {git_describe() if not args.clpipe_src else f'the clpipe package in {args.clpipe_src}'}",
            "",
        ]
        text = "\n".join(header) + "\n" + "\n".join(s.render() for s in ctx.sections)
        text += (
            "\nTOTALS: "
            + ", ".join(f"{k} {v}" for k, v in values.items())
            + (" (all 0: done)" if not any(values.values()) else " (NOT all 0)")
            + "\n"
        )
        print("\n" + text, flush=True)
        if not args.quick and only is None and not args.clpipe_src:
            benchlib.save_results(RESULTS, text)
        if args.output:
            args.output.write_text(text)
        if args.keep:
            print(f"kept {work}")
    return 0


def _retime(ctx: Ctx, kind: Kind) -> tuple[float | None, float]:
    """The kill project's timings with the slowed downloads (the reference run was not slowed)."""
    if kind.problem:
        return kind.t_lock, kind.t_end
    folder, argv, env, dropoff = kind.trial(ctx, "timing")
    result, seen = rl.run_and_kill(argv, env, delay=ctx.timeout, watch=dropoff / rl.STATE_DIR / "lock", limit=ctx.timeout)
    ctx.record(f"timing {kind.name}", result)
    ctx.cleanup(folder)
    return (seen, result.seconds) if result.code == 0 else (kind.t_lock, kind.t_end)


def git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(BENCH.parent), "log", "-1", "--format=%h %s"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(BENCH.parent), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head[:90]}" + (f" + uncommitted changes in {len(dirty.splitlines())} files" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
