"""Issue 15: the files the manifest records are checked in the dropoff while the source's
listing is read (sync/engine.py's ``_Ahead``), not one by one after it."""

from __future__ import annotations

import threading

import pytest

from clpipe.sources.base import RemoteEntry
from clpipe.sync import engine as engine_module
from clpipe.sync import manifest as manifest_module
from clpipe.sync.manifest import Record, SyncState

from helpers import PlainFiles, landed_files, manifest_with, run_engine


def _project(n: int = 300) -> tuple[dict[str, bytes], dict[str, str]]:
    files = {f"c{i // 50:02d}/f{i:04d}.dcm": bytes([i % 251]) * (100 + i) for i in range(n)}
    paths = {key: f"sub-{i // 100}/acq-{i // 50}/f{i:04d}.dcm" for i, key in enumerate(files)}
    return files, paths


def _entries(paths: dict[str, str], files: dict[str, bytes]) -> list[RemoteEntry]:
    return [RemoteEntry(key, path, len(files[key]), 1.0, None, False) for key, path in paths.items()]


@pytest.fixture
def watched(monkeypatch):
    """The _Ahead of each run, and each dropoff size lookup (thread name, path)."""
    made: list = []
    looked: list[tuple[str, str]] = []

    class Recorded(engine_module._Ahead):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    lookup = engine_module._Sizes.__call__

    def counted(self, path):
        looked.append((threading.current_thread().name, path))
        return lookup(self, path)

    monkeypatch.setattr(engine_module, "_Ahead", Recorded)
    monkeypatch.setattr(engine_module._Sizes, "__call__", counted)
    monkeypatch.setattr(manifest_module, "CACHE_BLOCK", 2000)  # many blocks
    return made, looked


def _after_the_check(made: list, entries: list[RemoteEntry]):
    """A listing read whole before its first entry (as Flywheel's): the check ends first."""
    made[-1]._thread.join(10)
    yield from entries


def test_a_no_op_looks_each_recorded_file_up_once_while_the_listing_is_read(tmp_path, watched):
    """Every recorded file is looked up by the check thread, and the run's own thread looks
    only at the two it found not in place (before: at every file, after the listing); the
    file deleted and the one cut short before the run are fetched again, the others
    skipped."""
    made, looked = watched
    files, paths = _project()
    source = PlainFiles(files, True)
    dropoff = tmp_path / "dropoff"
    assert run_engine(source, dropoff, _entries(paths, files)).created == len(files)
    (dropoff / paths["c01/f0060.dcm"]).unlink()
    (dropoff / paths["c04/f0210.dcm"]).write_bytes(b"short")
    looked.clear()
    source.opened.clear()
    outcome = run_engine(source, dropoff, _after_the_check(made, _entries(paths, files)), "run2")
    assert (outcome.skipped, outcome.failed) == (len(files) - 2, 0), outcome.failures
    assert sorted(source.opened) == ["c01/f0060.dcm", "c04/f0210.dcm"]
    assert landed_files(dropoff) == {paths[key]: data for key, data in files.items()}
    assert sorted(path for thread, path in looked if thread == "clpipe-ahead") == sorted(paths.values())
    mine = {path for thread, path in looked if thread == "MainThread"}
    assert mine <= {paths["c01/f0060.dcm"], paths["c04/f0210.dcm"]}, "the run's own thread looked files up one by one"
    assert made[-1]._halt.is_set() and not made[-1]._thread.is_alive()


def test_a_block_with_many_files_missing_is_looked_at_file_by_file(tmp_path, watched, monkeypatch):
    """Beyond MAX_BAD files not in place in a block, the block is not answered for (its
    keys are not all held): the run looks at its files itself, and fetches the missing."""
    made, looked = watched
    monkeypatch.setattr(engine_module._Ahead, "MAX_BAD", 2)
    files, paths = _project()
    source = PlainFiles(files, True)
    dropoff = tmp_path / "dropoff"
    run_engine(source, dropoff, _entries(paths, files))
    gone = [key for key in files if key.startswith("c03/")][:10]
    for key in gone:
        (dropoff / paths[key]).unlink()
    looked.clear()
    source.opened.clear()
    outcome = run_engine(source, dropoff, _after_the_check(made, _entries(paths, files)), "run2")
    assert (outcome.skipped, outcome.failed) == (len(files) - len(gone), 0), outcome.failures
    assert sorted(source.opened) == sorted(gone)
    mine = [path for thread, path in looked if thread == "MainThread"]
    assert {paths[key] for key in gone} <= set(mine) and len(set(mine)) < len(files) // 2  # the blocks not answered for
    assert landed_files(dropoff) == {paths[key]: data for key, data in files.items()}


def test_a_listing_that_streams_stops_the_check_at_its_first_entry(tmp_path, watched):
    """A source whose entries come at once: the check is stopped at the first entry
    (before the run changes anything), whatever it reached, and the run is the same."""
    made, _ = watched
    files, paths = _project()
    source = PlainFiles(files, True)
    dropoff = tmp_path / "dropoff"
    run_engine(source, dropoff, _entries(paths, files))
    (dropoff / paths["c05/f0299.dcm"]).unlink()
    source.opened.clear()
    outcome = run_engine(source, dropoff, _entries(paths, files), "run2")
    assert (outcome.skipped, outcome.failed) == (len(files) - 1, 0) and source.opened == ["c05/f0299.dcm"]
    assert made[-1]._halt.is_set() and not made[-1]._thread.is_alive()


def test_plain_files_are_the_records_unchanged_file_answers(tmp_path, monkeypatch):
    """The check reads from the manifest only records of one file with a plain path (the
    no-op path's), with their recorded path and size, block by block; a key this run
    recorded again is not answered from its old block."""
    monkeypatch.setattr(manifest_module, "CACHE_BLOCK", 300)
    records = [Record(f"c/f{i:03d}.dcm", [i, 0.5, ""], [[f"s/f{i:03d}.dcm", i, "ab"]]) for i in range(40)]
    records += [
        Record('c/"q".dcm', [1, 0.5, ""], [["s/q.dcm", 1, ""]]),  # a key with escapes: answered too
        Record("c/quoted-path.dcm", [1, 0.5, ""], [['s/"q2".dcm', 1, ""]]),
        Record("c/two.zip", [2, 0.5, ""], [["s/two/a.dcm", 1, ""], ["s/two/b.dcm", 1, ""]]),
        Record("c/none.zip", [0, 0.5, ""], []),
    ]
    manifest_with(tmp_path, records)
    state = SyncState(tmp_path, "r")
    state.acquire()
    state.load()
    blocks = list(state.plain_files())
    assert len(blocks) > 5 and [number for number, _ in blocks] == list(range(len(blocks)))
    found = [item for _, files in blocks for item in files]
    assert sorted(found) == sorted([(f"c/f{i:03d}.dcm", f"s/f{i:03d}.dcm", i) for i in range(40)] + [('c/"q".dcm', "s/q.dcm", 1)])
    assert all(state.block_of(key) == number for number, files in blocks for key, _, _ in files)
    state.record(Record("c/f007.dcm", [8, 0.5, ""], [["s/f007.dcm", 8, ""]]))
    assert state.block_of("c/f007.dcm") is None and state.block_of("c/f008.dcm") is not None
    state.release()


def test_a_source_that_names_entries_as_it_lists_gets_no_check(tmp_path, watched):
    """A source whose entries come as it lists (no unique paths: the folder, DIMSE and
    DICOMweb sources) gains nothing from the check: none is started, and the run looks at
    its files itself, as before."""
    made, looked = watched
    files, paths = _project(60)
    source = PlainFiles(files, False)
    dropoff = tmp_path / "dropoff"
    run_engine(source, dropoff, _entries(paths, files))
    looked.clear()
    outcome = run_engine(source, dropoff, _entries(paths, files), "run2")
    assert outcome.skipped == len(files) and made == []
    assert sorted(path for thread, path in looked if thread == "MainThread") == sorted(paths.values())
