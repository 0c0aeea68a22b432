"""Faults and bad input (issue 11, points 3, 6, 7, 8): a full disk ends in one clear line and
the next run completes; -debug reaches the job; no password in a message and no login in a
child that does not need it; calendar-checked dates; a local run's errors on stderr.

The full disks are real: small tmpfs filesystems mounted for the test (as root), always
unmounted when it ends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clpipe.testing.fwserver import FlywheelTestServer, make_demo_project

from helpers import KEY, SUMMARY_RE, Env, dicoms, file_gets, login, new_project, traced_sync

pytestmark = pytest.mark.fw

MOUNT_TIMEOUT = 30
FULL_RE = re.compile(
    r"^clpipe: error: no space left on (?P<folder>\S+) \((?P<free>[\d.]+ [KMG]?B) free; "
    r"about (?P<needed>[\d.]+ [KMG]?B)(?P<more> more)? needed for (?P<what>[^)]+)\); "
    r"free space (or set (?P<key>\w+) elsewhere|there), then run again: finished files are kept$"
)
DICOMWEB_PASSWORD = "dw-pass-7Qx2"


@pytest.fixture
def small_disk():
    """``mount(folder, size)``: a tmpfs of that size on ``folder`` (unmounted at the end);
    ``resize(folder, size)``: the same filesystem, bigger or smaller, files kept."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str) -> Path:
        if os.geteuid() != 0:
            pytest.fail("the full-disk tests mount small tmpfs filesystems: run them as root (scripts/test.sh does in CI)")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)], check=True, timeout=MOUNT_TIMEOUT)
        mounted.append(folder)
        return folder

    def resize(folder: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, timeout=MOUNT_TIMEOUT)

    mount.resize = resize  # type: ignore[attr-defined]
    try:
        yield mount
    finally:
        for folder in reversed(mounted):
            subprocess.run(["umount", "-l", str(folder)], timeout=MOUNT_TIMEOUT)


def run(env: Env, config: Path, *extra: str, command: str = "flywheel_sync", timeout: int = 180):
    """A sync run here (-submit, no batch system): exit status, stdout, stderr, summary."""
    proc = env.clpipe("dicom", command, "-c", config, "-submit", *extra, timeout=timeout)
    match = SUMMARY_RE.search(proc.stdout)
    return proc.returncode, proc.stdout, proc.stderr, tuple(int(g) for g in match.groups()) if match else None


def the_log(config: Path) -> str:
    (log,) = (config.parent / "logs" / "sync_logs").glob("*sync-*.log")
    return log.read_text()


# ----------------------------------------------------------------------------- 3: full disks


@pytest.mark.parametrize("size, zipped", [("100k", False), ("180k", False), ("100k", True)])
def test_a_full_dropoff_is_one_line_nothing_half_written_and_the_next_run_completes(no_fw_env, small_disk, tmp_path, size, zipped):
    """26 single DICOM files of ~9.4 KB (or 4 zipped series and 2 files): 100 kB or 180 kB
    hold some of them. The run stops at the full disk with one line naming the folder, its
    free space and about how much more is needed; every file under a final name is whole,
    no staged part is left; after the disk is made bigger the next run fetches exactly what
    is missing and leaves what the first one wrote untouched."""
    project = make_demo_project(rows=64, cols=64, slices=6, zipped=zipped, non_dicom=False)
    expected = project.expected_dicom_paths(strip_root=True)
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(no_fw_env, server)
        dropoff = small_disk(tmp_path / "dropoff", size)
        # one series unpacked at a time: four at once can share out 100 kB so that none of
        # them fits (seen once in CI), and then the test would check nothing
        jobs = {"CommandLineOpts": "-y -j 1"} if zipped else {}
        config = new_project(tmp_path / "p", DropoffDirectory=str(dropoff), **jobs)
        code, out, err, summary = run(no_fw_env, config)
        assert code == 1, out + err
        assert "internal error" not in out + err and "Traceback" not in out + err and "FAILED" not in out + err
        assert len(err.splitlines()) == 1, err
        match = FULL_RE.match(err.strip())
        assert match, err
        assert match["folder"] == str(dropoff) and match["key"] == "DropoffDirectory" and match["more"]
        assert re.fullmatch(r"the \d+ files still to sync", match["what"])
        assert err.strip() in the_log(config)  # the log has it too

        first = dicoms(dropoff)
        assert first, "nothing fitted: the test's sizes are wrong"
        assert len(first) < len(expected)
        for path, data in first.items():  # whole files under final names, and only those
            assert expected.get(path) == data, f"{path} is not the remote file"
        staged = [p for p in dropoff.rglob("*") if p.is_file() and (".part" in p.name or p.name.endswith(".tmp"))]
        assert not staged, staged
        inodes = {path: (dropoff / path).stat().st_ino for path in first}

        small_disk.resize(dropoff, "8m")
        mark = len(server.requests)
        code, out, err, summary = run(no_fw_env, config)
        assert code == 0, out + err
        assert dicoms(dropoff) == expected
        assert summary == (len(expected) - len(first), 0, len(first), 0), out
        assert {path: (dropoff / path).stat().st_ino for path in first} == inodes  # not fetched again
        if not zipped:
            assert len(file_gets(server, mark)) == len(expected) - len(first)


def test_a_full_dropoff_stops_a_dicom_folder_sync_and_the_next_run_completes(small_disk, tmp_path):
    """The same for series of a file:// source: the line counts series (their size estimated
    from what was written), every instance under a final name is whole (as a sync into a
    roomy folder writes it), and the next run writes only what is missing."""
    from clpipe.testing import dicomdata

    export = tmp_path / "export"
    dicomdata.make_file_tree(export)
    env = Env(tmp_path, dict(os.environ))
    reference = new_project(tmp_path / "ref", source_url=f"file://{export}")
    code, out, err, _ = run(env, reference, command="sync")
    assert code == 0, out + err
    expected = dicoms(reference.parent / "data_DICOMs")
    dropoff = small_disk(tmp_path / "dropoff", "600k")  # room for the largest series (they come first), not for all
    config = new_project(tmp_path / "p", source_url=f"file://{export}", DropoffDirectory=str(dropoff))
    code, out, err, _ = run(env, config, command="sync")
    assert code == 1, out + err
    match = FULL_RE.match(err.strip())
    assert match and len(err.splitlines()) == 1, err
    assert match["folder"] == str(dropoff) and re.fullmatch(r"the \d+ series still to sync", match["what"])
    first = dicoms(dropoff)
    assert first and len(first) < len(expected)
    assert all(expected.get(path) == data for path, data in first.items())
    assert not [p for p in dropoff.rglob(".clpipe-*") if ".clpipe-sync" not in p.parts]
    inodes = {path: (dropoff / path).stat().st_ino for path in first}
    small_disk.resize(dropoff, "16m")
    code, out, err, summary = run(env, config, command="sync")
    assert code == 0, out + err
    assert dicoms(dropoff) == expected
    assert {path: (dropoff / path).stat().st_ino for path in first} == inodes
    assert summary and summary[0] == len(expected) - len(first), out


def test_a_dropoff_too_small_for_any_whole_series_still_says_about_how_much_is_needed(small_disk, tmp_path):
    """No series fits (the largest come first, two at once): the line still says about
    how much more the series need, estimated from the instances written before the disk
    filled, and nothing is left under a final name."""
    from clpipe.testing import dicomdata

    export = tmp_path / "export"
    dicomdata.make_file_tree(export)
    dropoff = small_disk(tmp_path / "dropoff", "100k")  # less than either of the two largest series
    config = new_project(tmp_path / "p", source_url=f"file://{export}", DropoffDirectory=str(dropoff))
    code, out, err, _ = run(Env(tmp_path, dict(os.environ)), config, command="sync")
    assert code == 1, out + err
    match = FULL_RE.match(err.strip())
    assert match and len(err.splitlines()) == 1, err
    assert match["more"] and re.fullmatch(r"the 13 series still to sync", match["what"]), err
    assert not dicoms(dropoff)


@pytest.mark.parametrize("key", ["DropoffDirectory", "TempDirectory"])
def test_a_read_only_folder_is_one_line_naming_the_key_and_the_filesystem(no_fw_env, small_disk, tmp_path, key):
    """A folder on a filesystem mounted read-only (as root, who may write anywhere else):
    refused before the sync starts, in one line naming the key and saying why (not "no
    write permission", which would send a user after the folder's mode)."""
    folder = small_disk(tmp_path / "ro", "1m")
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, timeout=MOUNT_TIMEOUT)
    config = new_project(tmp_path / "p", **{key: str(folder)})
    code, out, err, _ = run(no_fw_env, config)
    assert code != 0 and "internal error" not in out + err and "Traceback" not in out + err
    assert len(err.splitlines()) == 1, err
    assert f"SourceOptions.{key}" in err and f"{folder} is on a read-only filesystem" in err, err


@pytest.mark.parametrize("free_pages", [0, 2])
def test_a_full_log_folder_is_one_line_and_leaves_no_half_report(nenv, server, demo_project, small_disk, tmp_path, free_pages):
    """The logs folder on a full filesystem: with no room at all the plan cannot be written
    (nothing starts); with room for the plan and the log but not the reports, the sync runs,
    the audit CSV and summary are never half-written, and one line says how much they need.
    The next run, with room, completes without fetching anything again."""
    login(nenv, server)
    config = new_project(tmp_path / "p")
    logs = small_disk(config.parent / "logs" / "sync_logs", "100k")
    filler = logs / "filler"
    pages = int(subprocess.run(["df", "--output=size", "-B4096", str(logs)], capture_output=True, text=True, check=True).stdout.split()[-1])
    filler.write_bytes(b"x" * 4096 * (pages - free_pages))
    code, out, err, _ = run(nenv, config)
    assert code == 1, out + err
    assert "internal error" not in out + err and "Traceback" not in out + err
    assert len(err.splitlines()) == 1, err
    match = FULL_RE.match(err.strip())
    assert match and match["folder"] == str(logs), err
    if free_pages == 0:
        assert match["what"].startswith("the plan ") and not list(logs.glob("*.plan.json"))
        assert not (config.parent / "data_DICOMs").exists() or not dicoms(config.parent / "data_DICOMs")
    else:
        assert match["what"].startswith("the audit log ") and ".summary.json" in match["what"]
        assert dicoms(config.parent / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)
    assert not list(logs.glob("*.csv")) and not list(logs.glob("*.summary.json")) and not list(logs.glob(".*.tmp"))

    filler.unlink()
    mark = len(server.requests)
    code, out, err, summary = run(nenv, config)
    assert code == 0, out + err
    if free_pages:
        assert file_gets(server, mark) == [] and summary[0] == 0, out
    assert len(list(logs.glob("*.csv"))) == 1 and len(list(logs.glob("*.summary.json"))) == 1


@pytest.fixture
def nenv(no_fw_env):
    return no_fw_env


# ----------------------------------------------------------------------------- 3: -debug


def test_debug_reaches_the_job_that_runs_the_sync(nenv, server, tmp_path):
    """A local run's job fails (the server is gone): with -debug its traceback is shown,
    from the process that ran the sync; without, one line."""
    login(nenv, server)
    config = new_project(tmp_path / "p")
    server.stop()
    code, out, err, _ = run(nenv, config, "-debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "run_plan_cli" in err, out + err
    assert "cannot reach Flywheel" in err.splitlines()[-1]
    code, out, err, _ = run(nenv, config)
    assert code == 1 and "Traceback" not in out + err
    assert [line for line in err.splitlines() if line.startswith("clpipe: error:")] == err.strip().splitlines()


# ----------------------------------------------------------------------------- 6: secrets


@pytest.mark.parametrize(
    "where, url",
    [
        ("config", f"dicomweb+http://alice:{DICOMWEB_PASSWORD}@127.0.0.1:8042/dicom-web"),
        ("flag", f"dicomweb+http://alice:{DICOMWEB_PASSWORD}@127.0.0.1:notaport/dicom-web"),
        ("flag", f"https://alice:{DICOMWEB_PASSWORD}@127.0.0.1/dicom-web"),
        ("config", f"dicomweb+http://alice:{DICOMWEB_PASSWORD[:4]}/{DICOMWEB_PASSWORD[4:]}@127.0.0.1/dicom-web"),
    ],
)
def test_a_password_in_the_source_url_is_refused_and_never_shown(tmp_path, where, url):
    config = new_project(tmp_path / "p", **({"SourceURL": url} if where == "config" else {}))
    extra = ["-source_url", url] if where == "flag" else []
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", "dicom", "sync", "-c", str(config), *extra], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert DICOMWEB_PASSWORD not in proc.stdout + proc.stderr and DICOMWEB_PASSWORD[4:] not in proc.stderr
    assert "alice:***@" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert ("-source_url" if where == "flag" else "SourceOptions.SourceURL") in proc.stderr


def traced_execs(trace: Path) -> list[tuple[str, str]]:
    """(program, execve line with its argv and environment) of every execve in an
    ``strace -f -v`` trace that did not fail (with -f, a call may end ``<unfinished ...>``)."""
    found = []
    for line in trace.read_text().splitlines():
        match = re.search(r'execve\("([^"]+)", ', line)
        if match and not re.search(r"= -1 E\w+", line):
            found.append((match.group(1), line))
    return found


def test_no_child_gets_a_login_it_does_not_need(nenv, server, demo_project, tmp_path):
    """A local run with the Flywheel key in FLYWHEEL_API_KEY and a DICOMweb password in the
    environment too: the command becomes the job, which gets the key (it logs in with it)
    but not the password, and starts no other process (no `tee`: the job writes its log)."""
    api_key = server.login_key(KEY)
    nenv.vars.update(FLYWHEEL_API_KEY=api_key, CLPIPE_DICOMWEB_PASSWORD=DICOMWEB_PASSWORD)
    config = new_project(tmp_path / "p")
    trace = tmp_path / "execve.txt"
    proc = traced_sync(nenv, config, trace)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    execs = traced_execs(trace)[1:]  # the first is the command itself, started by this test with everything
    assert len(execs) == 1 and "_run_plan" in execs[0][1], [program for program, _ in execs]
    ((_, job),) = execs
    assert f"FLYWHEEL_API_KEY={api_key}" in job and DICOMWEB_PASSWORD not in job
    assert dicoms(config.parent / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)
    assert "sync complete" in the_log(config) and api_key not in the_log(config)


@pytest.mark.parametrize(
    "url, handed",
    [
        ("dicomweb+http://127.0.0.1:9/dicom-web", ("CLPIPE_DICOMWEB_USER", "CLPIPE_DICOMWEB_PASSWORD")),
        ("fw://lab/study/", ("FLYWHEEL_API_KEY",)),
    ],
)
def test_the_batch_submit_command_gets_no_login(nenv, tmp_path, url, handed):
    """The submit command (sbatch copies its environment into the job, where the scheduler
    keeps it) runs without any login variable; the job gets the logins its source needs,
    and no other, in the private hand-off file instead."""
    seen = tmp_path / "submit-env.txt"
    submit = tmp_path / "bin" / "fakesub"
    submit.parent.mkdir()
    submit.write_text(f"#!/bin/sh\nenv > {seen}\necho 'queued as job 4242'\n")
    submit.chmod(0o755)
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"SubmissionHead": str(submit), "MemoryCommand": "", "TimeCommandActive": False}))
    config = new_project(tmp_path / "p", SourceURL=url)
    logins = {
        "CLPIPE_DICOMWEB_USER": "alice",
        "CLPIPE_DICOMWEB_PASSWORD": DICOMWEB_PASSWORD,
        "FLYWHEEL_API_KEY": "site.example:k3y-not-for-the-submitter",
    }
    nenv.vars.update(logins)
    proc = nenv.clpipe("dicom", "sync", "-c", config, "-batch_config", batch, "-submit", timeout=60)
    assert proc.returncode == 0 and "Submitted batch job 4242" in proc.stdout, proc.stdout + proc.stderr
    env = seen.read_text()
    assert "PATH=" in env and DICOMWEB_PASSWORD not in env and "k3y-not-for-the-submitter" not in env
    assert not re.search(r"^(FLYWHEEL_API_KEY|CLPIPE_DICOMWEB_\w+)=", env, re.M), env
    (handoff,) = (nenv.home / ".clpipe" / "handoff").glob("*.json")  # the job's login, for the job alone
    assert json.loads(handoff.read_text()) == {name: logins[name] for name in handed}
    (script,) = (config.parent / "logs" / "sync_logs").glob("*.sh")
    assert not any(value in script.read_text() for value in logins.values())


@pytest.mark.fwcli
def test_fw_gets_no_login_variable(fw_env, server, tmp_path):
    """fw reads its login from the login home: it gets neither FLYWHEEL_API_KEY nor a
    DICOMweb password."""
    fw_env.fw_login(server.login_key(KEY))
    fw_env.vars.update(FLYWHEEL_API_KEY=server.login_key(KEY), CLPIPE_DICOMWEB_PASSWORD=DICOMWEB_PASSWORD)
    config = new_project(tmp_path / "p", Engine="fw-cli")
    trace = tmp_path / "execve.txt"
    proc = traced_sync(fw_env, config, trace)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fws = [line for program, line in traced_execs(trace) if '"sync", "--include"' in line]
    assert fws, "fw sync was not traced"
    for line in fws:
        assert "FLYWHEEL_API_KEY=" not in line and DICOMWEB_PASSWORD not in line and "HOME=" in line


# ----------------------------------------------------------------------------- 7: dates


@pytest.mark.parametrize(
    "value, flag, key",
    [
        ("20241345", False, "SourceOptions.Query.StudyDate"),
        ("20240230-", False, "SourceOptions.Query.StudyDate"),
        ("-20230229", False, "SourceOptions.Query.StudyDate"),
        ("2024/13/45", True, "-study_date"),
        ("20240101-20240931", True, "-study_date"),
    ],
)
def test_an_impossible_date_is_refused_naming_the_key(tmp_path, value, flag, key):
    source = tmp_path / "export"
    source.mkdir()
    config = new_project(tmp_path / "p", SourceURL=f"file://{source}", **({} if flag else {"Query": {"StudyDate": value}}))
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", "dicom", "sync", "-c", str(config), *(["-study_date", value] if flag else [])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("clpipe: error: ") and key in line and "is not a day of the calendar" in line, line


def test_real_dates_including_a_leap_day_are_accepted(tmp_path):
    source = tmp_path / "export"
    source.mkdir()
    config = new_project(tmp_path / "p", SourceURL=f"file://{source}", Query={"StudyDate": "20240229-20241231"})
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", "dicom", "sync", "-c", str(config), "-study_date", "-20000229"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "study_date='-20000229'" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- 8: stderr


def test_a_local_runs_errors_reach_stderr_and_the_log_keeps_both_streams(nenv, server, demo_project, tmp_path):
    login(nenv, server)
    zips = [f.name for _, f in demo_project.iter_files() if f.is_zip]
    server.add_fault(re.escape(zips[0]) + "$", "status", status=404)
    config = new_project(tmp_path / "p")
    code, out, err, summary = run(nenv, config)
    assert code == 1 and summary and summary[3] == 1, out + err
    failed = [line for line in err.splitlines() if line.startswith("[clpipe] FAILED ")]
    assert len(failed) == 1 and zips[0] in failed[0] and "HTTP 404" in failed[0], err
    assert err.splitlines()[-1].startswith("[clpipe] sync FAILED"), err
    assert "FAILED" not in out and "Sync summary:" in out and "Sync summary:" not in err
    log = the_log(config)
    for line in [*err.splitlines(), *out.splitlines()[1:]]:  # the first line, "Running ... here", is before the job
        assert line in log.splitlines(), line

    # an error of the job itself: `clpipe: error:` on stderr, and in the log
    server.stop()
    for log_file in (config.parent / "logs" / "sync_logs").glob("*.log"):
        log_file.unlink()
    code, out, err, _ = run(nenv, config)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("clpipe: error: cannot reach Flywheel")]
    assert len(errors) == 1 and errors[0] not in out, out + err
    assert errors[0] in the_log(config)


def test_a_journal_line_torn_by_a_full_disk_costs_only_its_own_record(small_disk, tmp_path):
    """The journal on a full filesystem: the record that did not fit raises ENOSPC; once
    there is room the next record is written on a line of its own, and the journal reads
    back every record that was written whole (what a run killed then would find). The
    record that did not fit is kept for the manifest: its files are in place, and the
    manifest, written whole or not at all, may fit once the run's staged files are gone,
    so the next run does not fetch them again."""
    import errno

    from clpipe.sync.manifest import MANIFEST, Record, SyncState

    dropoff = small_disk(tmp_path / "dropoff", "100k")
    state = SyncState(dropoff, "run1")
    state.root.mkdir()
    state.record(Record("a", [1, 0.0, ""], [["a.dcm", 1, ""]]))
    filler = dropoff / "filler"
    with open(filler, "wb", buffering=0) as out:  # the filesystem full to the last byte
        with pytest.raises(OSError) as info:
            while True:
                out.write(b"x" * 4096)
        assert info.value.errno == errno.ENOSPC
    big = Record("b", [1, 0.0, ""], [[f"b/{'x' * 200}-{n}.dcm", 1, ""] for n in range(100)])  # ~25 kB: more than a page
    with pytest.raises(OSError) as info:
        state.record(big)
    assert info.value.errno == errno.ENOSPC and "b" in state
    journal = state.root / "journal-run1.jsonl"
    assert not journal.read_text().endswith("\n")  # torn
    with pytest.raises(OSError) as info:
        state.save()
    assert info.value.errno == errno.ENOSPC
    assert not list(state.root.glob(".*.tmp")) and not (state.root / MANIFEST).exists() and journal.exists()
    filler.unlink()
    state.record(Record("c", [1, 0.0, ""], [["c.dcm", 1, ""]]))
    again = SyncState(dropoff, "run2")
    again.load()  # what a run killed now would find
    assert set(again.keys()) == {"a", "c"}
    state.save()
    assert (state.root / MANIFEST).exists() and not journal.exists()
    saved = SyncState(dropoff, "run3")
    saved.load()
    assert set(saved.keys()) == {"a", "b", "c"} and saved.get("b").files == big.files


# ------------------------------------------------- the one listing request: transient faults


@pytest.mark.parametrize("status", [503, 429, 500])
def test_a_transient_fault_of_the_listing_is_tried_again(no_fw_env, tmp_path, status):
    """The whole run hangs on one listing request: a 503 (or 429, 500) from a busy site is
    asked again (after Retry-After), not the end of the run."""
    project = make_demo_project(subjects=1, sessions=1, acquisitions=2, slices=2)
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(no_fw_env, server)
        server.add_fault(r"download/targets", "status", count=2, status=status, retry_after="0")
        config = new_project(tmp_path / "p")
        code, out, err, _ = run(no_fw_env, config)
        assert code == 0, out + err
        assert dicoms(config.parent / "data_DICOMs") == project.expected_dicom_paths(strip_root=True)
        assert sum("download/targets" in r["path"] for r in server.requests) == 3


def test_a_listing_that_keeps_failing_ends_the_run_in_one_line(no_fw_env, tmp_path):
    project = make_demo_project(subjects=1, sessions=1, acquisitions=1, slices=2)
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(no_fw_env, server)
        server.add_fault(r"download/targets", "status", status=503, retry_after="0")
        config = new_project(tmp_path / "p")
        code, out, err, _ = run(no_fw_env, config)
        assert code == 1, out + err
        assert "internal error" not in out + err
        (line,) = [x for x in err.splitlines() if x.startswith("clpipe: error:")]
        assert "Flywheel listing of the project failed with HTTP 503" in line and "3 times" in line, err
        assert sum("download/targets" in r["path"] for r in server.requests) == 3
        assert not dicoms(config.parent / "data_DICOMs")


@pytest.mark.parametrize("path", ["/api/auth/status", "/api/lookup"])
def test_a_dropped_connection_at_the_start_is_tried_again(no_fw_env, tmp_path, path):
    """The login check and the project's lookup, the run's first requests: a connection
    the site drops (a proxy blinking while a requeued job starts) is tried again, not the
    end of the job."""
    project = make_demo_project(subjects=1, sessions=1, acquisitions=1, slices=2)
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(no_fw_env, server)
        server.add_fault(re.escape(path) + "$", "drop", count=2)
        config = new_project(tmp_path / "p")
        code, out, err, _ = run(no_fw_env, config)
        assert code == 0, out + err
        assert dicoms(config.parent / "data_DICOMs") == project.expected_dicom_paths(strip_root=True)
        assert sum(r["path"] == path for r in server.requests) == 3
