"""The file:// source against clpipe's untidy synthetic export tree
(``clpipe.testing.dicomdata.make_file_tree``): nested folders, files with and without
extensions, text and JSON beside the images, a file without preamble, duplicate copies.
No servers needed; everything runs on a temporary folder."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

import clpipe.sources.localdir as localdir
from clpipe.errors import ConfigError, DiskFull, PreflightError
from clpipe.sources.dicom import DEFAULT_TEMPLATE, DicomQuery, SourceSettings, entries, labels, parse_source_url, series_folder
from clpipe.sources.localdir import FolderSource, read_header
from clpipe.sync.engine import Engine, Options
from clpipe.sync.manifest import SyncState
from clpipe.testing.dicomdata import make_file_tree

from helpers import run_quick_bench

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    """The export tree (read only: tests that change files make their own copy)."""
    root = tmp_path_factory.mktemp("export") / "scanner export"
    return root, make_file_tree(root)


@pytest.fixture
def own_tree(tree, tmp_path) -> tuple[Path, dict]:
    """A copy of the tree that a test may change."""
    root, desc = tree
    copy = tmp_path / "export"
    shutil.copytree(root, copy, copy_function=shutil.copy2)
    return copy, desc


def source_for(root: Path, jobs: int = 4) -> FolderSource:
    return FolderSource(parse_source_url(f"file://{root}"), SourceSettings(jobs=jobs))


def path_order(rel: str) -> tuple:
    return tuple(rel.split("/"))


def listed(source: FolderSource, query: DicomQuery = DicomQuery()) -> list:
    return list(source.series(query))


class Counting:
    """Wraps a source's ``instances`` to count which series were retrieved."""

    def __init__(self, source: FolderSource):
        self.source, self.calls = source, Counter()
        inner = source.instances

        @contextmanager
        def instances(entry):
            self.calls[entry.ref.uid] += 1
            with inner(entry) as items:
                yield items

        source.instances = instances


def sync(source, dropoff: Path, run_id: str, query: DicomQuery = DicomQuery(), **options):
    """One engine run as clpipe's runner does it (lock, manifest, run, save)."""
    state = SyncState(dropoff, run_id)
    state.acquire()
    try:
        state.load()
        options = {"dropoff": dropoff, "zip_tmp": dropoff.parent / "ziptmp", "jobs": 4, **options}
        outcome = Engine(source, state, Options(**options)).run(entries(source, query))
        state.save()
    finally:
        state.release()
    return outcome


def dropoff_files(dropoff: Path) -> dict[str, bytes]:
    out = {}
    for path in dropoff.rglob("*"):
        if path.is_file() and ".clpipe-sync" not in path.relative_to(dropoff).parts:
            out[path.relative_to(dropoff).as_posix()] = path.read_bytes()
    return out


# ----------------------------------------------------------------------------- listing


def test_every_instance_once_with_its_series(tree):
    root, desc = tree
    source = source_for(root)
    found = listed(source)
    expected_series = {s["SeriesInstanceUID"]: s for s in desc["series"]}
    assert sorted(s.uid for s in found) == sorted(expected_series)
    assert len({s.uid for s in found}) == len(found)  # each series once
    sops = [sop for s in found for sop, _ in s.ref]
    assert len(sops) == len(set(sops)) == desc["counts"]["instances"]
    assert set(sops) == {i["SOPInstanceUID"] for i in desc["instances"]}
    by_sop = {i["SOPInstanceUID"]: i for i in desc["instances"]}
    for series in found:
        assert series.count == expected_series[series.uid]["instances"] == len(series.ref)
        assert all(by_sop[sop]["SeriesInstanceUID"] == series.uid for sop, _ in series.ref)
        assert series.version.startswith("files:")
    # the file without preamble and file meta is an instance like the others
    no_preamble = desc["tree"]["no_preamble"][0]
    kept = {Path(p).relative_to(root).as_posix() for s in found for _, p in s.ref}
    assert no_preamble in kept
    assert source.stats.instances == desc["counts"]["instances"]


def test_non_dicom_files_are_skipped_and_noted(tree):
    root, desc = tree
    source = source_for(root)
    listed(source)
    skipped = sorted(Path(p).relative_to(root).as_posix() for p in source.stats.not_dicom)
    visible = sorted(f["path"] for f in desc["tree"]["other_files"] if not Path(f["path"]).name.startswith("."))
    assert skipped == visible  # README, notes.txt, series.json, empty.dcm; ._IM0001.dcm is hidden
    assert any(f"skipped {len(visible)} files that are not DICOM" in note for note in source.notes)
    assert not source.stats.unreadable


def test_duplicates_keep_the_first_file_in_path_order(tree):
    root, desc = tree
    source = source_for(root)
    found = listed(source)
    files_of: dict[str, list[str]] = {}
    for f in desc["tree"]["dicom_files"]:
        files_of.setdefault(f["SOPInstanceUID"], []).append(f["path"])
    kept = {sop: Path(p).relative_to(root).as_posix() for s in found for sop, p in s.ref}
    repeated = {sop: paths for sop, paths in files_of.items() if len(paths) > 1}
    assert len(repeated) == len(desc["tree"]["duplicates"]) == 3
    for sop, paths in repeated.items():
        assert kept[sop] == min(paths, key=path_order)
    dropped = sorted(Path(p).relative_to(root).as_posix() for p in source.stats.duplicates)
    assert dropped == sorted(p for paths in repeated.values() for p in sorted(paths, key=path_order)[1:])
    assert any("3 files that repeat an instance" in note for note in source.notes)


def test_attributes_match_pydicom_and_the_description(tree):
    """Text is decoded as pydicom decodes it (UTF-8, Latin-1, no character set)."""
    root, desc = tree
    found = {s.uid: s for s in listed(source_for(root))}
    for expected in desc["series"]:
        series = found[expected["SeriesInstanceUID"]]
        assert series.attrs["SeriesDescription"] == (expected["SeriesDescription"] or "").strip()
        assert series.attrs["SeriesNumber"] == ("" if expected["SeriesNumber"] is None else str(expected["SeriesNumber"]))
        assert series.attrs["PatientID"] == expected["PatientID"]
        ds = pydicom.dcmread(series.ref[0][1], force=True, stop_before_pixels=True)
        for keyword in localdir.SERIES_KEYS:
            value = ds.get(keyword)
            if isinstance(value, pydicom.multival.MultiValue):
                value = "\\".join(map(str, value))
            text = "" if value is None else str(value)
            assert series.attrs[keyword] == text.strip(), keyword
    names = {s.attrs["PatientName"] for s in found.values()}
    assert names == {"Doe^Jane", "Müller^José", "O'Brien^Sam-Lee"}


def test_headers_read_by_threads_when_reading_waits(tree, monkeypatch):
    """On a share where reads mostly wait, the rest of the files are read by threads; the
    listing is the same, in the same order."""
    root, _ = tree
    serial = [(s.uid, s.ref, s.version) for s in listed(source_for(root))]
    pools = []

    class Pool(localdir.ThreadPoolExecutor):
        def __init__(self, *args, **kw):
            pools.append(kw.get("max_workers"))
            super().__init__(*args, **kw)

    monkeypatch.setattr(localdir, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(localdir, "PROBE", 8)
    monkeypatch.setattr(localdir.time, "thread_time", lambda: 0.0)  # no CPU used: all of it was waiting
    threaded = [(s.uid, s.ref, s.version) for s in listed(source_for(root, jobs=3))]
    assert pools == [3] and threaded == serial


@pytest.mark.parametrize("waits", [False, True], ids=["local-disk", "share-that-waits"])
def test_copy_jobs_follow_the_cpus_unless_reading_waits(tree, tmp_path, monkeypatch, waits):
    """Copying from a local disk is CPU work: the engine runs no more series at once than
    there are CPUs; from a share whose reads wait, all the jobs it was given."""
    import clpipe.sync.engine as engine_module

    root, desc = tree
    monkeypatch.setattr(localdir, "cpus", lambda: 2)
    # the probe times wall clock against CPU: all of it CPU, or none of it
    monkeypatch.setattr(localdir.time, "thread_time", (lambda: 0.0) if waits else localdir.time.perf_counter)
    pools = []

    class Pool(engine_module.ThreadPoolExecutor):
        def __init__(self, *args, **kw):
            pools.append(kw.get("max_workers"))
            super().__init__(*args, **kw)

    monkeypatch.setattr(engine_module, "ThreadPoolExecutor", Pool)
    source = source_for(root, jobs=4)
    assert source.max_jobs == 4  # before a listing: what it was given
    outcome = sync(source, tmp_path / "dropoff", "run1")
    assert outcome.failed == 0 and outcome.created == desc["counts"]["instances"]
    assert source.max_jobs == (4 if waits else 2) and pools == [source.max_jobs]
    pools.clear()
    outcome = sync(source, tmp_path / "dropoff2", "run1", jobs=1)  # the configured jobs stay the ceiling
    assert outcome.failed == 0 and pools == [1]


def test_fast_reader_agrees_with_pydicom_on_every_file(tree):
    root, _ = tree
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        assert read_header(str(path)) == read_header(str(path), fast=False), path


def test_filters_and_study_limit(tree):
    root, desc = tree
    source = source_for(root)

    def uids(**query) -> set[str]:
        return {s.uid for s in listed(source, DicomQuery(**query))}

    def expect(pred) -> set[str]:
        return {s["SeriesInstanceUID"] for s in desc["series"] if pred(s)}

    studies = {s["StudyInstanceUID"]: s for s in desc["studies"]}
    assert uids(patient_id="SUB02") == expect(lambda s: s["PatientID"] == "SUB02")
    assert uids(patient_id="sub 03*") == expect(lambda s: s["PatientID"] == "SUB 03/x")
    assert uids(patient_name="*José") == expect(lambda s: s["PatientID"] == "SUB02")
    assert uids(series_description="T1w") == expect(lambda s: s["SeriesDescription"] == "T1w")
    assert uids(modality="MR") == expect(lambda s: True)
    assert uids(modality="CT") == set()
    assert uids(study_date="20240101-20240131") == expect(lambda s: studies[s["StudyInstanceUID"]]["StudyDate"] == "20240115")
    assert uids(study_date="20240201-") == expect(lambda s: (studies[s["StudyInstanceUID"]]["StudyDate"] or "") >= "20240201")
    assert uids(accession_number="ACC 0003/b") == expect(lambda s: s["PatientID"] == "SUB 03/x")
    # limit counts studies (matching ones), in the order their first file is found
    one = listed(source, DicomQuery(limit=1))
    assert len({s.attrs["StudyInstanceUID"] for s in one}) == 1
    first_study = one[0].attrs["StudyInstanceUID"]
    assert {s.uid for s in one} == expect(lambda s: s["StudyInstanceUID"] == first_study)
    two = listed(source, DicomQuery(limit=2, patient_id="SUB01"))
    assert len({s.attrs["StudyInstanceUID"] for s in two}) == 2
    assert {s.uid for s in two} == expect(lambda s: s["PatientID"] == "SUB01")


def test_layout_of_odd_and_missing_attributes(tree):
    """Folders follow sources/dicom.py labels(): slashes, '..', control characters and
    missing attributes never make a path that escapes or breaks the dropoff."""
    root, desc = tree
    source = source_for(root)
    found = {e.ref.uid: e for e in entries(source, DicomQuery())}
    odd = desc["odd"]
    for _uid, entry in found.items():
        assert entry.path == series_folder(DEFAULT_TEMPLATE, entry.ref.attrs)
        assert ".." not in entry.path.split("/") and not entry.path.startswith("/")
        assert entry.count == entry.ref.count and entry.version == entry.ref.version and entry.series
    assert found[odd["no_description_series"]].path == "SUB01/nodate/NA-MR"  # no date, no number, no description
    assert found[odd["dotdot_series"]].path == "SUB01/20240115/003-.._.._etc"
    assert found[odd["control_char_series"]].path == "SUB01/nodate/002-DWI_b=1000_x"
    slash = [e for e in found.values() if e.ref.attrs["PatientID"] == "SUB 03/x"]
    assert slash and all(e.path.startswith("SUB03x/20240305/") for e in slash)
    assert labels(found[odd["no_description_series"]].ref.attrs)["series"] == "NA-MR"


# ----------------------------------------------------------------------------- odd files


def _dataset(**attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "P1", "Test^Pat", "MR", 7, "odd"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _write(ds: Dataset, path: Path, syntax=ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return path


def _refused(*_args, **_kw):
    raise AssertionError("the fast reader should have read this file itself")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_fast_reader_skips_undefined_length_sequences_and_long_values(tmp_path, monkeypatch, syntax):
    """Sequences of undefined length (nested, with undefined-length items) and a private
    value larger than the first block come before SeriesNumber; the fast reader walks
    past them without pydicom."""
    inner = Dataset()
    inner.ReferencedSOPClassUID, inner.ReferencedSOPInstanceUID = "1.2.3", "1.2.3.4"
    deeper = Dataset()
    deeper.CodeValue, deeper.CodingSchemeDesignator = "X", "Y"
    inner.PurposeOfReferenceCodeSequence = [deeper]
    ds = _dataset(ReferencedImageSequence=[inner, Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = True
    inner["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    for item in ds.ReferencedImageSequence:
        item.is_undefined_length_sequence_item = True
    ds.add_new(0x00190010, "LO", "CLPIPE TEST")
    ds.add_new(0x00191001, "OB", bytes(range(256)) * 80)  # 20 kB, past the first 8 kB block
    path = _write(ds, tmp_path / "seq.dcm", syntax)
    monkeypatch.setattr(localdir, "_pydicom_values", _refused)
    header = read_header(str(path))
    assert header.sop_uid == ds.SOPInstanceUID
    assert header.attrs["SeriesInstanceUID"] == ds.SeriesInstanceUID and header.attrs["SeriesNumber"] == "7"
    monkeypatch.undo()
    assert header == read_header(str(path), fast=False)


def test_big_endian_and_iso_2022_go_through_pydicom(tmp_path):
    ds = _dataset(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう")
    path = tmp_path / "be.dcm"
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.save_as(path, enforce_file_format=True, little_endian=False, implicit_vr=False)
    header = read_header(str(path))
    assert header.attrs["PatientName"] == str(pydicom.dcmread(path).PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert header.attrs["SeriesNumber"] == "7" and header.sop_uid == ds.SOPInstanceUID


def test_files_that_only_look_like_dicom_are_not_instances(tmp_path):
    (tmp_path / "group8-garbage").write_bytes(b"\x08\x00\x05\x00" + os.urandom(4000))
    (tmp_path / "preamble-garbage.dcm").write_bytes(bytes(128) + b"DICM" + os.urandom(4000))
    (tmp_path / "DICOMDIR").write_bytes(bytes(128) + b"DICM")
    ds = _dataset()
    del ds.SeriesInstanceUID  # DICOM, but no series to put it in
    _write(ds, tmp_path / "no-series.dcm")
    _write(_dataset(), tmp_path / "good.dcm")
    source = source_for(tmp_path)
    found = listed(source)
    assert [s.count for s in found] == [1]
    assert sorted(Path(p).name for p in source.stats.not_dicom) == ["DICOMDIR", "group8-garbage", "no-series.dcm", "preamble-garbage.dcm"]


def test_hidden_files_symlinked_folders_and_dropoffs_are_not_walked(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "a").mkdir(parents=True)
    outside.mkdir()
    _write(_dataset(), src / "a" / "1.dcm")
    _write(_dataset(), outside / "2.dcm")
    _write(_dataset(), src / ".hidden.dcm")
    (src / "link").symlink_to(outside, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)
    (src / "dropoff" / ".clpipe-sync").mkdir(parents=True)
    _write(_dataset(), src / "dropoff" / "copied.dcm")
    source = source_for(src)
    found = listed(source)
    assert [Path(p).name for s in found for _, p in s.ref] == ["1.dcm"]
    assert sorted(Path(p).name for p in source.stats.linked_folders) == ["link", "loop"]
    assert [Path(p).name for p in source.stats.dropoffs] == ["dropoff"]
    assert any("symlinked folders" in n for n in source.notes) and any("dropoff" in n for n in source.notes)


# ----------------------------------------------------------------------------- folder errors


def test_missing_folder_file_and_unreadable_folder(tmp_path, monkeypatch):
    with pytest.raises(PreflightError) as err:
        source_for(tmp_path / "not mounted")
    assert str(tmp_path / "not mounted") in str(err.value) and "mount" in str(err.value)
    (tmp_path / "a file").write_text("x")
    with pytest.raises(ConfigError) as err:
        source_for(tmp_path / "a file")
    assert "is a file, not a folder" in str(err.value)
    real_scandir = os.scandir

    def denied(path="."):
        if os.fspath(path) == str(tmp_path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(localdir.os, "scandir", denied)
    with pytest.raises(PreflightError) as err:
        source_for(tmp_path)
    assert f"cannot list the source folder {tmp_path}: permission denied" in str(err.value)


def test_an_empty_folder_is_listed_with_a_note(tmp_path):
    source = source_for(tmp_path)
    assert listed(source) == []
    assert any("holds no files at all" in n and "mounted" in n for n in source.notes)


# ----------------------------------------------------------------------------- with the engine


def test_sync_copies_every_instance_byte_for_byte_then_nothing(own_tree, tmp_path):
    root, desc = own_tree
    dropoff = tmp_path / "dropoff"
    source = source_for(root)
    counting = Counting(source)
    outcome = sync(source, dropoff, "run1")
    assert outcome.failed == 0, outcome.failures
    assert outcome.created == desc["counts"]["instances"]
    files = dropoff_files(dropoff)
    assert len(files) == desc["counts"]["instances"]
    folders = {e.ref.uid: e.path for e in entries(source, DicomQuery())}
    for instance in desc["instances"]:
        copied = files[f"{folders[instance['SeriesInstanceUID']]}/{instance['SOPInstanceUID']}.dcm"]
        assert copied == (root / instance["path"]).read_bytes()
    assert sum(counting.calls.values()) == len(desc["series"])

    counting.calls.clear()
    again = sync(source, dropoff, "run2")
    assert (again.created, again.updated, again.failed) == (0, 0, 0)
    assert again.skipped == desc["counts"]["instances"]
    assert not counting.calls  # nothing retrieved


def test_dry_run_copies_nothing(tree, tmp_path):
    root, desc = tree
    dropoff = tmp_path / "dropoff"
    outcome = sync(source_for(root), dropoff, "run1", dry_run=True)
    assert outcome.failed == 0 and outcome.created == 0
    assert len(outcome.files) == len(desc["series"]) and {f.status for f in outcome.files} == {"would-transfer"}
    assert dropoff_files(dropoff) == {} and [p.name for p in dropoff.iterdir()] == [".clpipe-sync"]


def test_a_changed_or_added_file_copies_only_its_series_again(own_tree, tmp_path):
    root, desc = own_tree
    dropoff = tmp_path / "dropoff"
    source = source_for(root)
    counting = Counting(source)
    assert sync(source, dropoff, "run1").failed == 0
    by_uid = {s["SeriesInstanceUID"]: s for s in desc["series"]}
    instance = next(i for i in desc["instances"] if i["SeriesInstanceUID"] == desc["odd"]["rle_series"])
    path = root / instance["path"]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched

    counting.calls.clear()
    outcome = sync(source, dropoff, "run2")
    assert dict(counting.calls) == {instance["SeriesInstanceUID"]: 1}
    assert outcome.updated == by_uid[instance["SeriesInstanceUID"]]["instances"] and outcome.created == 0

    # a series that gains an instance (another file, another SOPInstanceUID) is copied again, whole
    ds = pydicom.dcmread(root / next(i["path"] for i in desc["instances"] if i["SeriesInstanceUID"] == desc["odd"]["implicit_vr_series"]))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(root / "late arrival.dcm", enforce_file_format=True)
    counting.calls.clear()
    outcome = sync(source, dropoff, "run3")
    assert dict(counting.calls) == {desc["odd"]["implicit_vr_series"]: 1}
    assert outcome.updated == by_uid[desc["odd"]["implicit_vr_series"]]["instances"] + 1 and outcome.failed == 0
    folder = next(e.path for e in entries(source, DicomQuery()) if e.ref.uid == desc["odd"]["implicit_vr_series"])
    assert (dropoff / folder / f"{ds.SOPInstanceUID}.dcm").read_bytes() == (root / "late arrival.dcm").read_bytes()


def test_a_file_vanished_mid_run_is_retried_then_reported(own_tree, tmp_path, capsys):
    """Listed, then gone before the copy: the engine's OSError opening it becomes a
    TransientError naming the file (retried, in case the share comes back), then that
    series fails and every other one arrives."""
    root, desc = own_tree
    dropoff = tmp_path / "dropoff"
    source = source_for(root)
    doomed = next(i for i in desc["instances"] if i["SeriesInstanceUID"] == desc["odd"]["dotdot_series"])
    listing = list(entries(source, DicomQuery()))
    (root / doomed["path"]).unlink()
    state = SyncState(dropoff, "run1")
    state.acquire()
    try:
        state.load()
        outcome = Engine(source, state, Options(dropoff=dropoff, zip_tmp=tmp_path / "z", jobs=4, retries=1, backoff=0.01)).run(listing)
        state.save()
    finally:
        state.release()
    assert outcome.failed == 1
    [failure] = outcome.failures
    assert str(root / doomed["path"]) in failure and "it is gone" in failure
    assert "[retry]" in capsys.readouterr().out
    assert outcome.created == desc["counts"]["instances"] - by_series(desc)[desc["odd"]["dotdot_series"]]


KILLED_RUN = """
import sys, time
from pathlib import Path
import clpipe.sync.engine as engine
from clpipe.sources.dicom import DicomQuery, SourceSettings, entries, parse_source_url
from clpipe.sources.localdir import FolderSource
from clpipe.sync.manifest import SyncState

real = engine.copy_file
def slow(src, dst):  # slow enough to be killed in the middle of a series
    size = real(src, dst)
    time.sleep(0.01)
    return size
engine.copy_file = slow
source = FolderSource(parse_source_url("file://" + sys.argv[1]), SourceSettings(jobs=2))
state = SyncState(Path(sys.argv[2]), "killed")
state.acquire()
state.load()
engine.Engine(source, state, engine.Options(dropoff=Path(sys.argv[2]), zip_tmp=Path(sys.argv[2] + ".z"),
                                            jobs=2)).run(entries(source, DicomQuery()))
"""


def test_kill_9_mid_series_then_resume(own_tree, tmp_path):
    """Killed while series are being copied: nothing but whole instances under their final
    names is in the data folders, even before the next run (converters may read them at
    once): instances are staged in .clpipe-sync/tmp/; the next run empties it, keeps what
    the killed run finished and copies the rest."""
    import signal
    import subprocess
    import sys

    root, desc = own_tree
    dropoff = tmp_path / "dropoff"
    state_dir = dropoff / ".clpipe-sync"

    def staging() -> bool:  # an instance staged and not yet placed, wherever it is staged
        return any(p.is_file() for p in (state_dir / "tmp").rglob("*")) or any(
            p.name.startswith(".") for p in dropoff.rglob("*") if ".clpipe-sync" not in p.parts
        )

    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(root), str(dropoff)], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        journal = state_dir / "journal-killed.jsonl"
        # until a series is done (journalled) and another is staged half-way
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.stat().st_size and staging():
                break
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    source = source_for(root)
    folders = {e.ref.uid: e.path for e in entries(source, DicomQuery())}
    want = {f"{folders[i['SeriesInstanceUID']]}/{i['SOPInstanceUID']}.dcm": (root / i["path"]).read_bytes() for i in desc["instances"]}
    landed = dropoff_files(dropoff)
    assert landed and set(landed) <= set(want), sorted(set(landed) - set(want))[:3]  # no name but the final ones
    assert all(want[k] == v for k, v in landed.items())  # and every file under a final name is whole
    series_folders = {str(Path(k).parent) for k in want}
    for path in dropoff.rglob("*"):  # nothing else: no hidden file, no folder but the layout's
        rel = path.relative_to(dropoff).as_posix()
        if path.is_dir() and ".clpipe-sync" not in path.parts:
            assert any(f == rel or f.startswith(rel + "/") for f in series_folders), rel
    assert any(p.is_file() for p in (state_dir / "tmp").rglob("*")), "the kill did not hit a series being copied"

    # the next run's start empties tmp/, whether or not it fetches those series again
    state = SyncState(dropoff, "next")
    state.acquire()
    try:
        state.load()
    finally:
        state.release()
    assert not any((state_dir / "tmp").iterdir())

    outcome = sync(source, dropoff, "resumed")
    assert outcome.failed == 0, outcome.failures
    assert dropoff_files(dropoff) == want
    assert outcome.skipped > 0  # series the killed run finished are not copied again


def by_series(desc: dict) -> dict[str, int]:
    return {s["SeriesInstanceUID"]: s["instances"] for s in desc["series"]}


def test_a_dropoff_inside_the_source_is_not_listed_again(own_tree):
    root, desc = own_tree
    source = source_for(root)
    assert sync(source, root / "synced", "run1").failed == 0
    assert sum(s.count for s in listed(source)) == desc["counts"]["instances"]
    assert [Path(p).name for p in source.stats.dropoffs] == ["synced"]


def test_unreadable_files_and_broken_links_are_noted(own_tree, monkeypatch):
    root, desc = own_tree
    victim = root / desc["instances"][1]["path"]  # [0] has a duplicate copy elsewhere
    (root / "dangling.dcm").symlink_to(root / "no such file")
    real = localdir.read_header

    def read_header(path, **kw):
        if path == str(victim):
            raise PermissionError(13, "Permission denied", path)
        return real(path, **kw)

    monkeypatch.setattr(localdir, "read_header", read_header)
    source = source_for(root)
    found = listed(source)
    assert sum(s.count for s in found) == desc["counts"]["instances"] - 1
    assert set(source.stats.unreadable) == {f"{root / 'dangling.dcm'}: a broken symbolic link", f"{victim}: Permission denied"}
    assert any(n.startswith("could not read 2 files, so the run fails") for n in source.notes)
    assert sorted(source.problems) == sorted(source.stats.unreadable)


def test_a_full_dropoff_is_not_blamed_on_the_source(own_tree, tmp_path, monkeypatch):
    """The engine's copy names the source file in its ENOSPC error (as shutil.copyfile
    does); that must stay a dropoff problem, not become 'the source file cannot be read'."""

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    root, desc = own_tree
    with pytest.raises(DiskFull) as caught:  # a full disk stops the run with one line about the dropoff
        sync(source_for(root), tmp_path / "dropoff", "run1", retries=0)
    message = str(caught.value)
    assert f"no space left on {tmp_path / 'dropoff'}" in message
    assert str(root) not in message and "cannot be read" not in message and "listed" not in message


def test_benchmark_quick_mode_runs_every_peer(tmp_path):
    """bench/dicom_folder.py --quick: every peer runs and is checked; nothing is saved."""
    import re

    out, _ = run_quick_bench("dicom_folder.py", "dicom_folder.md", "--workdir", tmp_path, timeout=300)
    rows = [line for line in out.splitlines() if line.startswith("| quick | 1 |")]
    names = [row.split("|")[3].strip() for row in rows]
    assert names == [
        "cp -r full",
        "rsync -a full",
        "rsync -a no-op",
        "Python floor no-op",
        "native full",
        "native no-op",
        "native no-op, no stamp",
        "native no-op, no stamp nor listing cache",
        "native jobs=1 full",
        "clpipe dicom sync full",
        "clpipe dicom sync no-op",
    ]
    assert re.search(
        r"^\| quick: native no-op / rsync -a no-op, median of the rounds' ratios \| [\d.]+ .*\| <= 1.0 \| (met|NOT met) \|$", out, re.M
    )
    assert re.search(r"^\| quick: native no-op / Python floor no-op, median of the rounds' ratios \| [\d.]+ ", out, re.M)
    assert all(row.rstrip().endswith("| ok |") for row in rows), rows
    phases = {row.split("|")[3].strip(): row.split("|")[9] for row in rows}
    assert "nothing changed since the stamp" in phases["native no-op"]  # the stamp's check, nothing listed
    assert "nothing changed since the stamp" not in phases["native no-op, no stamp"]
    assert "headers from the listing cache" in phases["native no-op, no stamp"]


def test_delete_refuses_when_the_folder_lists_nothing(own_tree, tmp_path):
    # an unmounted share is an empty folder: --delete must not take that as "everything is gone"
    root, _ = own_tree
    dropoff = tmp_path / "dropoff"
    first = sync(source_for(root), dropoff, "run1")
    assert first.failed == 0 and first.created
    before = dropoff_files(dropoff)
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    outcome = sync(source_for(root), dropoff, "run2", delete=True)
    assert outcome.failed == 1 and outcome.deleted == 0 and "the source listed nothing" in outcome.failures[0]
    assert dropoff_files(dropoff) == before


def test_file_url_keeps_hash_and_question_mark_in_folder_names(tmp_path):
    folder = tmp_path / "scans #1 ?b"
    assert parse_source_url(f"file://{folder}").path == str(folder)
    assert parse_source_url("file:///data/a%20b").path == "/data/a b"


def test_a_file_that_becomes_unreadable_keeps_its_synced_copy_even_with_delete(own_tree, tmp_path):
    """A synced instance whose source file cannot be read on the next run (here a broken
    link, the one unreadable file root can make) may still be an instance of the study:
    its series is listed with one instance fewer, fetched again, yet the copy already in
    the dropoff stays (and stays recorded), --delete removes nothing, the run fails; once
    the file is back, the next run completes with every file."""
    root, desc = own_tree
    dropoff = tmp_path / "dropoff"
    first = sync(source_for(root), dropoff, "run1")
    assert first.failed == 0
    before = dropoff_files(dropoff)
    assert len(before) == desc["counts"]["instances"]
    victim = root / desc["instances"][1]["path"]  # [0] has a duplicate copy elsewhere
    saved = victim.read_bytes()
    victim.unlink()
    victim.symlink_to(root / "not-there-any-more.dcm")

    second = sync(source_for(root), dropoff, "run2", delete=True)
    assert second.failed == 1 and second.failures == [f"{victim}: a broken symbolic link (in the source; not synced)"]
    assert "--delete skipped: the run had errors, so nothing is deleted" in second.notes
    assert dropoff_files(dropoff) == before  # nothing lost, nothing changed

    victim.unlink()
    victim.write_bytes(saved)
    third = sync(source_for(root), dropoff, "run3", delete=True)
    assert third.failed == 0, third.failures
    assert dropoff_files(dropoff) == before


def test_a_copy_that_breaks_half_way_names_both_ends(own_tree, tmp_path, monkeypatch):
    """An I/O error in the middle of a copy (both files open) may be the share's or the
    dropoff's: the failure names both and blames neither."""

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    monkeypatch.setattr(os, "sendfile", broken)
    root, desc = own_tree
    outcome = sync(source_for(root), tmp_path / "dropoff", "run1", retries=0)
    assert outcome.failed == len(desc["series"])
    assert all(
        "failed (Input/output error); check the share the folder is on and the dropoff's filesystem" in f
        and "though it was there when the folder was listed" not in f
        for f in outcome.failures
    ), outcome.failures[:2]
    assert not dropoff_files(tmp_path / "dropoff")


# ----------------------------------------------------------------------------- the listing cache


class Reads:
    """The files whose header a listing reads (every read goes through localdir.read_header)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real = localdir.read_header

        def read_header(path, **kw):
            self.paths.append(path)
            return real(path, **kw)

        monkeypatch.setattr(localdir, "read_header", read_header)


def cached_source(root: Path, cache: Path, write: bool = True, jobs: int = 4) -> FolderSource:
    source = source_for(root, jobs)
    source.cache_listing(cache, write=write)
    return source


def snapshot(source: FolderSource) -> tuple:
    """Everything a listing gives: the series (attributes, files, version) and the stats."""
    found = [(s.uid, s.attrs, s.count, s.ref, s.version) for s in listed(source)]
    st = source.stats
    return found, st.files, st.instances, st.not_dicom, st.duplicates, st.unreadable, source.notes


def walked(source: FolderSource) -> int:
    """The files the last listing had to know (all but those skipped by name: DICOMDIR)."""
    return source.stats.files - sum(1 for p in source.stats.not_dicom if Path(p).name in localdir.NOT_DICOM_NAMES)


def reseal(cache_file: Path, change) -> None:
    """Apply ``change`` to the cache's body and give it a valid checksum again (damage
    that the checksum alone does not catch)."""
    head, _, body = cache_file.read_bytes().partition(b"\n")
    body = change(body)
    magic = head.rpartition(b" ")[0]
    cache_file.write_bytes(magic + b" " + hashlib.sha1(body).hexdigest().encode() + b"\n" + body)


@pytest.fixture
def old_files(monkeypatch):
    """The test's files count as unchanged for long enough to be kept (they were all
    written a moment ago, within RACY_NS)."""
    monkeypatch.setattr(localdir, "RACY_NS", 0)


def test_a_second_listing_opens_no_unchanged_file(own_tree, tmp_path, monkeypatch, old_files):
    root, desc = own_tree
    cache = tmp_path / "state"
    cache.mkdir()
    reads = Reads(monkeypatch)
    first_source = cached_source(root, cache)
    first = snapshot(first_source)
    assert first == snapshot(source_for(root))  # the same listing as without a cache
    assert len(reads.paths) == 2 * walked(first_source) and first_source.stats.cached == 0
    cache_file = cache / localdir.LISTING_CACHE
    written = cache_file.stat()

    reads.paths.clear()
    second_source = cached_source(root, cache)
    assert snapshot(second_source) == first
    assert reads.paths == []  # not one file opened: every header came from the cache
    assert second_source.stats.cached == walked(second_source) == walked(first_source)
    after = cache_file.stat()  # nothing changed, so nothing was written
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)

    # the engine's no-op on top of it: nothing retrieved, nothing read
    dropoff = tmp_path / "dropoff"
    assert sync(cached_source(root, cache), dropoff, "run1").failed == 0
    reads.paths.clear()
    again = sync(cached_source(root, cache), dropoff, "run2")
    assert (again.created, again.updated, again.skipped) == (0, 0, desc["counts"]["instances"]) and reads.paths == []


def test_a_file_changed_with_the_same_size_is_read_again(own_tree, tmp_path, monkeypatch, old_files):
    """Same size, same mtime (set back), another SOPInstanceUID: the ctime gives it away;
    same size, new mtime: read again too. Only that file is read."""
    root, desc = own_tree
    cache = tmp_path / "state"
    cache.mkdir()
    listed(cached_source(root, cache))
    instance = next(i for i in desc["instances"] if i["SeriesInstanceUID"] == desc["odd"]["implicit_vr_series"])
    path = root / instance["path"]
    old_uid = instance["SOPInstanceUID"].encode()
    new_uid = old_uid[:-1] + (b"1" if old_uid[-1:] != b"1" else b"2")
    assert new_uid.decode() not in {i["SOPInstanceUID"] for i in desc["instances"]}
    st = path.stat()
    data = path.read_bytes()
    assert old_uid in data
    time.sleep(0.01)  # a ctime of its own
    path.write_bytes(data.replace(old_uid, new_uid))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    reads = Reads(monkeypatch)
    source = cached_source(root, cache)
    found = {sop: p for s in listed(source) for sop, p in s.ref}
    assert reads.paths == [str(path)]
    assert found[new_uid.decode()] == str(path) and old_uid.decode() not in found
    assert snapshot(source_for(root)) == snapshot(cached_source(root, cache))  # the cache now knows it

    reads.paths.clear()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: a new mtime, same size
    source = cached_source(root, cache)
    versions = {s.uid: s.version for s in listed(source)}
    assert reads.paths == [str(path)] and source.stats.cached == walked(source) - 1
    assert versions == {s.uid: s.version for s in listed(source_for(root))}


def test_added_and_removed_files_change_the_cache(own_tree, tmp_path, monkeypatch, old_files):
    root, desc = own_tree
    cache = tmp_path / "state"
    cache.mkdir()
    listed(cached_source(root, cache))
    gone = root / desc["instances"][5]["path"]
    gone.unlink()
    shutil.copy2(root / desc["instances"][6]["path"], root / "copy of six")
    expected = snapshot(source_for(root))
    reads = Reads(monkeypatch)
    assert snapshot(cached_source(root, cache)) == expected
    assert reads.paths == [str(root / "copy of six")]
    reads.paths.clear()
    listed(cached_source(root, cache))
    assert reads.paths == []
    text = (cache / localdir.LISTING_CACHE).read_text()
    assert "\ncopy of six\t" in text and f"\n{gone.relative_to(root).as_posix()}\t" not in text


def _flip(body: bytes) -> bytes:
    middle = len(body) // 2
    return body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1 :]


DAMAGE = {
    "a flipped bit": lambda f: f.write_bytes(_flip(f.read_bytes())),
    "cut short": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "empty": lambda f: f.write_bytes(b""),
    "another format version": lambda f: f.write_bytes(f.read_bytes().replace(b"folder listing 1 ", b"folder listing 99 ", 1)),
    "another folder": lambda f: reseal(f, lambda body: body.replace(b'"root": "', b'"root": "/elsewhere', 1)),
    "lines that are not rows": lambda f: reseal(f, lambda body: b"nonsense\n" + body.rstrip(b"\n").rpartition(b"\n")[2] + b"\n"),
    "JSON that is not": lambda f: reseal(f, lambda body: body.rstrip(b"\n") + b"}\n"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_or_foreign_cache_is_ignored_and_rewritten(own_tree, tmp_path, monkeypatch, old_files, damage):
    root, _ = own_tree
    cache = tmp_path / "state"
    cache.mkdir()
    expected = snapshot(cached_source(root, cache))
    DAMAGE[damage](cache / localdir.LISTING_CACHE)
    reads = Reads(monkeypatch)
    source = cached_source(root, cache)
    assert snapshot(source) == expected
    assert source.stats.cached == 0 and len(reads.paths) == walked(source)  # every file read again
    reads.paths.clear()
    listed(cached_source(root, cache))
    assert reads.paths == []  # and the cache written anew


def test_a_row_with_a_bad_values_index_reads_that_file_only(own_tree, tmp_path, monkeypatch, old_files):
    root, desc = own_tree
    cache = tmp_path / "state"
    cache.mkdir()
    expected = snapshot(cached_source(root, cache))
    rel = desc["instances"][3]["path"]
    cache_file = cache / localdir.LISTING_CACHE

    def bad_index(body: bytes) -> bytes:
        lines = body.split(b"\n")
        for n, line in enumerate(lines):
            if line.startswith(rel.encode() + b"\t"):
                lines[n] = line.rpartition(b"\t")[0] + b"\t9999"
        return b"\n".join(lines)

    reseal(cache_file, bad_index)
    reads = Reads(monkeypatch)
    assert snapshot(cached_source(root, cache)) == expected
    assert reads.paths == [str(root / rel)]


def test_a_dry_run_reads_the_cache_but_writes_none(own_tree, tmp_path, monkeypatch, old_files):
    root, desc = own_tree
    cache = tmp_path / "state"
    cache.mkdir()
    listed(cached_source(root, cache, write=False))
    assert not (cache / localdir.LISTING_CACHE).exists()
    listed(cached_source(root, cache))
    before = (cache / localdir.LISTING_CACHE).read_bytes()
    path = root / desc["instances"][2]["path"]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))
    reads = Reads(monkeypatch)
    source = cached_source(root, cache, write=False)
    listed(source)
    assert reads.paths == [str(path)] and source.stats.cached == walked(source) - 1
    assert (cache / localdir.LISTING_CACHE).read_bytes() == before


def test_files_changed_a_moment_ago_are_not_kept(own_tree, tmp_path, monkeypatch):
    """A file changed within RACY_NS of the listing could change again within the same
    timestamp (1 s, 2 s on some filesystems) unseen: it is read again next time."""
    root, desc = own_tree  # copied just now: every ctime is recent
    cache = tmp_path / "state"
    cache.mkdir()
    listed(cached_source(root, cache))
    reads = Reads(monkeypatch)
    source = cached_source(root, cache)
    listed(source)
    assert source.stats.cached == 0 and len(reads.paths) == walked(source)


def test_on_a_share_that_waits_the_stats_are_made_by_threads(own_tree, tmp_path, monkeypatch, old_files):
    """The probe's verdict is kept in the cache: when the last listing found that reading
    waits (a share), the next one's stat calls overlap in ``jobs`` threads, STAT_CHUNK
    files a task (a task a file cost more than the stat); same listing."""
    root, _ = own_tree
    cache = tmp_path / "state"
    cache.mkdir()
    pools = []
    tasks = []

    class Pool(localdir.ThreadPoolExecutor):
        def __init__(self, *args, **kw):
            pools.append(kw.get("thread_name_prefix"))
            super().__init__(*args, **kw)

        def submit(self, *args, **kw):
            tasks.append(pools[-1])
            return super().submit(*args, **kw)

    monkeypatch.setattr(localdir, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(localdir, "PROBE", 8)
    monkeypatch.setattr(localdir, "STAT_CHUNK", 5)
    expected = snapshot(source_for(root))
    pools.clear()
    with monkeypatch.context() as busy:
        busy.setattr(localdir.time, "thread_time", localdir.time.perf_counter)  # all of it CPU: a local disk
        listed(cached_source(root, cache, jobs=3))
    assert pools == []  # no threads, and the cache says so
    with monkeypatch.context() as waiting:
        waiting.setattr(localdir.time, "thread_time", lambda: 0.0)  # no CPU used: all of it was waiting
        (cache / localdir.LISTING_CACHE).unlink()
        listed(cached_source(root, cache, jobs=3))
    assert pools == ["dicom-headers"]
    reads = Reads(monkeypatch)
    source = cached_source(root, cache, jobs=3)
    assert snapshot(source) == expected
    assert pools == ["dicom-headers", "dicom-stat"] and reads.paths == []
    assert walked(source) > 10 and tasks.count("dicom-stat") == -(-walked(source) // 5)


def test_a_killed_writer_s_temporary_file_is_removed_an_hour_later(own_tree, tmp_path, old_files):
    root, _ = own_tree
    cache = tmp_path / "state"
    cache.mkdir()
    stale, recent = cache / f".{localdir.LISTING_CACHE}.123.ab.tmp", cache / f".{localdir.LISTING_CACHE}.456.cd.tmp"
    for path in (stale, recent):
        path.write_bytes(b"half a cache")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    listed(cached_source(root, cache))
    assert sorted(p.name for p in cache.iterdir()) == sorted([localdir.LISTING_CACHE, recent.name])


def test_a_cache_that_cannot_be_written_is_no_error(own_tree, tmp_path, old_files):
    root, _ = own_tree
    expected = snapshot(source_for(root))
    assert snapshot(cached_source(root, tmp_path / "no such folder")) == expected
    assert not (tmp_path / "no such folder").exists()


def sync_command(config: Path, *opts: str) -> str:
    """`clpipe dicom sync -submit` of the project with ``opts`` as its CommandLineOpts: its
    output (it must succeed)."""
    import subprocess
    import sys

    data = json.loads(config.read_text())
    data["SourceOptions"]["CommandLineOpts"] = " ".join(opts)
    config.write_text(json.dumps(data))
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", "dicom", "sync", "-config_file", str(config), "-submit"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_sync_command_keeps_the_cache_in_the_dropoff_state_folder(tmp_path):
    """`clpipe dicom sync`: a dry run writes no cache; a run writes it in
    .clpipe-sync/; a no-op run leaves it as it was (nothing changed)."""

    from helpers import new_project

    root = tmp_path / "export"
    made = time.time()
    make_file_tree(root)
    config = new_project(tmp_path / "p", source_url=f"file://{root}")
    dropoff = config.parent / "data_DICOMs"
    time.sleep(max(0.0, made + localdir.RACY_NS / 1e9 + 0.2 - time.time()))  # the files are no longer "just changed"

    def run(dry_run: bool = False):
        return sync_command(config, *(["-n"] if dry_run else []))

    cache_file = dropoff / ".clpipe-sync" / localdir.LISTING_CACHE
    run(dry_run=True)
    assert not cache_file.exists()
    run()
    rows = cache_file.read_text().split("\n")[1:-2]  # the header line, the rows, the JSON line
    visible = [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    assert len(rows) == len([p for p in visible if p.name != "DICOMDIR"])  # a row for every file the listing read
    written = cache_file.stat()
    out = run()
    assert "0 created, 0 updated" in out
    assert (cache_file.stat().st_ino, cache_file.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


# ----------------------------------------------------------------------------- the tree's stamp


def test_a_run_that_finds_nothing_changed_reports_what_listing_would(tmp_path):
    """`clpipe dicom sync`: after a complete run, the next one finds the tree and the
    dropoff unchanged from the stamp (sync/quick.py) and does not list the tree; its
    audit, summary, sessions and lines are those of the engine's own no-op (the stamp
    removed). A change in the dropoff or the tree, or a dry run, goes the usual way."""
    import csv

    from clpipe.sync import quick

    from helpers import new_project

    root = tmp_path / "export"
    made = time.time()
    make_file_tree(root)
    config = new_project(tmp_path / "p", source_url=f"file://{root}")
    dropoff = config.parent / "data_DICOMs"
    stamp = dropoff / ".clpipe-sync" / quick.STAMP
    time.sleep(max(0.0, made + quick.RACY_NS / 1e9 + 0.2 - time.time()))  # the files are no longer "just changed"

    def run(*opts: str) -> tuple[str, Path]:
        out = sync_command(config, *opts)
        return out, Path(re.search(r"audit log: (\S+\.csv);", out)[1])

    def lines(out: str, audit: Path) -> list[str]:
        text = out.replace(audit.stem, "RUN").replace(audit.stem.rsplit("-", 1)[0], "RUN")
        return [re.sub(r"; \d+\.\d s$", "", line) for line in text.splitlines() if "nothing changed in the source folder" not in line]

    def summary(audit: Path) -> dict:
        data = json.loads(audit.with_suffix(".summary.json").read_text())
        return {k: v for k, v in data.items() if k not in ("run_id", "finished", "seconds", "audit_csv", "sessions_tsv")}

    replayed = "nothing changed in the source folder or the dropoff since the last complete sync"
    out, audit = run()
    assert replayed not in out and stamp.exists()  # the first run copied everything, then stamped the tree
    out2, audit2 = run()
    assert replayed in out2
    assert "13 series, as the last complete sync listed them" in out2
    stamp.unlink()
    out3, audit3 = run()  # the engine's own no-op, which stamps the tree again
    assert replayed not in out3 and stamp.exists()
    assert audit2.read_bytes() == audit3.read_bytes()
    assert len(list(csv.reader(audit2.open()))) == 1 + 139
    assert summary(audit2) == summary(audit3)
    assert audit2.with_suffix(".sessions.tsv").read_text() == audit3.with_suffix(".sessions.tsv").read_text()
    norm2 = [line.replace("13 series, as the last complete sync listed them", "listed 13 series") for line in lines(out2, audit2)]
    assert norm2 == lines(out3, audit3)

    # a file gone from the dropoff: listed again, and copied back
    gone = next(p for p in dropoff.rglob("*.dcm") if ".clpipe-sync" not in p.parts)
    content = gone.read_bytes()
    gone.unlink()
    out4, _ = run()  # (its series is fetched again: the engine checks whole series)
    assert replayed not in out4 and " 0 failed" in out4 and gone.read_bytes() == content
    # a dry run does not use the stamp and leaves it
    written = stamp.stat()
    out5, _ = run("-n")
    assert replayed not in out5 and stamp.stat().st_ino == written.st_ino
    assert replayed in run()[0]
    # a file of the tree touched: listed again (as the engine judges a changed time: its series fetched again)
    some = next(p for p in sorted(root.rglob("*.dcm")) if not any(part.startswith(".") for part in p.relative_to(root).parts))
    os.utime(some, ns=(some.stat().st_atime_ns, some.stat().st_mtime_ns - 10**9))
    out6, _ = run()
    assert replayed not in out6 and " updated, " in out6 and " 0 failed" in out6
    assert not stamp.exists()  # the file changed a moment ago (its change time): no stamp vouches for it yet
    time.sleep(quick.RACY_NS / 1e9 + 0.2)
    assert replayed not in run()[0] and stamp.exists()
    assert replayed in run()[0]
    # a stamp whose report this code did not write (its records intact): the folder is listed
    records = []
    with open(stamp, "rb") as handle:
        while True:
            try:
                records.append(quick._load(handle))
            except EOFError:
                break
    with open(stamp, "wb") as out:
        for record in records:
            quick._dump(("P", {"skipped": "many"}) if record[0] == "P" else record, out)
    out7, _ = run()
    assert replayed not in out7 and "0 created, 0 updated, 139 skipped, 0 failed" in out7
    assert replayed in run()[0]  # (that run wrote a good stamp)


@pytest.mark.parametrize("ending", ["complete", "failed", "stopped", "listing cut", "files adopted", "files deleted"])
def test_only_a_run_that_ended_complete_stamps_the_tree(own_tree, tmp_path, monkeypatch, ending):
    """The stamp says "a run would find every file in place": only a run that left them so
    (and changed nothing else a no-op would not) writes it."""
    from clpipe.engines.native import Stamp
    from clpipe.sync import quick

    monkeypatch.setattr(quick, "RACY_NS", 0)
    root, _ = own_tree
    source, dropoff = source_for(root), tmp_path / "dropoff"
    state = SyncState(dropoff, "run")
    state.acquire()
    stamp = Stamp(state, source.tree_root, "key")
    try:
        state.load()
        assert stamp.check(tmp_path / "z") is None  # no stamp yet; the walk is kept
        engine = Engine(source, state, Options(dropoff=dropoff, zip_tmp=tmp_path / "z", jobs=2))
        outcome = engine.run(entries(source, DicomQuery()))
        state.save()
        assert outcome.created == 139 and not outcome.failed
        if ending == "failed":
            outcome.failed, outcome.failures = 1, ["x: broken"]
        elif ending == "stopped":
            outcome.stopped = "at the time limit"
        elif ending == "listing cut":
            outcome.listing_cut = True
        elif ending == "files adopted":
            outcome.adopted = 2
        elif ending == "files deleted":
            outcome.deleted = 1
        stamp.write(outcome, engine, list(source.notes))
    finally:
        stamp.discard()
        state.release()
    assert (state.root / quick.STAMP).exists() == (ending == "complete")
    assert not [p for p in state.root.iterdir() if ".new." in p.name]
    if ending == "complete":
        payload = quick.check(str(state.root), "key", source.tree_root, str(dropoff), locked=False)
        assert payload is not None and payload["skipped"] == 139 and payload["listed"] == 13
        assert all(t["placed"] == 0 and t["in_place"] == t["entries"] for t in payload["tallies"]["tallies"])
