"""Per-session states written by real syncs of `clpipe dicom flywheel_sync` from the bundled
Flywheel test server: complete, partial (a 404 file), arriving (a file uploaded just now),
removed (a session deleted upstream), converted (its BIDS folder newer than its last sync),
with the sessions TSV of every run and the rows of clpipe's .pipeline/status_log.csv.
(The DICOM sources' sessions are checked in test_dicom_submit.py, on their real servers.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from clpipe.sync.sessions import state_of
from clpipe.testing import dicomdata
from clpipe.testing.fwserver import FlywheelTestServer, FwFile, make_demo_project

from helpers import KEY, login, native, new_project

pytestmark = pytest.mark.timeout(300)

SES = "SUBJECTS/{}/SESSIONS/ses-01"  # fw's layout, the project's URL ending in "/"


def sessions_json(dropoff: Path) -> dict[str, dict]:
    data = json.loads((dropoff / ".clpipe-sync" / "sessions.json").read_text())
    return {r["path"]: r for r in data["sessions"]}


def run_files(project: Path, suffix: str) -> list[Path]:
    return sorted((project / "logs" / "sync_logs").glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime_ns)


def tsv_rows(project: Path) -> list[list[str]]:
    """The newest run's sessions TSV, header first."""
    newest = run_files(project, ".sessions.tsv")[-1]
    return [line.split("\t") for line in newest.read_text().splitlines()]


def status_log(project: Path) -> list[list[str]]:
    with open(project / ".pipeline" / "status_log.csv", newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture
def three_subjects():
    project = make_demo_project(group="lab", label="study", subjects=3, sessions=1, acquisitions=2, slices=2, non_dicom=False)
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        yield server, project


def test_every_state_from_real_runs(no_fw_env, three_subjects, tmp_path):
    server, project = three_subjects
    login(no_fw_env, server)
    config = new_project(tmp_path / "p", Engine="native")
    root, dropoff = config.parent, config.parent / "data_DICOMs"
    s1, s2, s3 = (SES.format(f"sub-{i:02d}") for i in (1, 2, 3))

    # run 1: one file of sub-03 is gone from the server (404): partial; the others complete
    broken = project.subjects[2].sessions[0].acquisitions[1]
    server.add_fault(f"/api/containers/{broken.id}/files/.*", "status", status=404, method="GET")
    code, out, _ = native(no_fw_env, config)
    assert code == 1, out
    records = sessions_json(dropoff)
    assert {p: r["state"] for p, r in records.items()} == {s1: "complete", s2: "complete", s3: "partial"}, out
    assert "sessions: 2 complete, 1 partial" in out
    first = records[s1]
    landed = [p for p in (dropoff / s1).rglob("*") if p.is_file()]
    assert first["files"] == len(landed) == 2 * 2 + 1  # two zips of 2 slices unpacked, and the localizer
    assert first["bytes"] == sum(p.stat().st_size for p in landed)
    assert (first["subject"], first["session"], first["series"]) == ("sub-01", "ses-01", 3)  # 2 zipped series, the localizer
    assert records[s3]["missing"] == 1 and "404" in records[s3]["failures"][0]
    rows = tsv_rows(root)
    assert rows[0] == ["subject", "session", "old_state", "new_state", "path"]
    assert sorted(rows[1:]) == sorted(
        [["sub-01", "ses-01", "", "complete", f"{dropoff}/{s1}"], ["sub-02", "ses-01", "", "complete", f"{dropoff}/{s2}"],
         ["sub-03", "ses-01", "", "partial", f"{dropoff}/{s3}"]]
    )  # fmt: skip
    log = status_log(root)
    assert log[0] == ["subject", "session", "step", "event", "timestamp", "source", "note"]
    assert sorted((r[0], r[2], r[3], r[5]) for r in log[1:]) == [
        ("sub-01", "ingestion", "complete", "clpipe dicom sync"),
        ("sub-02", "ingestion", "complete", "clpipe dicom sync"),
        ("sub-03", "ingestion", "partial", "clpipe dicom sync"),
    ]
    assert "404" in [r for r in log[1:] if r[0] == "sub-03"][0][6]

    # run 2: the 404 is fixed; a series is uploaded to sub-01 just now; sub-02's session is deleted
    server.clear_faults()
    project.subjects[0].sessions[0].acquisitions[0].files.append(FwFile("late.dcm", b"DICM-late", modified=datetime.now(timezone.utc)))
    project.subjects[1].sessions.clear()
    code, out, _ = native(no_fw_env, config)
    assert code == 0, out
    records = sessions_json(dropoff)
    assert {p: r["state"] for p, r in records.items()} == {s1: "arriving", s2: "removed", s3: "complete"}
    assert sorted(tsv_rows(root)[1:]) == sorted(
        [["sub-01", "ses-01", "complete", "arriving", f"{dropoff}/{s1}"], ["sub-02", "ses-01", "complete", "removed", f"{dropoff}/{s2}"],
         ["sub-03", "ses-01", "partial", "complete", f"{dropoff}/{s3}"]]
    )  # fmt: skip
    assert len(status_log(root)) == 1 + 3 + 3

    # run 3: nothing changed upstream; sub-03 was converted meanwhile: converted; only its row is new
    nifti = root / "data_BIDS" / "sub-03" / "ses-01" / "anat" / "sub-03_ses-01_T1w.nii.gz"
    nifti.parent.mkdir(parents=True)
    nifti.write_bytes(b"nifti")
    later = time.time() + 5
    os.utime(nifti, (later, later))
    code, out, _ = native(no_fw_env, config)
    assert code == 0, out
    records = sessions_json(dropoff)
    assert {p: r["state"] for p, r in records.items()} == {s1: "arriving", s2: "removed", s3: "converted"}
    assert tsv_rows(root)[1:] == [["sub-03", "ses-01", "complete", "converted", f"{dropoff}/{s3}"]]
    assert len(status_log(root)) == 1 + 3 + 3 + 1

    # run 4 with StableAfter 0: sub-01 is complete; a run that changes nothing writes a header-only TSV next
    code, out, _ = native(no_fw_env, config, "-stable_after", "0")
    assert code == 0, out
    assert sessions_json(dropoff)[s1]["state"] == "complete"
    code, out, _ = native(no_fw_env, config, "-stable_after", "0")
    assert code == 0, out
    assert tsv_rows(root) == [["subject", "session", "old_state", "new_state", "path"]]
    summary = json.loads(run_files(root, ".summary.json")[-1].read_text())
    assert summary["sessions"] == {"complete": 1, "arriving": 0, "partial": 0, "new": 0, "removed": 1, "converted": 1}


def test_a_dry_run_writes_no_session_state(no_fw_env, server, tmp_path):
    login(no_fw_env, server)
    config = new_project(tmp_path / "p", Engine="native", CommandLineOpts="-y --dry-run")
    code, out, _ = native(no_fw_env, config)
    assert code == 0, out
    assert not (config.parent / "data_DICOMs" / ".clpipe-sync" / "sessions.json").exists()
    assert not run_files(config.parent, ".sessions.tsv")
    assert not (config.parent / ".pipeline").exists()


# ----------------------------------------------------------------------------- a mounted folder (file://)


def dicom_sync(config: Path, *flags) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clpipe", "dicom", "sync", "-c", str(config), *flags, "-submit"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        stdin=subprocess.DEVNULL,
    )


def test_folder_source_sessions_arrive_complete_grow_and_go(tmp_path):
    """A study copied in just now is arriving (a folder gives no time the engine trusts: the
    first sighting counts); with StableAfter 0 it is complete; a series added later makes its
    session arriving again; a patient deleted from the folder makes its sessions removed."""
    tree = tmp_path / "export"
    desc = dicomdata.make_file_tree(tree)
    config = new_project(tmp_path / "p", source_url=f"file://{tree}")
    root, dropoff = config.parent, config.parent / "data_DICOMs"
    proc = dicom_sync(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = sessions_json(dropoff)
    studies = {str(Path(p.relative_to(dropoff)).parent.parent) for p in dropoff.rglob("*.dcm")}
    assert set(records) == studies and {r["state"] for r in records.values()} == {"arriving"}
    assert sum(r["files"] for r in records.values()) == len(list(dropoff.rglob("*.dcm"))) == len(desc["instances"])
    assert {r["source_subject"] for r in records.values()} == {i["PatientID"] for i in desc["instances"]}

    proc = dicom_sync(config, "-stable_after", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["state"] for r in sessions_json(dropoff).values()} == {"complete"}

    # a new series of an existing study lands in the folder: its session is arriving again
    first = desc["instances"][0]
    ds = pydicom.dcmread(tree / first["path"])
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesNumber = 77
    ds.save_as(tree / "late-series.dcm")
    before = sessions_json(dropoff)
    seen = time.time()
    proc = dicom_sync(config, "-stable_after", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = sessions_json(dropoff)
    grown = [p for p, r in records.items() if r["last_change"] >= seen]  # its listing changed: the time it was seen
    assert len(grown) == 1 and records[grown[0]]["source_subject"] == first["PatientID"]
    assert records[grown[0]]["files"] == before[grown[0]]["files"] + 1
    assert records[grown[0]]["series"] == before[grown[0]]["series"] + 1
    assert all(r["last_change"] == before[p]["last_change"] for p, r in records.items() if p != grown[0])
    # 30 minutes after the others' last change, only that session is still arriving
    later = max(r["last_change"] for p, r in records.items() if p != grown[0]) + 1800
    assert [p for p, r in records.items() if state_of(r, later, 1800, None) == "arriving"] == grown
    assert tsv_rows(root)[1:] == []  # complete before and after (StableAfter 0)

    # every file of one patient is deleted from the folder: that patient's sessions are removed
    gone = next(i["PatientID"] for i in desc["instances"] if i["PatientID"] != first["PatientID"])
    gone_uids = {i["SOPInstanceUID"] for i in desc["instances"] if i["PatientID"] == gone}
    for item in desc["tree"]["dicom_files"]:  # its copies too
        if item["SOPInstanceUID"] in gone_uids:
            (tree / item["path"]).unlink()
    proc = dicom_sync(config, "-stable_after", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = sessions_json(dropoff)
    assert {r["state"] for r in records.values() if r["source_subject"] == gone} == {"removed"}
    assert {r["state"] for r in records.values() if r["source_subject"] != gone} == {"complete"}
