"""`clpipe dicom sync -config_file clpipe_config.json -submit`, the real command, end to end,
for every DICOM source scheme against the real servers of scripts/infra/dicom-up.sh:

- DICOMweb (Orthanc), DIMSE C-GET (Orthanc, dcmqrscp), DIMSE C-MOVE (Orthanc, to an AE
  registered with it for the test: ``move_destination``) and file:// (an untidy export tree made by
  clpipe.testing.dicomdata.make_file_tree), each run here (no batch system): exit 0, every
  SOPInstanceUID once in {subject}/{session}/{series}, bytes as the server keeps them, the
  log, audit CSV and summary in <project>/logs/sync_logs, DICOMFormatString written into the
  config; a second run retrieves nothing and says so;
- the same through real SLURM and real Grid Engine (the fixtures of test_schedulers.py);
- failures: a closed port (DICOMweb, DIMSE; here and in a batch job) and a wrong called AE
  title end with exit 1, one `clpipe: error:` line naming the address, and no file in the
  dropoff; a busy MovePort fails every series, naming the port.

The servers may also hold the benchmarks' patients (PatientID BENCH*): every run here asks for
`SUB*`, the data set's patients. Without the servers or schedulers the tests fail, saying how
to start them. Every command has a timeout.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clpipe.sources.dicom import DEFAULT_TEMPLATE, series_folder
from clpipe.testing import dicomdata

from helpers import PROFILES, assert_same_instance, check_instance, files_under, new_project, project_for, stored_file, wait_for

pytestmark = pytest.mark.timeout(240)

TIMEOUT = 90  # seconds, for every clpipe command
QUERY = {"PatientID": "SUB*"}  # the data set's patients, not the benchmarks' BENCH*
FORMAT_STRING = "{subject}/{session}/"
CLPIPE = Path(sys.executable).parent / "clpipe"  # the installed command, not `python -m clpipe`


def clpipe(*args, timeout: float = TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    if not CLPIPE.is_file():
        pytest.fail(f"the clpipe command is not installed at {CLPIPE}: `pip install -e .` in the venv")
    return subprocess.run(
        [str(CLPIPE), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})),
        stdin=subprocess.DEVNULL,
    )


# ----------------------------------------------------------------------------- the schemes


@dataclass
class Case:
    url: str  # SourceURL, with {NAME} for a dicom-up.sh export
    check: str  # how the landed bytes are compared: tree, orthanc-web, orthanc-dimse, converts
    options: dict = field(default_factory=dict)  # SourceOptions besides SourceURL
    flags: tuple = ()  # command-line flags for both runs
    answers_description: bool = True  # does the server return SeriesDescription in C-FIND?


CASES = {
    "dicomweb-orthanc": Case("dicomweb+{CLPIPE_ORTHANC_DICOMWEB}", "orthanc-web", {"Query": QUERY}),
    "dimse-get-orthanc": Case("dimse://{CLPIPE_ORTHANC_DIMSE}", "orthanc-dimse", {"Query": QUERY}),
    "dimse-get-dcmqrscp": Case("dimse://{CLPIPE_DCMQRSCP_DIMSE}", "converts", {}, ("-patient_id", "SUB*"), answers_description=False),
    "dimse-move-orthanc": Case(
        "dimse://{CLPIPE_ORTHANC_DIMSE}",
        "orthanc-dimse",
        {"Query": QUERY, "RetrieveMethod": "move", "CallingAET": "{MOVE_AET}", "MovePort": "{MOVE_PORT}"},
    ),
    "file-tree": Case("file://{TREE}", "tree"),
}


@pytest.fixture(scope="module")
def export_tree(tmp_path_factory) -> tuple[Path, dict]:
    """The untidy scanner export (nested folders, odd names, non-DICOM files, duplicates, a
    file without preamble), written once for the module."""
    root = tmp_path_factory.mktemp("export") / "scanner export é"
    return root, dicomdata.make_file_tree(root)


@pytest.fixture
def move_destination(dicom_env):
    """A C-MOVE destination AE that Orthanc knows, on a free port: registered for this test
    through Orthanc's REST API (in memory) and removed after it. dicom-up.sh's own AE
    "CLPIPE" sits on the fixed $CLPIPE_MOVE_PORT, which bench/dicom_dimse.py holds for minutes
    while it runs: a test sharing that port would fail whenever the benchmark runs."""
    import httpx

    aet, port = f"SUBMIT{os.getpid() % 100000}", closed_port()
    modality = f"{dicom_env['CLPIPE_ORTHANC_HTTP']}/modalities/clpipe-submit-{os.getpid()}"
    httpx.put(modality, json={"AET": aet, "Host": "127.0.0.1", "Port": port}, timeout=20).raise_for_status()
    try:
        yield aet, port
    finally:
        httpx.delete(modality, timeout=20)


def resolve(case: Case, request) -> tuple[str, dict, dict]:
    """The case's SourceURL and SourceOptions with the real addresses, and the data set it holds."""
    if case.check == "tree":
        root, desc = request.getfixturevalue("export_tree")
        values = {"TREE": str(root)}
    else:
        values = dict(request.getfixturevalue("dicom_env"))
        desc = request.getfixturevalue("dicom_expected")
        if case.options.get("RetrieveMethod") == "move":
            values["MOVE_AET"], values["MOVE_PORT"] = request.getfixturevalue("move_destination")

    def fill(value):
        if not isinstance(value, str):
            return value
        return int(value.format(**values)) if value == "{MOVE_PORT}" else value.format(**values)

    return fill(case.url), {k: fill(v) for k, v in case.options.items()}, desc


def expected_layout(desc: dict, answers_description: bool = True) -> dict[str, dict]:
    """dropoff-relative path -> instance record: {subject}/{session}/{series}/<SOPInstanceUID>.dcm."""
    studies = {st["StudyInstanceUID"]: st for st in desc["studies"]}
    series = {se["SeriesInstanceUID"]: se for se in desc["series"]}
    out = {}
    for rec in desc["instances"]:
        se, st = series[rec["SeriesInstanceUID"]], studies[rec["StudyInstanceUID"]]
        attrs = {
            "PatientID": rec["PatientID"],
            "PatientName": rec["PatientName"],
            "StudyDate": st["StudyDate"] or "",
            "SeriesNumber": "" if se["SeriesNumber"] is None else str(se["SeriesNumber"]),
            "SeriesDescription": (se["SeriesDescription"] or "") if answers_description else "",
            "Modality": se["Modality"],
        }
        out[f"{series_folder(DEFAULT_TEMPLATE, attrs)}/{rec['SOPInstanceUID']}.dcm"] = rec
    return out


#: folders the default layout must make of the data set's odd series (spelled out here, not
#: computed, so a change in the layout rules shows)
ODD_FOLDERS = {
    True: {
        "SUB01/20240115/001-T1w_MPRAGE",
        "SUB01/20240115/002-rs-fMRI_run_1",
        "SUB01/20240115/003-.._.._etc",
        "SUB01/20240115/004-T2_RLE",
        "SUB01/nodate/NA-MR",
        "SUB01/nodate/002-DWI_b=1000_x",
        "SUB02/20240220/001-sequence_localizer_e",
        "SUB02/20240220/002-T1w",
        "SUB02/20240220/003-T1w",
        "SUB03x/20240305/001-Serie_1_a_b_c_d",
        "SUB03x/20240305/002-leading_spaces",
    },
    False: {"SUB01/20240115/004-MR", "SUB01/nodate/NA-MR", "SUB02/20240220/001-MR", "SUB03x/20240305/003-MR"},
}


def check_bytes(check: str, landed: dict[str, bytes], want: dict[str, dict], env: dict) -> None:
    """Each landed file carries its instance as the source keeps it."""
    data_root = Path(env.get("CLPIPE_DICOM_DATA", "/nonexistent"))
    for rel, rec in want.items():
        data = landed[rel]
        if check == "tree":  # a copy of the export's file, byte for byte (the preamble-less one too)
            assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["size"], rel
        elif check in ("orthanc-web", "orthanc-dimse"):  # Orthanc's own file meta, the data set as generated
            assert_same_instance(env, rec, data)
        else:  # dcmqrscp sends Explicit VR LE: the same elements, RLE pixels decoded
            check_instance(rec["SOPInstanceUID"], data, rec, data_root, converts=True)
            if rec["TransferSyntaxUID"] == dicomdata.EXPLICIT_LE:
                assert_same_instance(env, rec, data)


# ----------------------------------------------------------------------------- helpers


def configure(config: Path, url: str, **source) -> None:
    data = json.loads(config.read_text())
    data["SourceOptions"].update(SourceURL=url, **source)
    config.write_text(json.dumps(data, indent=2))


def format_string(config: Path) -> str:
    return json.loads(config.read_text())["DICOMToBIDSOptions"]["DICOMFormatString"]


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    log: Path
    log_text: str
    summary: dict
    audit: list[dict]


def local_run(config: Path, *flags) -> Run:
    """`clpipe dicom sync -config_file CONFIG -submit` with no batch system: its console
    output, and the log, summary and audit CSV it names."""
    proc = clpipe("dicom", "sync", "-config_file", config, *flags, "-submit")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    match = re.search(r"^Running dicom_sync here; log: (.+)$", proc.stdout, re.M)
    assert match, out
    log = Path(match.group(1))
    assert log.parent == config.parent / "logs" / "sync_logs" and re.fullmatch(r"dicom_sync-[\w-]+\.log", log.name), log
    text = log.read_text()
    assert text.strip() and text in proc.stdout, (text, proc.stdout)  # the console saw what the log keeps
    match = re.search(r"audit log: (\S+\.csv); summary: (\S+\.summary\.json)$", text, re.M)
    assert match, text
    audit_csv, summary = Path(match.group(1)), Path(match.group(2))
    assert audit_csv.parent == summary.parent == log.parent
    with audit_csv.open(newline="") as fh:
        audit = list(csv.DictReader(fh))
    return Run(proc, log, text, json.loads(summary.read_text()), audit)


def stat_all(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.dcm")}


def assert_landed(dropoff: Path, want: dict[str, dict], answers_description: bool = True) -> dict[str, bytes]:
    """Exactly the expected files in the dropoff, each SOPInstanceUID once, nothing else."""
    landed = files_under(dropoff)
    assert set(landed) == set(want), (sorted(set(landed) - set(want))[:5], sorted(set(want) - set(landed))[:5])
    names = [Path(rel).name for rel in landed]
    assert len(names) == len(set(names)) == len({r["SOPInstanceUID"] for r in want.values()})
    folders = {str(Path(rel).parent) for rel in landed}
    assert ODD_FOLDERS[answers_description] <= folders, sorted(folders)
    assert all(".." not in Path(rel).parts for rel in landed)
    return landed


def assert_nothing_landed(root: Path) -> None:
    """No file in the dropoff (its bookkeeping folder included) or the temp folder."""
    for folder in (root / "data_DICOMs", root / "flywheel_tmp"):
        written = [str(p) for p in folder.rglob("*") if not p.is_dir()] if folder.exists() else []
        assert written == [], written


# ----------------------------------------------------------------------------- here, no batch system


@pytest.mark.parametrize("name", list(CASES))
def test_submit_here_lands_every_instance_once_then_retrieves_nothing(name, request, tmp_path):
    case = CASES[name]
    url, options, desc = resolve(case, request)
    env = request.getfixturevalue("dicom_env") if case.check != "tree" else {}
    config = new_project(tmp_path / "proj")
    configure(config, url, **options)
    root, dropoff = config.parent, config.parent / "data_DICOMs"
    assert json.loads(config.read_text())["BatchConfig"] == ""  # run here
    want = expected_layout(desc, case.answers_description)
    n = len(want)
    assert n == desc["counts"]["instances"] == 139

    first = local_run(config, *case.flags)
    # the layout's DICOMFormatString is in the config, and the run said so
    assert format_string(config) == FORMAT_STRING
    assert f"DICOMToBIDSOptions.DICOMFormatString in {config} set to '{FORMAT_STRING}'" in first.proc.stdout
    login = "credentials: none set; " if url.startswith("dicomweb") else ""  # the job says which login it used
    assert f"[clpipe] native engine; source {url}; {login}layout {DEFAULT_TEMPLATE}" in first.log_text
    assert f"listed {len(desc['series'])} series" in first.log_text
    assert f"Sync summary: {n} created, 0 updated, 0 skipped, 0 failed;" in first.log_text
    assert "sync complete: every listed file is in the dropoff" in first.log_text
    assert (first.summary["created"], first.summary["failed"], first.summary["source"]) == (n, 0, url)

    landed = assert_landed(dropoff, want, case.answers_description)
    assert first.summary["bytes"] == sum(map(len, landed.values()))
    check_bytes(case.check, landed, want, env)
    if case.check == "orthanc-web":  # DICOMweb sends the very file Orthanc stores (RLE kept)
        for rel, rec in want.items():
            if rec["SeriesInstanceUID"] == desc["odd"]["rle_series"]:
                assert landed[rel] == stored_file(env, rec["SOPInstanceUID"]), rel
    assert sorted(row["dest_path"] for row in first.audit) == sorted(want)
    assert {row["status"] for row in first.audit} == {"completed"}
    assert not [p for p in (root / "flywheel_tmp").rglob("*") if p.is_file()]  # nothing left in TempDirectory
    before = stat_all(dropoff)
    # one session per study folder, each "arriving": a DICOM source gives no modification
    # times, so a session first seen now may still grow for StableAfter (30 minutes)
    sessions = session_records(dropoff)
    assert set(sessions) == {str(Path(rel).parent.parent) for rel in want}
    assert {r["state"] for r in sessions.values()} == {"arriving"}
    for path, record in sessions.items():
        files = [rel for rel in landed if rel.startswith(path + "/")]
        assert record["files"] == len(files) and record["bytes"] == sum(len(landed[rel]) for rel in files), path
        assert record["series"] == len({str(Path(rel).parent) for rel in files}), path
        assert (record["subject"], record["session"]) == tuple(path.split("/")), path
    assert sorted(row[3] for row in session_changes(root)) == ["arriving"] * len(sessions)

    second = local_run(config, *case.flags, "-stable_after", "0")  # nothing changed since: complete
    assert second.log != first.log and "DICOMFormatString" not in second.proc.stdout  # already set
    assert f"Sync summary: 0 created, 0 updated, {n} skipped, 0 failed; 0 B (0 bytes);" in second.log_text
    assert "sync complete" in second.log_text
    s = second.summary
    assert (s["created"], s["updated"], s["skipped"], s["failed"], s["bytes"]) == (0, 0, n, 0, 0)
    assert {row["status"] for row in second.audit} == {"skipped"} and len(second.audit) == n
    assert files_under(dropoff) == landed and stat_all(dropoff) == before  # not a file rewritten
    assert format_string(config) == FORMAT_STRING
    assert {r["state"] for r in session_records(dropoff).values()} == {"complete"}
    assert [(row[2], row[3]) for row in session_changes(root)] == [("arriving", "complete")] * len(sessions)
    with open(root / ".pipeline" / "status_log.csv", newline="") as fh:
        events = [(row["subject"], row["step"], row["event"]) for row in csv.DictReader(fh)]
    assert sorted(events) == sorted(
        [(r["subject"], "ingestion", "arriving") for r in sessions.values()]
        + [(r["subject"], "ingestion", "complete") for r in sessions.values()]
    )


def session_records(dropoff: Path) -> dict[str, dict]:
    data = json.loads((dropoff / ".clpipe-sync" / "sessions.json").read_text())
    return {r["path"]: r for r in data["sessions"]}


def session_changes(root: Path) -> list[list[str]]:
    """The rows (no header) of the newest run's sessions TSV."""
    newest = max((root / "logs" / "sync_logs").glob("*.sessions.tsv"), key=lambda p: p.stat().st_mtime_ns)
    lines = newest.read_text().splitlines()
    assert lines[0] == "subject\tsession\told_state\tnew_state\tpath"
    return [line.split("\t") for line in lines[1:]]


# ----------------------------------------------------------------------------- through real batch systems


def batch_project(tmp_path: Path, url: str, **options) -> Path:
    config = project_for(tmp_path)  # small resources, a path that needs quoting, an e-mail address
    configure(config, url, **options)
    return config


def batch_submit(config: Path, scheduler_name: str, env: dict | None = None) -> str:
    proc = clpipe("dicom", "sync", "-config_file", config, "-batch_config", PROFILES[scheduler_name][1], "-submit", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^Submitted batch job (\d+)$", proc.stdout, re.M)
    assert match, proc.stdout
    return match.group(1)


@pytest.mark.parametrize("scheduler, name", [("slurm", "dicomweb-orthanc"), ("sge", "dimse-get-orthanc")], indirect=["scheduler"])
def test_submit_through_the_scheduler_completes_with_every_instance(scheduler, name, request, tmp_path, dicom_env):  # noqa: F811
    case = CASES[name]
    url, options, desc = resolve(case, request)
    config = batch_project(tmp_path, url, **options)
    root = config.parent
    job_id = batch_submit(config, scheduler)
    result = wait_for(scheduler, job_id)
    assert (result["state"], result["exit"]) == ("COMPLETED", 0), result["raw"]

    logs = root / "logs" / "sync_logs"
    output = (logs / f"Output-dicom_sync-jobid-{job_id}.out").read_text()
    n = desc["counts"]["instances"]
    assert f"[clpipe] native engine; source {url}" in output
    assert f"Sync summary: {n} created, 0 updated, 0 skipped, 0 failed;" in output and "sync complete" in output
    want = expected_layout(desc)
    landed = assert_landed(root / "data_DICOMs", want)
    check_bytes(case.check, landed, want, dicom_env)
    record = json.loads((logs / "dicom_sync-latest.job.json").read_text())
    assert record["job_id"] == job_id and record["scheduler"] == scheduler
    assert format_string(config) == FORMAT_STRING
    (summary,) = logs.glob("dicom_sync-*.summary.json")
    assert json.loads(summary.read_text())["created"] == n


@pytest.mark.parametrize("scheduler", ["slurm", "sge"], indirect=True)
def test_a_dicomweb_login_reaches_the_batch_job_through_a_private_file(scheduler, tmp_path, dicom_env):  # noqa: F811
    """CLPIPE_DICOMWEB_USER/PASSWORD set in the submitting shell reach the job (Grid Engine
    passes no environment of its own accord) through a 0600 hand-off file in the home
    folder, which the job deletes when it starts; the values are written nowhere else: not
    in the script, the submit command (no qsub -v, whose values `qstat -j` shows), the job
    record or the logs."""
    user, password = "clpipe-test-user", "s3cret-value-9f2c"
    config = batch_project(tmp_path, f"dicomweb+{dicom_env['CLPIPE_ORTHANC_DICOMWEB']}", Query={"PatientID": "SUB01"})
    env = {"CLPIPE_DICOMWEB_USER": user, "CLPIPE_DICOMWEB_PASSWORD": password}
    job_id = batch_submit(config, scheduler, env=env)
    logs = config.parent / "logs" / "sync_logs"
    (script,) = logs.glob("dicom_sync-*.sh")
    handoff = Path.home() / ".clpipe" / "handoff" / f"{script.stem}.json"
    assert f"export CLPIPE_HANDOFF_FILE={handoff}" in script.read_text()
    result = wait_for(scheduler, job_id)
    assert (result["state"], result["exit"]) == ("COMPLETED", 0), result["raw"]
    output = (logs / f"Output-dicom_sync-jobid-{job_id}.out").read_text()
    assert "credentials: the user name and password in CLPIPE_DICOMWEB_USER/CLPIPE_DICOMWEB_PASSWORD" in output, output
    assert "CLPIPE_DICOMWEB_USER, CLPIPE_DICOMWEB_PASSWORD reach the job in a file only you can read" in script.read_text()
    assert not handoff.exists(), "the job did not delete its hand-off file"
    record = json.loads((logs / "dicom_sync-latest.job.json").read_text())
    assert record["job_id"] == job_id and "-v" not in record["submit_command"]
    written = [p for p in config.parent.rglob("*") if p.is_file()]  # the engine's .clpipe-sync too
    assert len(written) > 10
    for path in written:
        text = path.read_bytes()
        assert password.encode() not in text and user.encode() not in text, path
    assert files_under(config.parent / "data_DICOMs"), "nothing landed"


@pytest.mark.parametrize("scheduler", ["slurm", "sge"], indirect=True)
def test_a_batch_job_that_cannot_reach_the_pacs_fails(scheduler, tmp_path):  # noqa: F811
    port = closed_port()
    config = batch_project(tmp_path, f"dimse://ORTHANC@127.0.0.1:{port}")
    job_id = batch_submit(config, scheduler)
    result = wait_for(scheduler, job_id)
    assert result["state"] == "FAILED" and result["exit"] == 1, result["raw"]
    output = (config.parent / "logs" / "sync_logs" / f"Output-dicom_sync-jobid-{job_id}.out").read_text()
    errors = [line for line in output.splitlines() if line.startswith("clpipe: error:")]
    assert len(errors) == 1 and f"could not connect to the PACS ORTHANC@127.0.0.1:{port}: connection refused" in errors[0], output
    assert "Traceback" not in output and "internal error" not in output
    assert_nothing_landed(config.parent)


# ----------------------------------------------------------------------------- failures, in words


def failed_run(config: Path) -> tuple[str, str]:
    """A run that must fail: its one error line, and the log it wrote."""
    proc = clpipe("dicom", "sync", "-config_file", config, "-submit")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "internal error" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("clpipe: error:")]
    assert len(errors) == 1, out
    (log,) = (config.parent / "logs" / "sync_logs").glob("dicom_sync-*.log")
    text = log.read_text()
    assert errors[0] in text  # the batch log says it too
    assert not list(log.parent.glob("*.summary.json"))  # nothing was synced, so no summary
    assert_nothing_landed(config.parent)
    return errors[0], text


@pytest.mark.parametrize("scheme", ["dicomweb", "dimse"])
def test_unreachable_server_fails_in_one_line_naming_it(scheme, tmp_path):
    port = closed_port()
    url = {"dicomweb": f"dicomweb+http://127.0.0.1:{port}/dicom-web", "dimse": f"dimse://ORTHANC@127.0.0.1:{port}"}[scheme]
    config = new_project(tmp_path / "proj")
    configure(config, url)
    error, _ = failed_run(config)
    if scheme == "dicomweb":
        assert f"cannot connect to the DICOMweb server at http://127.0.0.1:{port}/dicom-web (connection refused)" in error
        assert f"check the SourceURL {url}" in error
    else:
        assert f"could not connect to the PACS ORTHANC@127.0.0.1:{port}: connection refused" in error
        assert "SourceURL" in error


def test_wrong_called_ae_title_is_named(dicom_env, tmp_path):
    """dcmqrscp checks the called AE title (Orthanc, as configured, answers to any)."""
    address = dicom_env["CLPIPE_DCMQRSCP_DIMSE"].split("@", 1)[1]
    config = new_project(tmp_path / "proj")
    configure(config, f"dimse://NOSUCHAE@{address}")
    error, _ = failed_run(config)
    assert f"NOSUCHAE@{address} rejected the association: it does not know the called AE title 'NOSUCHAE'" in error
    assert "check the AE title in the SourceURL" in error


def test_busy_move_port_is_named_and_fails_the_run(dicom_env, tmp_path):
    """RetrieveMethod "move" and MovePort from the config reach the C-MOVE retrieval: a port
    something else holds fails every series, in words, with exit status 1."""
    config = new_project(tmp_path / "proj")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        configure(
            config, f"dimse://{dicom_env['CLPIPE_ORTHANC_DIMSE']}", RetrieveMethod="move", MovePort=port, Query={"PatientID": "SUB02"}
        )
        proc = clpipe("dicom", "sync", "-config_file", config, "-submit")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    failed = [line for line in out.splitlines() if line.startswith("[clpipe] FAILED ")]
    assert len(failed) == 3 and all(
        f"cannot receive C-MOVE images on 127.0.0.1:{port}" in line and "MovePort" in line for line in failed
    ), out
    assert "Sync summary: 0 created, 0 updated, 0 skipped, 3 failed;" in out and "sync FAILED" in out
    assert "Traceback" not in out and "internal error" not in out
    assert not files_under(config.parent / "data_DICOMs")


def test_what_the_job_would_stop_on_is_found_before_it_is_queued(tmp_path):
    """A file:// folder that is not there: the preview says so in a Note line; -submit
    refuses with the same words, writes no plan or log and runs nothing."""
    missing = tmp_path / "export-not-mounted"
    config = new_project(tmp_path, source_url=f"file://{missing}")
    preview = clpipe("dicom", "sync", "-config_file", config)
    assert preview.returncode == 0, preview.stdout + preview.stderr
    assert f"Note:      the job would stop here: the source folder {missing} does not exist" in preview.stdout
    proc = clpipe("dicom", "sync", "-config_file", config, "-submit")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"clpipe: error: the source folder {missing} does not exist" in proc.stderr
    logs = config.parent / "logs" / "sync_logs"
    assert not (logs.is_dir() and list(logs.glob("dicom_sync-*"))), list(logs.iterdir())


def test_dicomweb_login_set_twice_and_ca_certs_for_dimse_are_refused_at_submit(tmp_path, dicom_env):
    config = new_project(tmp_path, source_url=f"dicomweb+{dicom_env['CLPIPE_ORTHANC_DICOMWEB']}")
    proc = clpipe(
        "dicom",
        "sync",
        "-config_file",
        config,
        "-submit",
        env={"CLPIPE_DICOMWEB_TOKEN": "t", "CLPIPE_DICOMWEB_USER": "u", "CLPIPE_DICOMWEB_PASSWORD": "p"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "set either CLPIPE_DICOMWEB_TOKEN (a Bearer token) or CLPIPE_DICOMWEB_USER and" in proc.stderr
    assert not list((config.parent / "data_DICOMs").rglob("*.dcm"))
    configure(config, f"dimse://{dicom_env['CLPIPE_ORTHANC_DIMSE']}", CommandLineOpts="--ca-certs /etc/ssl/certs/x.pem")
    proc = clpipe("dicom", "sync", "-config_file", config, "-submit")
    assert proc.returncode == 2 and "--ca-certs is for https sources; for DICOM over TLS set TLSCAFile" in proc.stderr


def test_a_file_the_folder_holds_but_cannot_be_read_fails_the_run(tmp_path):
    """A broken symbolic link (as root, the one unreadable file a test can make) in an
    export folder: everything else lands, the file is named as FAILED, the exit status is
    non-zero; once it is removed, the next run completes with nothing to copy."""
    root = tmp_path / "export"
    desc = dicomdata.make_file_tree(root)
    dangling = root / "sub-extra" / "IM0001.dcm"
    dangling.parent.mkdir()
    dangling.symlink_to(root / "gone-before-the-sync.dcm")
    config = new_project(tmp_path / "p", source_url=f"file://{root}")
    proc = clpipe("dicom", "sync", "-config_file", config, "-submit")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"FAILED {dangling}: a broken symbolic link (in the source; not synced)" in out
    assert "could not read 1 files, so the run fails" in out and "sync FAILED" in out
    assert_landed(config.parent / "data_DICOMs", expected_layout(desc))
    dangling.unlink()
    again = clpipe("dicom", "sync", "-config_file", config, "-submit")
    assert again.returncode == 0 and "sync complete" in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("scheduler", ["slurm"], indirect=True)
def test_a_folder_this_login_node_cannot_see_is_a_note_for_a_batch_job(scheduler, tmp_path):  # noqa: F811
    """A compute node may mount a share the login node does not: a batch job is still
    submitted, with a note; the job checks again on its node (here the same machine, so
    it fails there, in words, and says FAILED to the scheduler)."""
    missing = tmp_path / "share-on-compute-nodes-only"
    config = batch_project(tmp_path, f"file://{missing}")
    proc = clpipe("dicom", "sync", "-config_file", config, "-batch_config", PROFILES[scheduler][1], "-submit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Note:      on this machine: the source folder {missing} does not exist" in proc.stdout
    job_id = re.search(r"^Submitted batch job (\d+)$", proc.stdout, re.M).group(1)
    result = wait_for(scheduler, job_id)
    assert result["state"] == "FAILED" and result["exit"] == 1, result["raw"]
    output = (config.parent / "logs" / "sync_logs" / f"Output-dicom_sync-jobid-{job_id}.out").read_text()
    assert f"clpipe: error: the source folder {missing} does not exist" in output
