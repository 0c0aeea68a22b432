"""`clpipe dicom flywheel_sync -submit` end to end: the real `fw` (flywheel-cli 18.5.1, and
17.5.1 for the temporary-folder quirk) against the bundled Flywheel-compatible server."""

from __future__ import annotations

import csv
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import FW_NEW, KEY, files_under, need_tool, traced_sync
from helpers import new_project as _new_project

pytestmark = pytest.mark.fw

SUMMARY_RE = re.compile(r"Sync summary: (\d+) created, (\d+) updated, (\d+) skipped, (\d+) failed; .*\((\d+) bytes\); [\d.]+ s")


def new_project(*args, **source):
    """These tests judge the fw-cli engine (the real `fw sync`); native is the default."""
    return _new_project(*args, **{"Engine": "fw-cli", **source})


def summary(output: str) -> tuple[int, int, int, int, int]:
    match = SUMMARY_RE.search(output)
    assert match, f"no summary line in:\n{output}"
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def a_single_dicom(project):
    """The first DICOM file of the project that is not a zipped series."""
    return next(
        f
        for s in project.subjects
        for ss in s.sessions
        for a in ss.acquisitions
        for f in a.files
        if f.type == "dicom" and not f.name.endswith(".zip")
    )


def sync(env, config: Path, *extra, timeout=240):
    proc = env.clpipe("dicom", "flywheel_sync", "-c", config, "-submit", *extra, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def only_log(project: Path, suffix: str) -> Path:
    found = sorted((project / "logs" / "sync_logs").glob(f"flywheel_sync-*{suffix}"))
    assert found, f"no *{suffix} in logs/sync_logs"
    return found[-1]


@pytest.mark.fwcli
def test_first_sync_lands_every_dicom_then_second_changes_nothing(fw_env, server, demo_project, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    project = tmp_path / "proj"
    config = new_project(project, "fw://lab/study/")
    dropoff = project / "data_DICOMs"

    code, out = sync(fw_env, config)
    assert code == 0, out
    expected = demo_project.expected_dicom_paths(strip_root=True)
    assert files_under(dropoff) == expected  # every DICOM, byte for byte, and nothing else
    assert not any(name.endswith((".nii.gz", ".json", ".zip")) for name in files_under(dropoff))
    created, updated, skipped, failed, nbytes = summary(out)
    assert (created, updated, skipped, failed) == (len(expected), 0, 0, 0)
    assert nbytes == sum(len(b) for b in expected.values())

    # the log and the audit CSV are in logs/sync_logs, and the log holds what the console showed
    log = only_log(project, ".log").read_text()
    assert "Sync summary:" in log and "sync complete" in log
    with only_log(project, ".csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["dest_path"] for r in rows) == sorted(expected)
    assert {r["status"] for r in rows} == {"completed"}

    # a second sync changes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in dropoff.rglob("*") if p.is_file()}
    code, out = sync(fw_env, config)
    assert code == 0, out
    assert summary(out)[:4] == (0, 0, len(expected), 0)
    assert files_under(dropoff) == expected
    assert {p: p.stat().st_mtime_ns for p in dropoff.rglob("*") if p.is_file()} == mtimes


@pytest.mark.fwcli
def test_without_trailing_slash_files_go_under_project_folder(fw_env, server, demo_project, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    project = tmp_path / "proj"
    config = new_project(project, "fw://lab/study")
    code, out = sync(fw_env, config)
    assert code == 0, out
    expected = demo_project.expected_dicom_paths(strip_root=False)
    assert all(name.startswith("study/SUBJECTS/") for name in expected)
    assert files_under(project / "data_DICOMs") == expected


@pytest.mark.fwcli
def test_changed_file_is_updated(fw_env, server, demo_project, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    project = tmp_path / "proj"
    config = new_project(project)
    assert sync(fw_env, config)[0] == 0
    single = a_single_dicom(demo_project)
    single.replace_content(single.content + b"\0" * 128)  # a re-upload: new bytes, version, time
    code, out = sync(fw_env, config)
    assert code == 0, out
    assert summary(out)[1] == 1  # one updated
    assert files_under(project / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)


@pytest.mark.fwcli
def test_one_file_404_fails_although_fw_exits_0(fw_env, server, demo_project, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    single = a_single_dicom(demo_project)
    server.add_fault(re.escape("/files/" + single.name) + "$", "status", status=404)
    project = tmp_path / "proj"
    config = new_project(project)
    code, out = sync(fw_env, config)
    assert code != 0, out
    assert single.name in out and "FAILED" in out
    assert "fw sync exited with status" not in out  # fw itself said 0: clpipe found the gap
    assert summary(out)[3] >= 1
    log = only_log(project, ".log").read_text()
    assert "sync FAILED" in log


@pytest.mark.fwcli
def test_missing_project(fw_env, server, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    config = new_project(tmp_path / "proj", "fw://lab/nosuchstudy/")
    code, out = sync(fw_env, config)
    assert code != 0
    assert "Flywheel project lab/nosuchstudy was not found" in out
    assert not any((tmp_path / "proj" / "data_DICOMs").iterdir())


@pytest.mark.fwcli
def test_expired_key_says_log_in_again(fw_env, server, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    server.api_keys.clear()  # the key expires after login
    config = new_project(tmp_path / "proj")
    code, out = sync(fw_env, config)
    assert code != 0
    assert "rejected the saved API key" in out and "fw login" in out


@pytest.mark.fwcli
def test_not_logged_in(fw_env, server, tmp_path):
    config = new_project(tmp_path / "proj")
    code, out = sync(fw_env, config)
    assert code != 0
    assert "not logged in to Flywheel" in out and "fw login" in out


@pytest.mark.fwcli
def test_server_down(fw_env, server, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    server.stop()
    config = new_project(tmp_path / "proj")
    code, out = sync(fw_env, config, timeout=120)
    assert code != 0
    assert "cannot reach Flywheel at http://127.0.0.1:" in out


def test_fw_missing_from_path_says_how_to_install(no_fw_env, tmp_path):
    config = new_project(tmp_path / "proj")
    code, out = sync(no_fw_env, config)
    assert code != 0
    assert "`fw` was not found on PATH" in out and "pip install flywheel-cli" in out


@pytest.mark.fwcli
def test_api_key_never_leaves_the_login_file(fw_env, server, tmp_path):
    """No argv or environment of any process clpipe starts, and no file it writes, holds the key."""
    fw_env.fw_login(server.login_key(KEY))
    project = tmp_path / "proj"
    config = new_project(project)
    trace = tmp_path / "execve.txt"
    proc = traced_sync(fw_env, config, trace, "--debug")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    execs = [line for line in trace.read_text().splitlines() if "execve(" in line]
    assert any('"fw", "sync"' in line or '/fw", "sync"' in line for line in execs), "fw sync was not traced"
    assert len(execs) > 3
    assert not [line for line in execs if KEY in line]
    assert KEY not in proc.stdout + proc.stderr
    for path in project.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"key found in {path}"


@pytest.mark.fwcli
def test_old_fw_temporary_folder_is_removed(fw_old_env, server, demo_project, tmp_path):
    fw_old_env.fw_login(server.login_key(KEY))
    project = tmp_path / "proj"
    config = new_project(project)
    code, out = sync(fw_old_env, config)
    assert code == 0, out
    assert "removed" in out and "<TemporaryDirectory" in out  # fw 17.5.1 left them; clpipe cleaned them
    temp = project / "flywheel_tmp"
    assert not list(temp.glob("<TemporaryDirectory*"))
    assert not list(Path.cwd().glob("<TemporaryDirectory*"))
    assert files_under(project / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)


@pytest.mark.fwcli
def test_new_fw_leaves_no_temporary_folder_and_cleanup_is_harmless(fw_env, server, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    project = tmp_path / "proj"
    config = new_project(project)
    code, out = sync(fw_env, config)
    assert code == 0, out
    assert "<TemporaryDirectory" not in out
    assert not list((project / "flywheel_tmp").glob("<TemporaryDirectory*"))


@pytest.mark.fwcli
def test_truncated_download_leaves_half_file_and_fails(fw_env, server, tmp_path):
    """fw writes half a file and exits 0 when a body is cut short; clpipe names it and fails."""
    fw_env.fw_login(server.login_key(KEY))
    server.add_fault(r"/files/localizer\.dcm$", "truncate")
    project = tmp_path / "proj"
    config = new_project(project)
    code, out = sync(fw_env, config)
    assert code == 1, out
    assert "fw reported an error" in out
    failed = [line for line in out.splitlines() if line.startswith("[clpipe] FAILED")]
    assert failed and all("localizer.dcm" in line for line in failed)


def test_readme_demo_command(tmp_path):
    """The README's first command: a real sync from the bundled server with the real fw."""
    need_tool(FW_NEW, "flywheel-cli 18.5.1 (the demo's setup installs it)")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [str(root / "scripts" / "demo.sh")],
        env=dict(os.environ, DEMO_DIR=str(tmp_path / "demo")),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sync complete: every listed file is in the dropoff" in proc.stdout
    assert "Sync summary: 14 created, 0 updated, 0 skipped, 0 failed" in proc.stdout
    assert len(files_under(tmp_path / "demo" / "project" / "data_DICOMs")) == 14
    # it ends with `clpipe dicom status`: both sessions complete (the demo's files date from 2024), and the page
    status = proc.stdout[proc.stdout.rindex("clpipe dicom status") :]
    assert "demo: 2 sessions in" in status and "2 complete, 0 arriving, 0 partial, 0 new, 0 removed, 0 converted" in status, status
    assert "last sync: run " in status and (tmp_path / "demo" / "status.html").is_file()
