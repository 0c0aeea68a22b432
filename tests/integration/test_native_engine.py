"""The native engine (`-engine native`) against the bundled Flywheel server: same result as
the real `fw sync`, incremental, adopting, resumable after kill -9, verified, retried,
and unable to write outside the dropoff whatever the names say."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from clpipe.sync.engine import Engine, Options, Progress, TransientError, copy_file
from clpipe.sync.manifest import SyncState
from clpipe.testing.fwserver import Acquisition, FlywheelTestServer, FwFile, Project, Session, Subject, make_demo_project

from helpers import (
    KEY,
    SeriesSource,
    dicoms,
    file_gets,
    files_under,
    instances,
    landed_files,
    login,
    native,
    new_project,
    run_engine,
    series_entry,
    start_native,
    zip_bytes,
)

pytestmark = pytest.mark.fw


def listings(server, since: int = 0) -> int:
    return sum(1 for r in server.requests[since:] if r["path"] == "/api/download/targets")


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
            proc = start_native(nenv, config)
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
            mine = (
                [p for p in expected if p.endswith("/" + f.name) or f"/{stem}/" in p]
                if f.is_zip
                else [p for p in expected if p.endswith("/" + f.name)]
            )
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
    server.file_hashes = False  # no hashes from the server at all: the zip's own CRCs must catch the corruption
    login(nenv, server)
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
    report = json.loads(max(logs.glob("*.summary.json"), key=lambda p: p.stat().st_mtime_ns).read_text())
    assert report["failed"] == 1 and zips[2] in report["failures"][0]
    audit = sorted(logs.glob("flywheel_sync-*.csv"))[-1].read_text()
    assert ",failed," in audit
    # the next run fetches only what is missing
    server.clear_faults()
    mark = len(server.requests)
    code, out, summary = native(nenv, config)
    assert code == 0 and file_gets(server, mark) == [zips[2]], out


def test_hostile_names_cannot_write_outside_the_dropoff(nenv, tmp_path):
    evil_zip = zip_bytes(
        {
            "../../escape_zip.dcm": b"A" * 10,
            "/abs_member.dcm": b"B" * 10,
            "d1/IM1.dcm": b"C" * 10,
            "d2/IM1.dcm": b"D" * 10,
            "ctl\x07name.dcm": b"E" * 10,
        }
    )
    project = Project(
        "lab",
        "study",
        [
            Subject(
                "../../..",
                [
                    Session(
                        "/etc",
                        [
                            Acquisition(
                                "a\x1bb/..",
                                [FwFile("series.dicom.zip", evil_zip), FwFile("...", b"F" * 10), FwFile("x\nname.dcm", b"G" * 10)],
                            )
                        ],
                    )
                ],
            )
        ],
    )
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(nenv, server)
        config = new_project(tmp_path / "p")
        code, out, summary = native(nenv, config)
    assert code == 0, out
    dropoff = (config.parent / "data_DICOMs").resolve()
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    outside = [
        p
        for p in everything
        if not str(p.resolve()).startswith(str(dropoff) + "/")
        and "logs" not in p.parts
        and p.name not in ("clpipe_config.json", "conversion_config.json", "user.json")
        and p != config.parent / ".pipeline" / "status_log.csv"  # the sessions' states for clpipe's status view
    ]
    assert outside == []
    landed = dicoms(dropoff)
    contents = sorted(landed.values())
    assert contents == sorted([b"A" * 10, b"B" * 10, b"C" * 10, b"D" * 10, b"E" * 10, b"F" * 10, b"G" * 10])
    names = {Path(p).name for p in landed}
    assert "IM1.dcm" in names and any(re.fullmatch(r"IM1~[0-9a-f]{6}\.dcm", n) for n in names)  # same base name: kept apart
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


# ----------------------------------------------------------------------------- DICOM series


def staged_files(dropoff: Path) -> list[str]:
    """What is staged, in .clpipe-sync/tmp/ or (never) hidden in the data folders."""
    return sorted(
        str(p.relative_to(dropoff))
        for p in dropoff.rglob("*")
        if p.is_file() and (p.relative_to(dropoff).parts[:2] == (".clpipe-sync", "tmp") or p.name.startswith("."))
    )


def test_a_series_lands_whole_each_instance_once_nothing_staged_left(tmp_path):
    dropoff = tmp_path / "dropoff"
    one, two = instances("1", 5), instances("2", 3)
    source = SeriesSource({"series/1": one + [one[2]], "series/2": two})  # a repeated instance: written once
    entries = [series_entry("series/1", "sub/ses/001-T1", 5), series_entry("series/2", "sub/ses/002-T2", 3)]
    outcome = run_engine(source, dropoff, entries)
    assert (outcome.created, outcome.failed) == (8, 0), outcome.failures
    want = {f"sub/ses/001-T1/{uid}.dcm": data for uid, data in one}
    want.update({f"sub/ses/002-T2/{uid}.dcm": data for uid, data in two})
    assert landed_files(dropoff) == want
    assert staged_files(dropoff) == []
    record = SyncState(dropoff, "check")
    record.load()
    assert sorted(record.get("series/1").files) == sorted([f"sub/ses/001-T1/{u}.dcm", len(d), ""] for u, d in one)
    again = run_engine(source, dropoff, entries, "run2")
    assert (again.created, again.updated, again.skipped) == (0, 0, 8) and source.opened.count("series/1") == 1


@pytest.mark.parametrize("error", [TransientError("connection reset"), KeyboardInterrupt()], ids=["fault", "interrupt"])
def test_a_failure_mid_series_leaves_no_file_under_a_final_name(tmp_path, error):
    """Instances staged before the failure are removed; nothing of the series is in place,
    not even its folder; the series is not recorded, so the next run fetches it."""
    dropoff = tmp_path / "dropoff"
    entry = series_entry("series/1", "sub/ses/001-T1", 6)
    source = SeriesSource({"series/1": instances("1", 6)}, fail_after=4, error=error)
    if isinstance(error, KeyboardInterrupt):  # not caught by the engine: straight out of the fetch
        state = SyncState(dropoff, "run1")
        state.load()
        engine = Engine(source, state, Options(dropoff=dropoff, zip_tmp=tmp_path / "z"))
        with pytest.raises(KeyboardInterrupt):
            engine._fetch_series(entry, Progress(1, 0, False))
    else:
        outcome = run_engine(source, dropoff, [entry])
        assert outcome.failed == 1 and "connection reset" in outcome.failures[0]
        assert source.opened == ["series/1", "series/1"]  # retried once
    assert landed_files(dropoff) == {} and staged_files(dropoff) == []
    assert not (dropoff / "sub" / "ses" / "001-T1").exists()
    source.fail_after = None
    outcome = run_engine(source, dropoff, [entry], "run2")
    assert outcome.created == 6 and outcome.failed == 0


def test_a_failed_update_keeps_the_files_of_the_version_before(tmp_path):
    dropoff = tmp_path / "dropoff"
    old = instances("1", 4)
    assert run_engine(SeriesSource({"series/1": old}), dropoff, [series_entry("series/1", "s", 4)]).created == 4
    before = landed_files(dropoff)
    new = [(uid, data + b"new") for uid, data in old]
    source = SeriesSource({"series/1": new}, fail_after=3, error=TransientError("reset"))
    outcome = run_engine(source, dropoff, [series_entry("series/1", "s", 4, "v2")], "run2")
    assert outcome.failed == 1
    assert landed_files(dropoff) == before and staged_files(dropoff) == []


def test_fewer_instances_than_the_count_place_nothing(tmp_path):
    dropoff = tmp_path / "dropoff"
    source = SeriesSource({"series/1": instances("1", 3)})
    outcome = run_engine(source, dropoff, [series_entry("series/1", "s", 5)])
    assert outcome.failed == 1 and "received 3 of the series' 5 instances" in outcome.failures[0]
    assert landed_files(dropoff) == {} and staged_files(dropoff) == []


def test_a_copy_that_fails_half_way_leaves_no_part(tmp_path, monkeypatch):
    """A local file (a Path) whose copy breaks after half its bytes: the half-written
    staged file is removed, and no file is under its final name."""
    dropoff, src = tmp_path / "dropoff", tmp_path / "src"
    src.mkdir()
    files = []
    for uid, data in instances("1", 3, size=100_000):
        (src / uid).write_bytes(data)
        files.append((uid, src / uid))
    real = os.copy_file_range
    calls = []

    def breaks(fd_in, fd_out, count, *args):
        calls.append(count)
        if len(calls) == 2:  # the second file: half of it, then an I/O error
            real(fd_in, fd_out, count // 2)
            raise OSError(errno.EIO, "Input/output error")
        return real(fd_in, fd_out, count, *args)

    monkeypatch.setattr(os, "copy_file_range", breaks)
    outcome = run_engine(SeriesSource({"series/1": files}), dropoff, [series_entry("series/1", "s", 3)], retries=0)
    assert outcome.failed == 1 and "Input/output error" in outcome.failures[0]
    assert str(files[1][1]) in outcome.failures[0]  # the error names the file being copied
    assert landed_files(dropoff) == {} and staged_files(dropoff) == []


def test_parts_left_by_a_killed_run_are_removed_and_an_existing_folder_is_filled(tmp_path):
    """What kill -9 leaves (instances staged in .clpipe-sync/tmp/) is gone at the next run's
    start; a series whose folder exists already is placed instance by instance beside what
    else the folder holds."""
    dropoff = tmp_path / "dropoff"
    left = dropoff / ".clpipe-sync" / "tmp" / "series-0"
    left.mkdir(parents=True)
    (left / "1.2.3.dcm").write_bytes(b"half a file")
    folder = dropoff / "sub" / "001-T1"
    folder.mkdir(parents=True)
    (folder / ".keep").write_bytes(b"")  # not ours: left alone
    one = instances("1", 4)
    outcome = run_engine(SeriesSource({"series/1": one}), dropoff, [series_entry("series/1", "sub/001-T1", 4)])
    assert outcome.created + outcome.updated == 4 and outcome.failed == 0
    assert not (dropoff / ".clpipe-sync" / "tmp").exists()
    assert landed_files(dropoff) == {"sub/001-T1/.keep": b"", **{f"sub/001-T1/{u}.dcm": d for u, d in one}}


def test_dry_run_writes_nothing(tmp_path):
    dropoff = tmp_path / "dropoff"
    source = SeriesSource({"series/1": instances("1", 2)})
    outcome = run_engine(source, dropoff, [series_entry("series/1", "s", 2)], dry_run=True)
    assert [f.status for f in outcome.files] == ["would-transfer"] and outcome.created == 0
    assert source.opened == [] and landed_files(dropoff) == {} and not (dropoff / "s").exists()


@pytest.mark.parametrize("broken", ["none", "copy_file_range", "copy_file_range-copies-nothing", "both"])
def test_copy_file_falls_back_and_copies_every_byte(tmp_path, monkeypatch, broken):
    """copy_file: copy_file_range where it works; sendfile where it does not (another
    filesystem on an older kernel, a filesystem without it); read/write when neither does."""
    monkeypatch.setattr("clpipe.sync.fileio._NO_COPY_RANGE", set())  # where copy_file remembers the fallbacks
    used = []
    real_range, real_sendfile = os.copy_file_range, os.sendfile

    def copy_range(*args):
        used.append("copy_file_range")
        if broken in ("copy_file_range", "both"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return 0 if broken == "copy_file_range-copies-nothing" else real_range(*args)

    def sendfile(*args):
        used.append("sendfile")
        if broken == "both":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_sendfile(*args)

    monkeypatch.setattr(os, "copy_file_range", copy_range)
    monkeypatch.setattr(os, "sendfile", sendfile)
    for n, size in enumerate((0, 1, 9_000, 3 * (1 << 20) + 7)):
        src = tmp_path / f"src{n}"
        src.write_bytes(os.urandom(size))
        dst = str(tmp_path / f"dst{n}")
        assert copy_file(src, dst) == size
        assert Path(dst).read_bytes() == src.read_bytes()
    assert used[0] == "copy_file_range"
    assert ("sendfile" in used) == (broken != "none")
    if broken in ("copy_file_range", "both"):  # remembered: not asked again for files on that filesystem
        assert used.count("copy_file_range") == 1
    with pytest.raises(FileExistsError):  # never over an existing file
        copy_file(tmp_path / "src1", str(tmp_path / "dst2"))
    with pytest.raises(FileNotFoundError) as missing:
        copy_file(tmp_path / "no such file", str(tmp_path / "dst9"))
    assert missing.value.filename == str(tmp_path / "no such file") and not (tmp_path / "dst9").exists()
