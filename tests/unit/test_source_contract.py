"""The one source contract (sources/base.py), the one error tree (errors.py) and the one
retry policy every transfer goes through (sync/transfer.py)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import clpipe.sync.engine as engine_module
from clpipe import errors
from clpipe.sources.base import (
    HasChecksum,
    HasFiles,
    HasInstances,
    HasMaxJobs,
    HasMembers,
    HasNotes,
    HasProblems,
    RemoteEntry,
    Source,
)
from clpipe.sources.dicom import SourceSettings, parse_source_url
from clpipe.sources.dicomweb import DicomWebSource
from clpipe.sources.dimse import DimseSource
from clpipe.sources.flywheel import Credentials, FlywheelSource
from clpipe.sources.localdir import FolderSource
from clpipe.sync.engine import Engine, Options
from clpipe.sync.manifest import SyncState
from clpipe.sync.transfer import RetryPolicy, Stopped


def test_each_source_has_the_abilities_the_engine_asks_for(tmp_path):
    flywheel = FlywheelSource(Credentials("https://127.0.0.1:9/api", "secret"))
    folder = FolderSource(parse_source_url(f"file://{tmp_path}"), SourceSettings(jobs=3))
    try:
        for source in (flywheel, folder):
            assert isinstance(source, Source)
        # Flywheel: files (and zips) to open, their members, hashes looked up
        assert [isinstance(flywheel, p) for p in (HasFiles, HasMembers, HasChecksum, HasInstances, HasMaxJobs, HasProblems)] == [
            True,
            True,
            True,
            False,
            False,
            False,
        ]
        # a folder: series, how many copies are worth running at once, what it could not read, notes
        assert [isinstance(folder, p) for p in (HasInstances, HasMaxJobs, HasProblems, HasNotes, HasFiles, HasChecksum)] == [
            True,
            True,
            True,
            True,
            False,
            False,
        ]
        assert folder.max_jobs == 3 and list(folder.problems) == []
    finally:
        flywheel.close()
        folder.close()
    for cls in (DicomWebSource, DimseSource):  # servers of series
        assert issubclass(cls, HasInstances) and issubclass(cls, Source)
        assert not issubclass(cls, HasFiles) and not issubclass(cls, HasChecksum)


def test_the_transfer_errors_are_part_of_the_one_error_tree():
    assert issubclass(errors.VerifyError, errors.TransientError)
    for cls in (errors.TransientError, errors.PermanentError):
        assert issubclass(cls, errors.TransferError) and issubclass(cls, errors.ClpipeError)
        assert cls("x").exit_code == 1
    assert errors.ConfigError("x").exit_code == 2
    assert errors.TransientError("busy", retry_after=2.0).retry_after == 2.0
    # what sources raise is what the engine catches, whichever module a caller names
    assert engine_module.TransientError is errors.TransientError
    assert engine_module.PermanentError is errors.PermanentError
    assert engine_module.VerifyError is errors.VerifyError


def test_retry_policy_waits_what_the_server_asks_else_backs_off_with_jitter():
    policy = RetryPolicy(retries=5, backoff=0.5, backoff_cap=30.0)
    assert policy.delay(1, errors.TransientError("429", retry_after=7.0)) == 7.0
    for attempt, base in ((1, 0.5), (2, 1.0), (3, 2.0), (10, 30.0)):
        delays = [policy.delay(attempt, errors.TransientError("503")) for _ in range(200)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > 0.05 * base  # jittered: parallel transfers do not come back at once


def test_retry_policy_retries_transient_faults_then_gives_up(capsys):
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise errors.TransientError("HTTP 503")
        return "done"

    stop = threading.Event()
    assert RetryPolicy(retries=2, backoff=0.0).run(flaky, lambda: "a/b.dcm", stop) == "done"
    assert len(calls) == 3
    out = capsys.readouterr().out
    assert "[retry] a/b.dcm: HTTP 503; attempt 2 in 0.0 s" in out and "attempt 3 in" in out

    calls.clear()

    def broken() -> str:
        calls.append(1)
        raise errors.TransientError("timed out")

    with pytest.raises(errors.PermanentError, match=r"^timed out \(gave up after 3 attempts\)$"):
        RetryPolicy(retries=2, backoff=0.0).run(broken, lambda: "x", stop)
    assert len(calls) == 3

    calls.clear()

    def gone() -> str:
        calls.append(1)
        raise errors.PermanentError("HTTP 404")

    with pytest.raises(errors.PermanentError, match="HTTP 404"):
        RetryPolicy(retries=5, backoff=0.0).run(gone, lambda: "x", stop)
    assert len(calls) == 1  # never retried


def test_retry_policy_stops_with_the_run():
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):  # nothing starts once the run stops
        RetryPolicy().run(lambda: pytest.fail("started after the stop"), lambda: "x", stop)

    stop.clear()

    def busy() -> None:
        raise errors.TransientError("429", retry_after=60.0)

    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Stopped):  # a wait of 60 s ends when the run stops
        RetryPolicy().run(busy, lambda: "x", stop)
    assert time.monotonic() - started < 10


class SeriesOnly:
    """A source of series asked for a plain file (no source lists such an entry: the
    engine says so in one line instead of an AttributeError)."""

    @contextmanager
    def instances(self, entry):
        yield iter([])

    def close(self) -> None:
        pass


def test_a_source_without_an_ability_fails_the_entry_in_one_line(tmp_path: Path):
    dropoff = tmp_path / "dropoff"
    state = SyncState(dropoff, "run1")
    state.acquire()
    try:
        state.load()
        entry = RemoteEntry(key="k", path="a.txt", size=1, modified=0.0, checksum=None, unpack=False)
        outcome = Engine(SeriesOnly(), state, Options(dropoff=dropoff, zip_tmp=tmp_path / "z")).run([entry])
    finally:
        state.release()
    assert outcome.failed == 1 and outcome.created == 0
    assert outcome.failures == ["a.txt: SeriesOnly has no files to open (it is not a HasFiles source)"]
    assert not (dropoff / "a.txt").exists()
