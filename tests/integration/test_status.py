"""`clpipe dicom status` (issue 13, point 2) after real syncs: a file:// source (clpipe's
untidy export tree) and the bundled Flywheel server. The table, `-json` against
docs/status.schema.json, `-ready`, `-refresh` (one listing, no download), the states as of
now (StableAfter, the BIDS folders), the exit codes, and the `-html` page in a real headless
Chromium (Debian's `chromium`): no console message, one row per session, the chart."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import jsonschema
import pydicom
import pytest
from pydicom.uid import generate_uid

from clpipe.testing.dicomdata import make_file_tree

from helpers import ROOT, file_gets, login, native, need_tool, new_project

SCHEMA = json.loads((ROOT / "docs" / "status.schema.json").read_text(encoding="utf-8"))
STATE_DIR = ".clpipe-sync"


@pytest.fixture
def nenv(no_fw_env):
    return no_fw_env


def validate(data: dict) -> None:
    """``data`` against the schema, and every time in it a real ISO 8601 time with its offset."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    times = [data["generated"]] + [run["time"] for run in data["history"]]
    times += [s[key] for s in data["sessions"] for key in ("last_synced", "first_synced", "last_change") if s[key]]
    for stamp in times:
        assert datetime.fromisoformat(stamp).utcoffset() is not None, stamp


def status(env, config: Path, *flags, timeout=120) -> subprocess.CompletedProcess:
    return env.clpipe("dicom", "status", "-c", config, *flags, timeout=timeout)


def status_json(env, config: Path, *flags) -> dict:
    proc = status(env, config, "-json", *flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)  # stdout is the JSON object alone
    validate(data)
    return data


def dropoff_files(dropoff: Path) -> dict[str, int]:
    """relative path -> size of every synced file (the engine's state folder left out)."""
    out = {}
    for root, dirs, names in os.walk(dropoff):
        dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in names:
            path = Path(root, name)
            out[path.relative_to(dropoff).as_posix()] = path.stat().st_size
    return out


# ----------------------------------------------------------------------------- file://


@pytest.fixture
def export(tmp_path) -> Path:
    root = tmp_path / "scanner export"
    make_file_tree(root)
    return root


def file_sync(env, config: Path) -> str:
    proc = env.clpipe("dicom", "sync", "-c", config, "-submit", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_status_after_a_file_sync_table_json_ready_and_the_states_as_of_now(nenv, export, tmp_path):
    config = new_project(tmp_path / "p", f"file://{export}", StableAfter="0")
    dropoff = tmp_path / "p" / "data_DICOMs"
    file_sync(nenv, config)
    on_disk = dropoff_files(dropoff)

    # -json: the schema; one object per session folder; files and bytes are what the dropoff holds
    data = status_json(nenv, config)
    assert data["project"] == "t" and data["source"] == f"file://{export}" and data["dropoff"] == str(dropoff)
    sessions = data["sessions"]
    assert [s["state"] for s in sessions] == ["complete"] * 4
    assert data["counts"] == {"complete": 4, "arriving": 0, "partial": 0, "new": 0, "removed": 0, "converted": 0}
    folders = {str(Path(dropoff, *rel.split("/")[:2])) for rel in on_disk}
    assert {s["path"] for s in sessions} == folders
    for s in sessions:
        assert Path(s["path"]).is_absolute() and Path(s["path"]).is_dir()
        assert Path(s["path"]).relative_to(dropoff).parts == (s["subject"], s["session"])
        assert re.fullmatch(r"[A-Za-z0-9]+", s["bids_subject"]) and s["failures"] == []
        mine = {rel: size for rel, size in on_disk.items() if rel.startswith(f"{s['subject']}/{s['session']}/")}
        assert (s["files"], s["bytes"]) == (len(mine), sum(mine.values()))
    summaries = sorted((tmp_path / "p" / "logs" / "sync_logs").glob("*.summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["exit_state"] == "complete" and summary["finished"]
    assert data["last_sync"]["run_id"] == summary["run_id"] and data["last_sync"]["exit_state"] == "complete"
    assert data["last_sync"]["files"] == summary["created"] == len(on_disk)
    assert [run["run_id"] for run in data["history"]] == [summary["run_id"]]

    # the table: one row per session, the counts, the last sync
    proc = status(nenv, config)
    assert proc.returncode == 0, proc.stderr
    for s in sessions:
        assert re.search(rf"^{re.escape(s['subject'])} +{re.escape(s['session'])} +complete +{s['files']:,} ", proc.stdout, re.M), (
            proc.stdout
        )
    assert "4 complete, 0 arriving, 0 partial, 0 new, 0 removed, 0 converted" in proc.stdout
    assert "\x1b[" not in proc.stdout  # colours only on a terminal
    assert f"last sync: run {summary['run_id']}" in proc.stdout and proc.stderr == ""

    # -ready: the complete sessions alone, subject TAB session TAB absolute path, nothing else
    proc = status(nenv, config, "-ready")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines() == [f"{s['subject']}\t{s['session']}\t{s['path']}" for s in sessions]

    # converted: the session's BIDS folder holds a file newer than its last sync
    first = sessions[0]
    bids = tmp_path / "p" / "data_BIDS" / f"sub-{first['bids_subject']}" / f"ses-{first['bids_session']}" / "anat"
    bids.mkdir(parents=True)
    (bids / f"sub-{first['bids_subject']}_T1w.nii.gz").write_bytes(b"nifti")
    data = status_json(nenv, config)
    assert [s["state"] for s in data["sessions"]] == ["converted", "complete", "complete", "complete"]
    proc = status(nenv, config, "-ready")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3 and first["path"] not in proc.stdout

    # arriving: a StableAfter (the flag over the config) longer than the time since the files changed
    data = status_json(nenv, config, "-stable_after", "2h")
    assert data["stable_after"] == 7200 and {s["state"] for s in data["sessions"]} == {"arriving"}
    proc = status(nenv, config, "-ready", "-stable_after", "2h")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""

    # status reads, never writes: the dropoff and its bookkeeping are as they were
    assert dropoff_files(dropoff) == on_disk
    assert not list((tmp_path / "p" / "logs" / "sync_logs").glob("*status*"))


def new_instance(source: Path, target: Path, **changes) -> None:
    """A copy of the DICOM file ``source`` at ``target`` with new UIDs (``changes``: the
    attributes to set, e.g. a new StudyInstanceUID for a new session)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)


def studies(root: Path) -> dict[str, list[Path]]:
    """PatientID -> the DICOM files of the export (of that patient)."""
    out: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if "StudyInstanceUID" in ds:
                out.setdefault(str(ds.PatientID), []).append(path)
    return out


def test_refresh_lists_the_source_once_and_shows_new_changed_and_removed_sessions(nenv, export, tmp_path):
    config = new_project(tmp_path / "p", f"file://{export}", StableAfter="0")
    dropoff = tmp_path / "p" / "data_DICOMs"
    file_sync(nenv, config)
    before = status_json(nenv, config)
    state_file = dropoff / STATE_DIR / "sessions.json"
    listing_cache = dropoff / STATE_DIR / "folder-listing"  # file://'s listing cache: read by -refresh, never written
    kept = (state_file.read_bytes(), dropoff_files(dropoff), listing_cache.read_bytes())
    by_patient = studies(export)
    assert {"SUB01", "SUB02", "SUB 03/x"} <= set(by_patient), sorted(by_patient)

    # upstream: SUB02 gets a new series, SUB03's study goes away, a new patient arrives
    new_instance(by_patient["SUB02"][0], export / "late" / "extra.dcm", SeriesInstanceUID=generate_uid(), SeriesNumber=77)
    for path in by_patient["SUB 03/x"]:
        path.unlink()
    new_instance(
        by_patient["SUB01"][0],
        export / "new patient" / "a.dcm",
        PatientID="SUB09",
        PatientName="New^Patient",
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )

    data = status_json(nenv, config, "-refresh")
    assert data["refreshed"] is True
    by_subject: dict[str, list] = {}
    for s in data["sessions"]:
        by_subject.setdefault(s["subject"], []).append(s)
    assert [(s["state"], s["change"]) for s in by_subject["SUB09"]] == [("new", "new")]
    assert [(s["state"], s["change"]) for s in by_subject["SUB02"]] == [("partial", "changed")]  # the dropoff lacks the new series
    assert [(s["state"], s["change"]) for s in by_subject["SUB03x"]] == [("removed", "removed")]
    assert {(s["state"], s["change"]) for s in by_subject["SUB01"]} == {("complete", None)}
    assert len(data["sessions"]) == len(before["sessions"]) + 1
    # the table says the same
    proc = status(nenv, config, "-refresh")
    assert proc.returncode == 0, proc.stderr
    assert "source listed just now: 1 new, 1 changed, 1 removed sessions" in proc.stdout
    # nothing was downloaded or written: the dropoff and the sessions file are as they were
    assert (state_file.read_bytes(), dropoff_files(dropoff), listing_cache.read_bytes()) == kept
    # and without -refresh, status still tells what the last sync saw
    assert [s["state"] for s in status_json(nenv, config)["sessions"]] == [s["state"] for s in before["sessions"]]


def test_no_sync_yet_bad_input_and_a_damaged_sessions_file(nenv, export, tmp_path):
    config = new_project(tmp_path / "p", f"file://{export}")
    # no sync has run: one line, exit 0; -json is still one valid object
    proc = status(nenv, config)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
    assert "no sync has run yet" in proc.stdout and "clpipe dicom sync" in proc.stdout
    proc = status(nenv, config, "-json")
    assert proc.returncode == 0 and "no sync has run yet" in proc.stderr
    data = json.loads(proc.stdout)
    validate(data)
    assert data["sessions"] == [] and data["last_sync"] is None and data["history"] == []
    proc = status(nenv, config, "-ready")
    assert proc.returncode == 0 and proc.stdout == ""

    # bad input: exit 2, one line naming what to fix
    for flags, said in (
        (("-stable_after", "soon"), "expected a duration"),
        (("-json", "-ready"), "-json and -ready"),
        (("-html", str(tmp_path / "no such folder" / "s.html")), "-html"),
    ):
        proc = status(nenv, config, *flags)
        assert proc.returncode == 2, (flags, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("clpipe: error:") and proc.stderr.count("\n") == 1 and said in proc.stderr, proc.stderr
        assert "internal error" not in proc.stderr
    proc = status(nenv, tmp_path / "missing.json")
    assert proc.returncode == 2 and "clpipe: error:" in proc.stderr

    # a sessions file that is not one of ours: one line, exit 1, the next sync writes it anew
    file_sync(nenv, config)
    (tmp_path / "p" / "data_DICOMs" / STATE_DIR / "sessions.json").write_text("{ half a file")
    proc = status(nenv, config)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "the next sync writes it anew" in proc.stderr, proc.stderr
    file_sync(nenv, config)
    assert status(nenv, config).returncode == 0


# ----------------------------------------------------------------------------- Flywheel


def test_flywheel_partial_session_history_and_refresh_without_downloads(nenv, server, demo_project, tmp_path):
    login(nenv, server)
    config = new_project(tmp_path / "p", StableAfter="0")
    demo_project.assign_ids()
    sub2 = demo_project.subjects[1]
    broken = sub2.sessions[0].acquisitions[0]
    server.add_fault(rf"/files/localizer\.dcm$|{broken.id}.*localizer", "status", status=404)
    code, out, _ = native(nenv, config)
    assert code == 1, out  # a file failed: the sync says so
    data = status_json(nenv, config)
    assert [(s["subject"], s["state"]) for s in data["sessions"]] == [("sub-01", "partial"), ("sub-02", "partial")]
    assert all(s["failures"] and "404" in " ".join(s["failures"]) for s in data["sessions"]), data["sessions"]
    assert data["last_sync"]["exit_state"] == "failed" and data["history"][-1]["failed"] == 2
    proc = status(nenv, config, "-ready")
    assert proc.returncode == 0 and proc.stdout == ""  # partial sessions are not an error of status, and not ready

    server.clear_faults()
    code, out, _ = native(nenv, config)
    assert code == 0, out
    data = status_json(nenv, config)
    assert [(s["subject"], s["session"], s["state"]) for s in data["sessions"]] == [
        ("sub-01", "ses-01", "complete"),
        ("sub-02", "ses-01", "complete"),
    ]
    assert [s["source_subject"] for s in data["sessions"]] == ["sub-01", "sub-02"]
    assert [(s["bids_subject"], s["bids_session"]) for s in data["sessions"]] == [("01", "01"), ("02", "01")]
    assert [run["exit_state"] for run in data["history"]] == ["failed", "complete"]
    assert data["last_sync"]["run_id"] == data["history"][-1]["run_id"] and data["history"][-1]["files"] == 2
    proc = status(nenv, config, "-ready")
    assert [line.split("\t")[:2] for line in proc.stdout.splitlines()] == [["sub-01", "ses-01"], ["sub-02", "ses-01"]]

    # upstream, sub-02's session is deleted: -refresh lists once and downloads nothing
    demo_project.subjects.remove(sub2)
    mark = len(server.requests)
    data = status_json(nenv, config, "-refresh")
    assert [(s["subject"], s["state"], s["change"]) for s in data["sessions"]] == [
        ("sub-01", "complete", None),
        ("sub-02", "removed", "removed"),
    ]
    assert file_gets(server, mark) == [] and sum(r["path"] == "/api/download/targets" for r in server.requests[mark:]) == 1


# ----------------------------------------------------------------------------- the page


def chromium() -> Path:
    return need_tool(
        Path(shutil.which("chromium") or "/usr/bin/chromium"), "chromium (Debian package chromium; scripts/setup.sh installs it)"
    )


def load_in_chromium(page: Path, fragment: str = "", tmp: Path | None = None) -> tuple[str, list[str]]:
    """The DOM of ``page`` after its scripts ran, in headless Chromium, and every console
    message it logged (errors, uncaught exceptions, blocked loads)."""
    profile = (tmp or page.parent) / f"chromium-profile-{time.monotonic_ns()}"
    proc = subprocess.run(
        [
            str(chromium()),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.absolute().as_uri() + fragment,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


@pytest.mark.chromium
def test_the_console_check_sees_errors_and_blocked_loads(tmp_path):
    """The check of the page test itself: a page with an uncaught error and a load from the
    network shows both in what load_in_chromium returns."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; script-src 'unsafe-inline'\">"
        "</head><body><img src='http://127.0.0.1:9/x.png'><script>notDefined();</script></body></html>"
    )
    _, console = load_in_chromium(bad)
    assert any("Uncaught ReferenceError" in line for line in console), console
    assert any("Content Security Policy" in line for line in console), console


def rows_of(dom: str) -> list[tuple[str, bool]]:
    """(the row's cells' text joined by |, hidden) per row of the sessions table, in order."""
    body = dom.split('<table id="sessions">', 1)[1].split("</tbody>", 1)[0]
    out = []
    for attrs, cells in re.findall(r"<tr( [^>]*)>(.*?)</tr>", body, re.S):
        if "data-state" not in attrs:
            continue
        text = "|".join(re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", cells, re.S))
        out.append((text, "hidden" in attrs))
    return out


@pytest.mark.chromium
def test_the_html_page_in_headless_chromium(nenv, export, tmp_path):
    config = new_project(tmp_path / "p", f"file://{export}", StableAfter="0")
    file_sync(nenv, config)
    file_sync(nenv, config)  # two runs in the history
    sessions = status_json(nenv, config)["sessions"]
    first = sessions[0]
    bids = tmp_path / "p" / "data_BIDS" / f"sub-{first['bids_subject']}" / f"ses-{first['bids_session']}"
    bids.mkdir(parents=True)
    (bids / "x.nii.gz").write_bytes(b"nifti")
    page = tmp_path / "status.html"
    proc = status(nenv, config, "-html", page)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {page}" in proc.stdout and "4 sessions in" in proc.stdout  # the page, and the table as usual
    text = page.read_text(encoding="utf-8")
    # self-contained: nothing loaded from anywhere (the policy forbids it; no URL is referenced)
    assert "Content-Security-Policy" in text and not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert not re.search(r"@import|url\(", text)

    dom, console = load_in_chromium(page, tmp=tmp_path)
    assert console == [], console  # no error, no warning, no blocked load
    assert 'data-ready="1"' in dom  # the script ran to its end
    rows = rows_of(dom)
    assert len(rows) == len(sessions) == 4 and not any(hidden for _, hidden in rows)
    for (row, _), s in zip(rows, sessions, strict=True):
        assert row.startswith(f"{s['subject']}|{s['session']}|") and s["path"] in row
    assert re.search(r'<svg id="chart"[^>]*>', dom) and dom.count('<rect class="run"') == 2 * 2  # files and bytes, per run
    assert "4 of 4 sessions shown" in dom
    counts = re.findall(r'data-state="(\w+)" aria-pressed="\w+"[^>]*>.*?<b>(\d+)</b>', dom)
    assert dict(counts)["converted"] == "1" and dict(counts)["complete"] == "3"

    # filtered by state, and sorted, from the address (what a click on a count or a column sets)
    dom, console = load_in_chromium(page, "#state=converted", tmp=tmp_path)
    assert console == [] and [hidden for _, hidden in rows_of(dom)].count(False) == 1
    assert "1 of 4 sessions shown" in dom and 'data-state="converted" aria-pressed="true"' in dom
    shown = [row for row, hidden in rows_of(dom) if not hidden]
    assert shown[0].startswith(f"{first['subject']}|{first['session']}|converted")
    dom, console = load_in_chromium(page, "#sort=bytes&desc", tmp=tmp_path)
    assert console == []
    order = [row.split("|")[-1] for row, _ in rows_of(dom)]
    assert order == [s["path"] for s in sorted(sessions, key=lambda s: -s["bytes"])]
    assert re.search(r'<th data-key="bytes"[^>]*aria-sort="descending"', dom)


# ----------------------------------------------------------------------------- DICOMweb, DIMSE


@pytest.mark.parametrize("scheme", ["dicomweb", "dimse"])
def test_status_of_a_pacs_sync_arriving_then_ready_and_an_unchanged_refresh(scheme, dicom_env, nenv, tmp_path):
    """Orthanc over DICOMweb and over DIMSE (C-GET): the source gives no modification
    times, so a study synced for the first time is arriving for StableAfter; with
    -stable_after 0 it is complete and ready; a refresh lists the same studies, unchanged."""
    url = f"dicomweb+{dicom_env['CLPIPE_ORTHANC_DICOMWEB']}" if scheme == "dicomweb" else f"dimse://{dicom_env['CLPIPE_ORTHANC_DIMSE']}"
    config = new_project(tmp_path / "p", url, Query={"PatientID": "SUB01"})
    file_sync(nenv, config)
    dropoff = tmp_path / "p" / "data_DICOMs"
    data = status_json(nenv, config)
    assert data["source"] == url and data["last_sync"]["exit_state"] == "complete"
    sessions = data["sessions"]
    assert sessions and {s["state"] for s in sessions} == {"arriving"} and {s["subject"] for s in sessions} == {"SUB01"}
    assert sum(s["files"] for s in sessions) == len(dropoff_files(dropoff)) == data["last_sync"]["files"]
    assert status(nenv, config, "-ready").stdout == ""  # arriving: not ready yet
    proc = status(nenv, config, "-ready", "-stable_after", "0")
    assert proc.returncode == 0 and proc.stdout.splitlines() == [f"SUB01\t{s['session']}\t{s['path']}" for s in sessions]
    kept = (dropoff / STATE_DIR / "sessions.json").read_bytes()
    data = status_json(nenv, config, "-refresh", "-stable_after", "0")
    assert [(s["path"], s["state"], s["change"]) for s in data["sessions"]] == [(s["path"], "complete", None) for s in sessions]
    assert (dropoff / STATE_DIR / "sessions.json").read_bytes() == kept
