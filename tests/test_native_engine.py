"""The native engine (`-engine native`) against the bundled Flywheel server: same result as
the real `fw sync`, incremental, adopting, resumable after kill -9, verified, retried,
and unable to write outside the dropoff whatever the names say."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from clpipe.testing.fwserver import Acquisition, FlywheelTestServer, FwFile, Project, Session, Subject, make_demo_project
from conftest import files_under, new_project

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


def file_gets(server, since: int = 0) -> list[str]:
    """Names of files downloaded (not ?info requests) since request number ``since``."""
    names = []
    for r in server.requests[since:]:
        match = re.match(r"^/api/containers/[^/]+/files/(.+)$", r["path"])
        if r["method"] == "GET" and match and not r["query"].get("info"):
            names.append(match.group(1))
    return names


def listings(server, since: int = 0) -> int:
    return sum(1 for r in server.requests[since:] if r["path"] == "/api/download/targets")


def dicoms(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in files_under(root).items() if not k.startswith(".clpipe-sync")}


@pytest.fixture
def nenv(no_fw_env):
    return no_fw_env


@pytest.mark.fwcli
def test_same_files_and_bytes_as_fw_sync(fw_env, server, demo_project, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    fw_cfg = new_project(tmp_path / "fw", Engine="fw-cli")
    proc = fw_env.clpipe("dicom", "flywheel_sync", "-c", fw_cfg, "-submit", timeout=240)
    assert proc.returncode == 0, proc.stdout
    code, out, summary = native(fw_env, new_project(tmp_path / "native"))
    assert code == 0, out
    by_fw = files_under(tmp_path / "fw" / "data_DICOMs")
    by_native = dicoms(tmp_path / "native" / "data_DICOMs")
    assert by_native == by_fw == demo_project.expected_dicom_paths(strip_root=True)
    assert summary == (len(by_fw), 0, 0, 0)
    # without the trailing slash too
    code, out, _ = native(fw_env, new_project(tmp_path / "noslash", "fw://lab/study"))
    assert code == 0, out
    assert dicoms(tmp_path / "noslash" / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=False)


def test_noop_resync_is_one_listing_and_no_downloads(nenv, server, demo_project, tmp_path):
    login(nenv, server)
    config = new_project(tmp_path / "p")
    code, out, summary = native(nenv, config)
    assert code == 0, out
    n = len(demo_project.expected_dicom_paths(strip_root=True))
    assert summary == (n, 0, 0, 0)
    mark = len(server.requests)
    code, out, summary = native(nenv, config)
    assert code == 0 and summary == (0, 0, n, 0), out
    assert listings(server, mark) == 1 and file_gets(server, mark) == []
    assert not any(r["query"].get("info") for r in server.requests[mark:])


@pytest.mark.fwcli
def test_adopts_a_dropoff_written_by_fw_sync(fw_env, server, demo_project, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    config = new_project(tmp_path / "p", Engine="fw-cli")
    assert fw_env.clpipe("dicom", "flywheel_sync", "-c", config, "-submit", timeout=240).returncode == 0
    mark = len(server.requests)
    code, out, summary = native(fw_env, config)
    assert code == 0, out
    assert file_gets(server, mark) == []  # nothing downloaded again: zips checked with ?info only
    assert "adopted without downloading" in out
    assert dicoms(config.parent / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)


def test_kill_9_then_resume(nenv, tmp_path):
    project = make_demo_project(subjects=3, sessions=2, acquisitions=3, slices=3)
    expected = project.expected_dicom_paths(strip_root=True)
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        server.add_fault(r"/files/", "delay", delay=0.25)
        login(nenv, server)
        config = new_project(tmp_path / "p", CommandLineOpts="-y -j 2")
        dropoff = config.parent / "data_DICOMs"
        for threshold in (2, 9, 20):
            proc = subprocess.Popen([sys.executable, "-m", "clpipe", "dicom", "flywheel_sync", "-c", str(config),
                                     "-engine", "native", "-submit"], env=nenv.vars, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while len(dicoms(dropoff)) < threshold and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            landed = dicoms(dropoff)
            assert landed, "nothing landed before the kill"
            for path, data in landed.items():  # every file in the dropoff is whole
                assert expected[path] == data, f"partial or wrong file after kill -9: {path}"
        # what was finished before the last kill: single files, and series whose members all landed
        finished = set()
        for _, f in project.iter_files():
            if f.type != "dicom":
                continue
            stem = re.sub(r"(\.(dcm|dicom))?\.zip$", "", f.name)
            mine = [p for p in expected if p.endswith("/" + f.name) or f"/{stem}/" in p] if f.is_zip else [p for p in expected if p.endswith("/" + f.name)]
            if all(p in landed for p in mine):
                finished.add(f.name)
        assert finished
        mark = len(server.requests)
        code, out, summary = native(nenv, config)
        assert code == 0, out
        assert dicoms(dropoff) == expected
        refetched = set(file_gets(server, mark)) & finished
        assert not refetched, f"finished files fetched again: {refetched}"
        assert not list((dropoff / ".clpipe-sync" / "tmp").glob("*")) if (dropoff / ".clpipe-sync" / "tmp").exists() else True


def test_truncated_and_corrupted_downloads_are_detected_and_retried(nenv, server, demo_project, tmp_path):
    login(nenv, server)  # no checksums in the listing: the zip's own CRCs must catch the corruption
    zip_name = next(f.name for _, f in demo_project.iter_files() if f.is_zip)
    server.add_fault(r"/files/localizer\.dcm$", "truncate", count=1)
    server.add_fault(re.escape(zip_name) + "$", "corrupt", count=1)
    single = [f for _, f in demo_project.iter_files() if f.name == "localizer.dcm"]
    config = new_project(tmp_path / "p")
    code, out, summary = native(nenv, config)
    assert code == 0, out
    assert "[retry]" in out and "received 693 bytes, expected 1386" in out and "damaged zip" in out
    gets = file_gets(server)
    assert gets.count(zip_name) == 2
    assert gets.count("localizer.dcm") == len(single) + 1
    assert dicoms(config.parent / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)


def test_checksum_catches_corruption_of_a_single_file(nenv, server, demo_project, tmp_path):
    server.targets_hash = True
    login(nenv, server)
    server.add_fault(r"/files/localizer\.dcm$", "corrupt", count=1)
    config = new_project(tmp_path / "p")
    code, out, _ = native(nenv, config)
    assert code == 0 and "checksum mismatch" in out, out
    assert dicoms(config.parent / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)


def test_server_faults_are_retried_and_a_missing_file_fails(nenv, server, demo_project, tmp_path):
    login(nenv, server)
    zips = [f.name for _, f in demo_project.iter_files() if f.is_zip]
    server.add_fault(re.escape(zips[0]) + "$", "status", status=503, count=2)
    server.add_fault(re.escape(zips[1]) + "$", "drop", count=1)
    server.add_fault(re.escape(zips[2]) + "$", "status", status=404)
    config = new_project(tmp_path / "p")
    code, out, summary = native(nenv, config)
    assert code == 1, out
    assert summary[3] == 1 and zips[2] in out and "HTTP 404" in out
    landed = dicoms(config.parent / "data_DICOMs")
    expected = demo_project.expected_dicom_paths(strip_root=True)
    stem = re.sub(r"(\.(dcm|dicom))?\.zip$", "", zips[2])
    assert landed == {k: v for k, v in expected.items() if f"/{stem}/" not in k}
    logs = config.parent / "logs" / "sync_logs"
    report = json.loads(sorted(logs.glob("*.summary.json"))[-1].read_text())
    assert report["failed"] == 1 and zips[2] in report["failures"][0]
    audit = sorted(logs.glob("flywheel_sync-*.csv"))[-1].read_text()
    assert ",failed," in audit
    # the next run fetches only what is missing
    server.clear_faults()
    mark = len(server.requests)
    code, out, summary = native(nenv, config)
    assert code == 0 and file_gets(server, mark) == [zips[2]], out


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def test_hostile_names_cannot_write_outside_the_dropoff(nenv, tmp_path):
    evil_zip = _zip({"../../escape_zip.dcm": b"A" * 10, "/abs_member.dcm": b"B" * 10, "d1/IM1.dcm": b"C" * 10,
                     "d2/IM1.dcm": b"D" * 10, "ctl\x07name.dcm": b"E" * 10})
    project = Project("lab", "study", [Subject("../../..", [Session("/etc", [Acquisition("a\x1bb/..", [
        FwFile("series.dicom.zip", evil_zip), FwFile("...", b"F" * 10), FwFile("x\nname.dcm", b"G" * 10)])])])])
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(nenv, server)
        config = new_project(tmp_path / "p")
        code, out, summary = native(nenv, config)
    assert code == 0, out
    dropoff = (config.parent / "data_DICOMs").resolve()
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    outside = [p for p in everything if not str(p.resolve()).startswith(str(dropoff) + "/")
               and "logs" not in p.parts and p.name not in ("clpipe_config.json", "conversion_config.json", "user.json")]
    assert outside == []
    landed = dicoms(dropoff)
    contents = sorted(landed.values())
    assert contents == sorted([b"A" * 10, b"B" * 10, b"C" * 10, b"D" * 10, b"E" * 10, b"F" * 10, b"G" * 10])
    names = {Path(p).name for p in landed}
    assert {"IM1.dcm", "IM1_2.dcm"} <= names  # same base name: kept apart, not overwritten
    assert not any(ch in p for p in landed for ch in "\x07\x1b\n")


def test_dry_run_list_only_and_meaningless_options(nenv, server, tmp_path):
    login(nenv, server)
    config = new_project(tmp_path / "p", CommandLineOpts="-y -n")
    code, out, _ = native(nenv, config)
    assert code == 0 and "would be transferred" in out, out
    assert dicoms(config.parent / "data_DICOMs") == {}
    config = new_project(tmp_path / "q", CommandLineOpts="-l")
    code, out, _ = native(nenv, config)
    assert code == 0 and "SUBJECTS/sub-01/SESSIONS/ses-01/ACQUISITIONS/T1w/FILES/localizer.dcm" in out
    config = new_project(tmp_path / "r", CommandLineOpts="-y --config-file x.yml")
    code, out, _ = native(nenv, config)
    assert code == 2 and "means nothing to the native engine" in out


def test_delete_removes_only_what_it_wrote_and_never_after_errors(nenv, server, demo_project, tmp_path):
    login(nenv, server)
    config = new_project(tmp_path / "p", CommandLineOpts="-y --delete")  # allowed with unpacking here
    dropoff = config.parent / "data_DICOMs"
    assert native(nenv, config)[0] == 0
    mine = dropoff / "SUBJECTS" / "my_notes.txt"
    mine.write_text("the user's own file")
    acquisition = demo_project.subjects[0].sessions[0].acquisitions[0]
    removed = next(f for f in acquisition.files if f.name == "localizer.dcm")
    acquisition.files.remove(removed)
    other = next(f for f in demo_project.subjects[1].sessions[0].acquisitions[0].files if f.name == "localizer.dcm")
    other.replace_content(other.content + b"changed")  # a new version to fetch, which then fails
    server.add_fault(r"/files/localizer\.dcm$", "status", status=500)
    code, out, _ = native(nenv, config)
    assert code == 1 and "--delete skipped" in out
    gone = [p for p in dicoms(dropoff) if p.endswith("T1w/FILES/localizer.dcm") and "sub-01" in p]
    assert gone, "a file was deleted after a run with errors"
    server.clear_faults()
    code, out, _ = native(nenv, config)
    assert code == 0, out
    assert not (dropoff / "SUBJECTS/sub-01/SESSIONS/ses-01/ACQUISITIONS/T1w/FILES/localizer.dcm").exists()
    assert mine.read_text() == "the user's own file"


def test_layout_template_and_dicom_format_string(nenv, server, demo_project, tmp_path):
    login(nenv, server)
    config = new_project(tmp_path / "p", Engine="native", LayoutTemplate="{subject}/{session}/{acquisition}")
    code, out, summary = native(nenv, config)
    assert code == 0, out
    landed = dicoms(config.parent / "data_DICOMs")
    expected = demo_project.expected_dicom_paths(strip_root=True)
    assert sorted(landed.values()) == sorted(expected.values())
    assert all(re.match(r"^0[12]/01/T[12]w/", p) for p in landed), sorted(landed)
    assert "01/01/T1w/localizer.dcm" in landed
    data = json.loads(config.read_text())
    assert data["DICOMToBIDSOptions"]["DICOMFormatString"] == "{subject}/{session}/"
    assert "DICOMFormatString" in out
    # a template needs the native engine
    bad = new_project(tmp_path / "q", Engine="fw-cli", LayoutTemplate="{subject}/{session}")
    proc = nenv.clpipe("dicom", "flywheel_sync", "-c", bad)
    assert proc.returncode == 2 and "needs the native engine" in proc.stderr


def test_api_key_from_environment(nenv, server, demo_project, tmp_path):
    nenv.vars["FLYWHEEL_API_KEY"] = server.login_key(KEY)  # no saved login at all
    config = new_project(tmp_path / "p")
    code, out, _ = native(nenv, config)
    assert code == 0, out
    assert KEY not in out
    assert dicoms(config.parent / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)


def test_retry_after_is_honoured(nenv, server, demo_project, tmp_path):
    login(nenv, server)
    server.add_fault(r"/files/localizer\.dcm$", "status", status=429, count=1, retry_after="2")
    config = new_project(tmp_path / "p")
    started = time.monotonic()
    code, out, _ = native(nenv, config)
    assert code == 0, out
    assert "HTTP 429" in out and "attempt 2 in 2.0 s" in out
    assert time.monotonic() - started >= 2.0
    assert dicoms(config.parent / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)
