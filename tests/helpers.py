"""Helpers shared by the test modules (no test module imports another): the tool locations,
an isolated user with fw on PATH, a fresh clpipe project, the native engine run against the
bundled Flywheel server, the batch schedulers and the DICOM test servers.

tests/ is on sys.path (pyproject.toml: [tool.pytest.ini_options] pythonpath), so a test
imports these as ``from helpers import ...``; the fixtures live in tests/conftest.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pydicom
import pytest

# clpipe's own modules are imported where they are used, so that conftest.py (which imports
# this module) and the tests that need none of them collect whatever state those are in
if TYPE_CHECKING:
    from clpipe.sources.base import RemoteEntry

# ----------------------------------------------------------------- tools, users and projects

ROOT = Path(__file__).resolve().parents[1]  # the repository
TOOLS = Path(os.environ.get("CLPIPE_TOOLS", Path.home() / ".cache" / "clpipe-tests"))
FW_NEW = Path(os.environ.get("CLPIPE_TEST_FW", TOOLS / "fw-18.5.1" / "bin" / "fw"))
FW_OLD = Path(os.environ.get("CLPIPE_TEST_FW_OLD", TOOLS / "fw-17.5.1" / "bin" / "fw"))


def need_tool(path: Path, what: str) -> Path:
    """The tool, or a failed test saying how to get it (never a silent skip)."""
    if path.exists():
        return path
    pytest.fail(f"{what} not found at {path}; run scripts/setup.sh (scripts/test.sh does it for you)")


@dataclass
class Env:
    """An isolated user: its own HOME (so its own `fw login`), fw on PATH."""

    home: Path
    vars: dict

    def run(self, *argv, timeout=180, cwd=None, check=False) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in argv], env=self.vars, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def clpipe(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "clpipe", *args, **kw)

    def fw_login(self, login_key: str) -> None:
        proc = self.run("fw", "login", login_key, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def make_env(tmp_path: Path, fw: Path | None) -> Env:
    home = tmp_path / "home"
    home.mkdir()
    path = os.environ.get("PATH", "")
    # a PATH without any other fw on it
    parts = [p for p in path.split(os.pathsep) if p and not (Path(p) / "fw").exists()]
    if fw is not None:
        parts.insert(0, str(fw.parent))
    variables = dict(os.environ, HOME=str(home), FLYWHEEL_USER_HOME=str(home), PATH=os.pathsep.join(parts), PYTHONWARNINGS="ignore")
    return Env(home=home, vars=variables)


def new_project(root: Path, source_url: str = "fw://lab/study/", layout: bool = False, **source) -> Path:
    """A clpipe project made by `clpipe project_setup`, with SourceOptions changes applied.

    For a Flywheel URL the project is by default one made before project_setup wrote a
    LayoutTemplate: without one, so the files land in Flywheel's layout (what `fw sync`
    writes, which most Flywheel tests compare with); ``layout=True`` keeps the new default."""
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", "project_setup", "-project_title", "t", "-project_dir", str(root), "-source_url", source_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    config = root / "clpipe_config.json"
    fw_layout = not layout and source_url.startswith("fw:")
    if source or fw_layout:
        data = json.loads(config.read_text())
        if fw_layout:
            del data["SourceOptions"]["LayoutTemplate"]
            data["DICOMToBIDSOptions"]["DICOMFormatString"] = "SUBJECTS/{subject}/SESSIONS/{session}/"
        data["SourceOptions"].update(source)
        config.write_text(json.dumps(data, indent=2))
    return config


def traced_sync(env: Env, config: Path, trace: Path, *extra, timeout=300) -> subprocess.CompletedProcess:
    """`clpipe dicom flywheel_sync -c CONFIG -submit` under ``strace -f -v``, which logs every
    program started (its argv and environment in full) into ``trace``."""
    strace = need_tool(Path(shutil.which("strace") or "/usr/bin/strace"), "strace (watches every child process)")
    command = [sys.executable, "-m", "clpipe", "dicom", "flywheel_sync", "-c", config, "-submit", *extra]
    return env.run(strace, "-f", "-v", "-s", "65536", "-e", "trace=execve", "-o", trace, *command, timeout=timeout)


def run_quick_bench(script: str, results: str, *args, timeout=600, env: dict | None = None) -> tuple[str, dict[str, str]]:
    """``bench/<script> --quick <args>``, which must exit 0 and leave the saved table
    ``bench/results/<results>`` as it was; its output and the rows of its tables by first cell."""
    saved = ROOT / "bench" / "results" / results
    before = saved.read_bytes() if saved.exists() else None
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {}), PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (saved.read_bytes() if saved.exists() else None) == before  # --quick never overwrites the saved table
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ") and "|" in line[2:]}
    return proc.stdout, rows


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (openssl)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    proc = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return cert, key


def files_under(root: Path) -> dict[str, bytes]:
    """Every synced file under ``root`` (the native engine's own bookkeeping in
    ``.clpipe-sync/`` is not a synced file)."""
    found = {}
    # not descending into .clpipe-sync/: a live run creates and removes folders there
    # (staging, lock hand-overs) while a test watches the dropoff
    for folder, subfolders, names in os.walk(root):
        if Path(folder) == root and ".clpipe-sync" in subfolders:
            subfolders.remove(".clpipe-sync")
        for name in names:
            path = Path(folder, name)
            if path.is_file():
                found[str(path.relative_to(root))] = path.read_bytes()
    return dict(sorted(found.items()))


# -------------------------------------------------------------------- the DICOM test servers

DICOM_START = 'eval "$(scripts/infra/dicom-up.sh)"'
DICOM_EXPORTS = (
    "CLPIPE_ORTHANC_HTTP",
    "CLPIPE_ORTHANC_DICOMWEB",
    "CLPIPE_ORTHANC_DIMSE",
    "CLPIPE_DCMQRSCP_DIMSE",
    "CLPIPE_QRSCP_DIMSE",
    "CLPIPE_MOVE_PORT",
    "CLPIPE_DICOM_DATA",
    "CLPIPE_DICOM_EXPECTED",
)

#  the native engine against the bundled Flywheel server (tests/integration/test_native_engine.py)

KEY = "test-key-s3cr3t"
SUMMARY_RE = re.compile(r"Sync summary: (\d+) created, (\d+) updated, (\d+) skipped, (\d+) failed")


def login(env, server) -> None:
    """What `fw login` saves, written directly: the native engine needs no fw."""
    folder = env.home / ".config" / "flywheel"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "user.json").write_text(json.dumps({"key": server.login_key(KEY), "root": False}))


def native(env, config: Path, *extra, timeout=180):
    proc = env.clpipe("dicom", "flywheel_sync", "-c", config, "-engine", "native", "-submit", *extra, timeout=timeout)
    out = proc.stdout + proc.stderr
    match = SUMMARY_RE.search(out)
    return proc.returncode, out, tuple(int(g) for g in match.groups()) if match else None


def start_native(env, config: Path, **popen) -> subprocess.Popen:
    """`clpipe dicom flywheel_sync -engine native -submit` started in a session of its own (so
    a test can kill it whole), its output thrown away unless ``popen`` says otherwise."""
    options: dict = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    return subprocess.Popen(
        [sys.executable, "-m", "clpipe", "dicom", "flywheel_sync", "-c", str(config), "-engine", "native", "-submit"],
        env=env.vars,
        start_new_session=True,
        **options,
    )


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip of ``members`` (name -> bytes), every member dated 2024-01-01."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def file_gets(server, since: int = 0) -> list[str]:
    """Names of files downloaded (not ?info requests) since request number ``since``."""
    names = []
    for r in server.requests[since:]:
        match = re.match(r"^/api/containers/[^/]+/files/(.+)$", r["path"])
        if r["method"] == "GET" and match and not r["query"].get("info"):
            names.append(match.group(1))
    return names


def dicoms(root: Path) -> dict[str, bytes]:
    """The synced files of a dropoff (files_under leaves the engine's .clpipe-sync/ out)."""
    return files_under(root)


def resync_renames_in_place(env, server, config: Path, wanted: dict[str, bytes]) -> None:
    """The project's dropoff, synced under other names (an earlier layout or earlier names),
    synced again: every file is renamed in place to where ``wanted`` has it, with its bytes,
    nothing is downloaded (no request for a file at all, not even a zip's ``?info``) and the
    output says so."""
    mark = len(server.requests)
    code, out, summary = native(env, config)
    n = len(wanted)
    assert code == 0 and summary == (0, 0, n, 0), out
    assert file_gets(server, mark) == []  # nothing downloaded
    assert [r for r in server.requests[mark:] if "/files/" in r["path"]] == []  # not even a zip's ?info
    assert dicoms(config.parent / "data_DICOMs") == wanted  # every file at its new place, with its bytes
    assert f"{n} files synced under earlier names were renamed in place (nothing downloaded)" in out


def resync_has_nothing_to_do(env, server, config: Path, n: int) -> None:
    """The next sync of a dropoff renamed in place: its ``n`` files skipped, nothing downloaded
    and nothing renamed."""
    mark = len(server.requests)
    code, out, summary = native(env, config)
    assert code == 0 and summary == (0, 0, n, 0) and file_gets(server, mark) == [] and "renamed in place" not in out


class SeriesSource:
    """A source of DICOM series as the DICOMweb and DIMSE sources are (``(SOPInstanceUID,
    bytes)``), or the file source (``(SOPInstanceUID, Path)``); ``fail_after`` instances
    of a series, ``error`` is raised."""

    def __init__(
        self, series: dict[str, list[tuple[str, bytes | Path]]], fail_after: int | None = None, error: BaseException | None = None
    ):
        self.series, self.fail_after, self.error, self.opened = series, fail_after, error, []

    @contextmanager
    def instances(self, entry):
        self.opened.append(entry.key)

        def items():
            for n, item in enumerate(self.series[entry.key]):
                if self.fail_after is not None and n == self.fail_after:
                    raise self.error
                yield item

        yield items()

    def members(self, entry):
        return None


def series_entry(key: str, folder: str, count: int, version: str = "v1") -> RemoteEntry:
    from clpipe.sources.base import RemoteEntry

    return RemoteEntry(key=key, path=folder, size=0, modified=0.0, checksum=None, unpack=True, count=count, version=version, series=True)


class PlainFiles:
    """A source of plain files (key -> bytes) whose entries are given as they are; it says
    it names every entry a path of its own (``unique_paths``), truthfully or not."""

    def __init__(self, files: dict[str, bytes], unique_paths: bool):
        self.files, self.unique_paths, self.opened = files, unique_paths, []

    @contextmanager
    def open(self, entry):
        self.opened.append(entry.key)
        yield iter([self.files[entry.key]])

    def close(self):
        pass


def run_engine(source, dropoff: Path, entries: list, run_id: str = "run1", **options):
    from clpipe.sync.engine import Engine, Options
    from clpipe.sync.manifest import SyncState

    state = SyncState(dropoff, run_id)
    state.acquire()
    try:
        state.load()
        opts = dict(dropoff=dropoff, zip_tmp=dropoff.parent / "ziptmp", jobs=2, retries=1, backoff=0.01)
        outcome = Engine(source, state, Options(**{**opts, **options})).run(entries)
        state.save()
    finally:
        state.release()
    return outcome


def manifest_with(dropoff: Path, records: list) -> None:
    """A manifest in ``dropoff`` holding ``records``, as a run's save() writes it."""
    from clpipe.sync.manifest import SyncState

    state = SyncState(dropoff, "w")
    state.acquire()
    state.load()
    for record in records:
        state.record(record)
    state.save()
    state.release()


def landed_files(dropoff: Path) -> dict[str, bytes]:
    return {
        p.relative_to(dropoff).as_posix(): p.read_bytes()
        for p in dropoff.rglob("*")
        if p.is_file() and ".clpipe-sync" not in p.relative_to(dropoff).parts
    }


def instances(prefix: str, n: int, size: int = 3000) -> list[tuple[str, bytes]]:
    return [(f"1.2.3.{prefix}.{i}", bytes([i % 251]) * (size + i)) for i in range(n)]


# ------------------------------- the batch schedulers (tests/integration/test_schedulers.py)

PROFILES = {"slurm": ("sbatch", "slurmUNCConfig.json"), "sge": ("qsub", "sgeDukeBIAC.json")}
TERMINAL_SLURM = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
WAIT_SECONDS = 240
WEIRD = 'lab\'s $HOME "quoted" dir'


def _run(*argv, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)


def wait_for(scheduler: str, job_id: str, seconds: float = WAIT_SECONDS) -> dict:
    """Poll (bounded: ``seconds``) until the job has ended; return its state, exit code and times."""
    deadline = time.monotonic() + seconds
    seen = []  # every record the scheduler showed of the job while it was queued or running
    while time.monotonic() < deadline:
        if scheduler == "slurm":
            proc = _run("scontrol", "show", "job", "-o", job_id)
            seen.append(proc.stdout)
            fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
            if fields.get("JobState") in TERMINAL_SLURM:
                code = int(fields["ExitCode"].split(":")[0])
                return {
                    "state": fields["JobState"],
                    "exit": code,
                    "start": fields["StartTime"],
                    "end": fields["EndTime"],
                    "raw": "\n".join(seen),
                }
        else:
            queued = _run("qstat", "-j", job_id)
            seen.append(queued.stdout)
            if "error reason" in queued.stdout:  # Eqw: it would wait for qdel forever
                _run("qdel", job_id)
                return {"state": "ERROR", "exit": -1, "start": "", "end": "", "raw": queued.stdout}
            if queued.returncode != 0:  # no longer queued or running
                proc = _run("qacct", "-j", job_id)
                if proc.returncode == 0:
                    fields = dict(re.findall(r"^(\w+)\s+(.*?)\s*$", proc.stdout, re.M))
                    code = int(fields["exit_status"].split()[0])
                    return {
                        "state": "COMPLETED" if code == 0 and fields["failed"].startswith("0") else "FAILED",
                        "exit": code,
                        "start": fields["start_time"],
                        "end": fields["end_time"],
                        "raw": "\n".join([*seen, proc.stdout]),
                    }
        time.sleep(0.5)
    raise AssertionError(f"{scheduler} job {job_id} did not finish within {seconds} s")


def project_for(tmp_path: Path, name: str = "p") -> Path:
    # small resources so the one-node test cluster can run it; a path that needs quoting;
    # an e-mail address, so the profile's failure-mail option goes to the real scheduler too
    config = new_project(tmp_path / WEIRD / name, MemUsage="500", TimeUsage="0:10:0", CoreUsage="1")
    data = json.loads(config.read_text())
    data["EmailAddress"] = "pi@lab.example.edu"
    config.write_text(json.dumps(data, indent=2))
    return config


# ----------------- DICOMweb: what Orthanc stores (tests/integration/test_source_dicomweb.py)

TIMEOUT = 20.0  # seconds, every HTTP request


def file_meta_end(data: bytes) -> int:
    """Where the data set starts in a Part-10 file (after preamble and file meta)."""
    from pydicom.filereader import read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    try:
        from pydicom.filereader import _read_file_meta_info as read_meta
    except ImportError:  # pragma: no cover
        read_meta = read_file_meta_info
    read_meta(fp)
    return fp.tell()


def transfer_syntax(data: bytes) -> str:
    import pydicom

    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def original(dicom_env, rec: dict) -> bytes:
    return (Path(dicom_env["CLPIPE_DICOM_DATA"]) / rec["path"]).read_bytes()


def assert_same_instance(dicom_env, rec: dict, data: bytes) -> None:
    """``data`` carries the generated instance: same data set bytes, same transfer syntax."""
    source_file = original(dicom_env, rec)
    assert data[file_meta_end(data) :] == source_file[file_meta_end(source_file) :], rec["path"]
    assert transfer_syntax(data) == rec["TransferSyntaxUID"], rec["path"]


def stored_file(dicom_env, sop_uid: str) -> bytes:
    """The file as Orthanc stores it, through its own REST API."""
    base = dicom_env["CLPIPE_ORTHANC_HTTP"]
    found = httpx.post(f"{base}/tools/lookup", content=sop_uid, timeout=TIMEOUT).raise_for_status().json()
    ident = next(f["ID"] for f in found if f["Type"] == "Instance")
    return httpx.get(f"{base}/instances/{ident}/file", timeout=TIMEOUT).raise_for_status().content


# ----------------------- DIMSE: a received instance (tests/integration/test_source_dimse.py)


def check_instance(uid: str, data: bytes, rec: dict, data_root: Path, converts: bool = False) -> None:
    """A received instance is a Part-10 file with the original's elements, in the original's
    transfer syntax (a compressed series stays compressed) unless the server ``converts``:
    then in Explicit VR Little Endian with the original's decoded pixels."""
    from clpipe.testing import dicomdata

    assert data[128:132] == b"DICM"
    got = pydicom.dcmread(io.BytesIO(data))
    original = pydicom.dcmread(data_root / rec["path"])
    assert got.file_meta.MediaStorageSOPInstanceUID == got.SOPInstanceUID == uid
    assert got.file_meta.MediaStorageSOPClassUID == got.SOPClassUID == rec["SOPClassUID"]
    syntax = dicomdata.EXPLICIT_LE if converts else rec["TransferSyntaxUID"]
    assert got.file_meta.TransferSyntaxUID == syntax
    for elem in original:
        if elem.keyword == "PixelData":
            continue
        assert elem.tag in got, f"{uid}: {elem.keyword or elem.tag} missing"
        assert got[elem.tag].value == elem.value, f"{uid}: {elem.keyword or elem.tag} differs"
    pixels = original.PixelData
    if rec["TransferSyntaxUID"] == dicomdata.RLE_LOSSLESS and syntax != rec["TransferSyntaxUID"]:
        from pydicom.pixels import get_decoder

        pixels = bytes(get_decoder(dicomdata.RLE_LOSSLESS).as_buffer(original)[0])
    assert got.PixelData == pixels
    assert int(got.get("NumberOfFrames", 1)) == rec["NumberOfFrames"]


# ---------------------------------------------------------------- a project whose names collide


def hostile_project() -> tuple:
    """16 files whose names collide in every way the issue found (one of them listed twice),
    and where each file's bytes must land: the names that needed no change keep them
    (a Flywheel test server Project, {bytes: path})."""
    import unicodedata

    from clpipe.testing.fwserver import Acquisition, FwFile, Project, Session, Subject

    NFC, NFD = unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")  # noqa: N806 (as test_names names them)

    def f(name: str, tag: str) -> FwFile:
        return FwFile(name, f"{tag}:".encode() * 7)  # same size for all: only the bytes tell them apart

    twice = f("twice.dcm", "twice")
    long1, long2 = "L" * 300 + "1.dcm", "L" * 300 + "2.dcm"
    project = Project(
        "lab",
        "hostile",
        [
            Subject(NFC, [Session("s1", [Acquisition("T1", [f("a.dcm", "nfc-subject")])])]),
            Subject(NFD, [Session("s1", [Acquisition("T1", [f("a.dcm", "nfd-subject")])])]),
            Subject(
                "P1",
                [
                    Session("a/../normal", [Acquisition("x", [f("b.dcm", "dotdot-session")])]),
                    Session("normal", [Acquisition("x", [f("b.dcm", "normal-session")])]),
                    Session("s2", [Acquisition(" x ", [f("c.dcm", "spaced-acq")]), Acquisition("x", [f("c.dcm", "plain-acq")])]),
                    Session(
                        "s3",
                        [
                            Acquisition(
                                "files",
                                [
                                    f("ctl\x07.dcm", "bell"),
                                    f("ctl\x1b.dcm", "escape"),
                                    f("ctl_.dcm", "underscore"),
                                    f(" sp.dcm", "lead-space"),
                                    f("sp.dcm", "no-space"),
                                    f(long1, "long1"),
                                    f(long2, "long2"),
                                    f(unicodedata.normalize("NFC", "é.dcm"), "nfc-file"),
                                    f(unicodedata.normalize("NFD", "é.dcm"), "nfd-file"),
                                    twice,
                                    twice,  # the server lists the same file twice: one local file
                                ],
                            )
                        ],
                    ),
                ],
            ),
        ],
    )
    plain = {  # bytes -> the path of the one that keeps the plain name
        b"normal-session:" * 7: "SUBJECTS/P1/SESSIONS/normal/ACQUISITIONS/x/FILES/b.dcm",
        b"plain-acq:" * 7: "SUBJECTS/P1/SESSIONS/s2/ACQUISITIONS/x/FILES/c.dcm",
        b"underscore:" * 7: "SUBJECTS/P1/SESSIONS/s3/ACQUISITIONS/files/FILES/ctl_.dcm",
        b"no-space:" * 7: "SUBJECTS/P1/SESSIONS/s3/ACQUISITIONS/files/FILES/sp.dcm",
        b"twice:" * 7: "SUBJECTS/P1/SESSIONS/s3/ACQUISITIONS/files/FILES/twice.dcm",
    }
    return project, plain
