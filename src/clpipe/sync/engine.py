"""The native sync engine: plan, transfer, verify, record. It knows nothing of Flywheel.

A *source* lists :class:`RemoteEntry` items and opens one as a stream of bytes (or, for a
DICOM series, yields its instances; ``sources/base.py``); the engine
makes the dropoff match: it skips what the manifest (or an intact earlier download, e.g.
by ``fw sync``) already has, downloads the rest in parallel into a temporary file on the
dropoff's own filesystem, checks size, the server's checksum (from the listing or, just
before the download, from the source's ``checksum(entry)``; a run says how many files had
none: "content not verified: N files") and zip CRCs, renames each file into place, and
journals it. Transient faults (429, 5xx, timeouts, resets, truncated or corrupted bodies,
damaged zip headers) are retried with backoff; one failed file is reported and makes the
run fail, never hides behind success.

A DICOM series (``entry.series``) comes from the source as instances, bytes or a local
file's path: each is staged in the dropoff's temporary folder (a local file copied inside
the kernel, as ``cp`` does), the series' instance count is checked, then each is renamed to
``<SOPInstanceUID>.dcm`` in the series' folder.

The engine's parts: the entry and the source protocols in ``sources/base.py``; the retry
policy in ``transfer.py``; staging, copying and whole-file writes in ``fileio.py``; the
progress bar in ``progress.py``; the outcome and its reports in ``reports.py``; the
manifest and the lock in ``manifest.py``; local names in ``layout.py``. This module plans
a run against the manifest and runs the transfers.
"""

from __future__ import annotations

import io
import itertools
import os
import posixpath
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from ..console import human_bytes
from ..errors import DiskFull, PermanentError, TransientError, VerifyError, is_disk_full
from ..layout import Claims, SpilledClaims, all_portable, flatten_members, inside, portable_name
from ..sources.base import (
    HasBulk,
    HasChecksum,
    HasFiles,
    HasInstances,
    HasManyInstances,
    HasMaxJobs,
    HasMembers,
    HasPrefetch,
    HasProblems,
    HasUniquePaths,
    RemoteEntry,
    Source,
)
from ..spill import SortedSpill
from .fileio import copy_file, unpack_zip, write_new
from .manifest import Record, SyncState, is_plain, signature_text
from .progress import Progress
from .reports import FileResult, Outcome
from .sessions import Tallies
from .stopping import StopRequest
from .transfer import RetryPolicy, Stopped, hasher

# the names tests import from here since before the engine was split: still here
__all__ = [
    "IN_MEMORY_ZIP",
    "Engine",
    "FileResult",
    "Options",
    "Outcome",
    "PermanentError",
    "Progress",
    "RemoteEntry",
    "Source",
    "TransientError",
    "VerifyError",
    "copy_file",
    "write_new",
]

IN_MEMORY_ZIP = 64 << 20  # zips up to this size are unpacked from memory, larger ones from TempDirectory


@dataclass
class Options:
    dropoff: Path
    zip_tmp: Path  # where zips are downloaded before unpacking (TempDirectory)
    jobs: int = 4
    dry_run: bool = False
    delete: bool = False
    max_delete: int = 1000
    retries: int = 5
    backoff: float = 0.5
    backoff_cap: float = 30.0
    interactive: bool = False
    stop: StopRequest | None = None  # how the run is told to stop before its end (sync/stopping.py)


class Engine:
    def __init__(self, source: Source, state: SyncState, options: Options):
        self.source, self.state, self.options = source, state, options
        # what the source can do beyond listing (sources/base.py), found once
        self._files = source if isinstance(source, HasFiles) else None
        self._instances = source if isinstance(source, HasInstances) else None
        self._members = source if isinstance(source, HasMembers) else None
        self._checksum = source if isinstance(source, HasChecksum) else None
        self._retry = RetryPolicy(options.retries, options.backoff, options.backoff_cap)
        self._lock = threading.Lock()
        self._parts = itertools.count()  # this run's staged instances: .clpipe-sync/tmp/series-<n>.part
        #: (instances, bytes) written by this run's series retrievals, finished or not: what
        #: a series' instance weighs, for the estimate of a full disk's message
        self._instances_written = [0, 0]
        self.jobs = 0  # transfers the last run ran at once (0: it had none to do)
        self._request = options.stop or StopRequest()  # a stop asked for (sync/stopping.py); a full disk sets it too
        self._stop = self._request.stop  # set: no transfer starts after it
        self._abort = self._request.abort  # set: the transfers under way end (at their next chunk) or are left behind
        self._unverified = 0  # files placed whose content the server gave no hash to check against
        self._claims: Claims | SpilledClaims = Claims()  # the local paths of this run's entries (set anew by run)
        self._vacating: set[str] = set()
        self._renamed = {False: 0, True: 0}
        self._staged: dict[str, int] = {}  # entry key -> its staged part's code (sync/bulk.py): fetched in bulk
        self._part_of: Callable[[int], tuple[str, bool]] | None = None  # a code -> (part, hash checked)
        self._fast_fs = False  # the staging found the dropoff's file system fast: staged files are placed in this thread
        self.sessions = Tallies()  # what the last run found of each scan session (sync/sessions.py)
        self._sizes = _Sizes(str(options.dropoff) + "/")  # (each run opens its own: run)

    # -- planning ----------------------------------------------------------------------

    def _present(self, record: Record) -> bool:
        sizes = self._sizes  # (each folder opened once: a series' thousands of files are in one)
        return all(sizes(path) == size for path, size, *_ in record.files)

    def _adopt(self, entry: RemoteEntry) -> Record | None:
        """A file or unpacked series already in the dropoff (written by ``fw sync`` or by a
        run killed before it journalled): adopt it when it is intact, as ``fw`` judges
        (same size, not older than the remote file)."""
        dropoff = self.options.dropoff
        if entry.series:  # its files are named by SOPInstanceUID: only a retrieval knows them
            return None
        if not entry.unpack:
            if entry.path in self._vacating:  # another entry's earlier file, which it is fetching again
                return None
            try:
                st = os.stat(dropoff / entry.path)
            except OSError:
                return None
            if st.st_size == entry.size and st.st_mtime >= entry.modified:
                return Record(entry.key, entry.signature, [[entry.path, entry.size, ""]])
            return None
        folder = dropoff / entry.path
        if not folder.is_dir():
            return None
        members = self._members.members(entry) if self._members is not None else None
        if not members:
            return None
        names = flatten_members([name for name, size in members])
        files = []
        for name, size in members:
            rel = f"{entry.path}/{names[name]}"
            if rel in self._vacating:
                return None
            try:
                st = os.stat(dropoff / rel)
            except OSError:
                return None
            if st.st_size != size or st.st_mtime < entry.modified:
                return None
            files.append([rel, size, ""])
        return Record(entry.key, entry.signature, files)

    def _claim(self, entry: RemoteEntry, outcome: Outcome) -> RemoteEntry | None:
        """The entry with a path no other entry of this run has (:class:`Claims`); counted
        when its local name is not its remote one. None (a failure) when no path is free."""
        try:
            path = self._claims.claim(entry.path, entry.key, entry.unpack or entry.series)
        except ValueError as exc:
            self._unclaimed(entry, str(exc), outcome)
            return None
        if path != entry.path:  # the source gave two entries one path: told apart here
            entry = replace(entry, path=path, renamed=True)
        if entry.renamed:
            self._renamed[entry.series] += 1
        return entry

    def _in_place(self, entry: RemoteEntry, record: Record, outcome: Outcome) -> None:
        """``entry`` is in place as ``record`` says: counted unchanged."""
        outcome.skipped += len(record.files)
        for path, *_ in record.files:
            outcome.unchanged.append(path)
        self.sessions.in_place(entry, record.files)

    def _unclaimed(self, entry: RemoteEntry, reason: str, outcome: Outcome) -> None:
        outcome.failed += 1
        outcome.failures.append(f"{entry.describe()}: {reason}")
        outcome.files.append(FileResult(entry.path, "failed", False, "", reason))
        self.sessions.failed(entry, reason)

    def _check_claims(
        self,
        todo: list[tuple[RemoteEntry, bool]],
        fresh: list[RemoteEntry],
        moving: list[tuple[RemoteEntry, Record, list]],
        outcome: Outcome,
    ) -> tuple[list[tuple[RemoteEntry, bool]], list[RemoteEntry], list[tuple[RemoteEntry, Record, list]]]:
        """After a listing whose paths were only kept on disk (:class:`SpilledClaims`): the
        guard for what the run will fetch or move, each checked against every path of the
        run as :meth:`_claim` does, and told apart if the source broke its promise (such an
        entry is fetched anew, never moved onto another's path)."""
        claims = self._claims
        if not isinstance(claims, SpilledClaims) or not (todo or fresh or moving):
            return todo, fresh, moving
        pending = [e for e, _ in todo] + fresh + [e for e, _, _ in moving]
        finals = claims.check((e.path, e.key, e.unpack or e.series) for e in pending)
        placed = {e.key: path for path, e in zip(finals, pending, strict=True) if path != e.path}
        if not placed:
            return todo, fresh, moving

        def told_apart(entry: RemoteEntry) -> RemoteEntry | None:
            path = placed[entry.key]
            if isinstance(path, ValueError):
                self._unclaimed(entry, str(path), outcome)
                return None
            self._renamed[entry.series] += not entry.renamed
            return replace(entry, path=path, renamed=True)

        kept: list[tuple[RemoteEntry, bool]] = []
        for entry, existing in todo:
            if entry.key in placed:
                moved = told_apart(entry)
                if moved is not None:
                    kept.append((moved, os.path.lexists(os.path.join(self.options.dropoff, moved.path))))
            else:
                kept.append((entry, existing))
        new = [e for e in fresh if e.key not in placed]
        new += [m for e in fresh if e.key in placed and (m := told_apart(e)) is not None]
        waiting = []
        for entry, record, moves in moving:
            if entry.key not in placed:
                waiting.append((entry, record, moves))
            elif (moved := told_apart(entry)) is not None:
                again = self._moves(record, moved)  # (told apart as in the run that fetched it: in place)
                if again == [] and self._present(record):
                    self._in_place(moved, record, outcome)
                elif again:
                    waiting.append((moved, record, again))
                else:
                    self._vacating.update(f[0] for f in record.files)
                    kept.append((moved, os.path.lexists(os.path.join(self.options.dropoff, moved.path))))
        return kept, new, waiting

    @staticmethod
    def _moves(record: Record, entry: RemoteEntry) -> list[tuple[str, str, int]] | None:
        """(recorded path, path now, size) of each recorded file of ``entry`` that is not
        where the entry's current name puts it ([]: all are; None: the record cannot be
        mapped). A file unpacked into a folder (a zip's member, a series' instance) keeps
        its recorded name, made portable and distinct."""
        files = record.files
        if not (entry.unpack or entry.series):
            if len(files) != 1:
                return None
            return [] if files[0][0] == entry.path else [(files[0][0], entry.path, files[0][1])]
        prefix = entry.path + "/"
        if all(f[0].startswith(prefix) for f in files) and all_portable([f[0][len(prefix) :] for f in files]):
            return []
        names = flatten_members([f[0] for f in files])
        return [(f[0], prefix + names[f[0]], f[1]) for f in files if f[0] != prefix + names[f[0]]]

    def _relocate(self, entry: RemoteEntry, record: Record, moves: list[tuple[str, str, int]], outcome: Outcome) -> bool | None:
        """Rename an entry's files, synced under earlier names, to its current ones, and
        record them there: True when done (or, in a dry run, possible); None when a new
        place holds another file (for now); False when a recorded file is missing (then
        it is fetched again). A file found at its new place already (a run killed while
        renaming) counts as renamed."""
        root = str(self.options.dropoff) + "/"

        def size(path: str) -> int:
            try:
                return os.stat(root + path).st_size
            except OSError:
                return -1

        moving = {old for old, _, _ in moves}
        if any(size(path) != length for path, length, *_ in record.files if path not in moving):
            return False
        todo = []
        for old, new, length in moves:
            if size(old) == length:
                if os.path.lexists(root + new):
                    return None
                todo.append((old, new))
            elif size(new) != length:
                return False
        if not self.options.dry_run:
            self._sizes.close()  # (folders it had open may move)
            try:
                for old, new in todo:
                    os.makedirs(os.path.dirname(root + new), exist_ok=True)
                    os.replace(root + old, root + new)
            except OSError:
                return False  # fetched again; what was renamed is found at its new place next time
            for folder in sorted({posixpath.dirname(old) for old, _ in todo}, key=len, reverse=True):
                while folder:  # the old folders, now empty, go (never one with anything in it)
                    try:
                        os.rmdir(root + folder)
                    except OSError:
                        break
                    folder = posixpath.dirname(folder)
            new_path = {old: new for old, new, _ in moves}
            self.state.record(Record(entry.key, entry.signature, [[new_path.get(f[0], f[0]), *f[1:]] for f in record.files]))
            self.sessions.in_place(entry, record.files, placed=len(moves))
        outcome.skipped += len(record.files)
        outcome.moved += len(moves)
        action = "would be renamed in place from " if self.options.dry_run else "renamed in place from "
        outcome.files += [FileResult(new, "skipped", True, action + old) for old, new, _ in moves]
        return True

    def names_note(self) -> str:
        """What the run says of the entries it named apart from their remote names ("": none);
        a run that finds every file in place says it too (sync/quick.py replays it)."""
        files, series = self._renamed[False], self._renamed[True]
        if not (files or series):
            return ""
        what = " and ".join(f"{n} {unit}" for n, unit in ((files, "files"), (series, "series folders")) if n)
        return f"{what} renamed: their names collided with another's or were not portable (see 'Local names' in docs/engines.md)"

    def _report_names(self, outcome: Outcome) -> None:
        outcome.renamed = self._renamed[False] + self._renamed[True]
        note = self.names_note()
        if note:
            outcome.notes.append(note)
        if outcome.moved:
            outcome.notes.append(
                f"{outcome.moved} files synced under earlier names "
                f"{'would be' if self.options.dry_run else 'were'} renamed in place (nothing downloaded)"
            )

    # -- transfer ----------------------------------------------------------------------

    def _download(self, entry: RemoteEntry, target: Path | io.BytesIO, progress: Progress) -> str | None:
        """Stream the remote file into ``target`` (a path or memory), checking size and the
        server's checksum: the listing's, else the one the source looks up (its optional
        ``checksum(entry)``, asked just before the download, so only for files with work to
        do; a failed look-up is retried like any other transient fault). Returns the
        checksum the bytes matched, None when the server gave none (size checked only)."""
        expected = entry.checksum
        if expected is None and self._checksum is not None:
            expected = self._checksum.checksum(entry)
        digest = hasher(expected)
        if self._files is None:
            raise PermanentError(f"{type(self.source).__name__} has no files to open (it is not a HasFiles source)")
        received = 0
        try:
            with open(target, "wb") if isinstance(target, Path) else nullcontext(target) as out, self._files.open(entry) as chunks:
                for chunk in chunks:
                    if self._abort.is_set():  # the run is stopping: this transfer is not finished
                        raise Stopped()
                    out.write(chunk)
                    received += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    progress.advance(len(chunk))
        except BaseException:
            progress.advance(-received)
            raise
        if received != entry.size:
            progress.advance(-received)
            raise VerifyError(f"received {received} bytes, expected {entry.size}")
        if digest is None:
            return None
        if expected is not None and digest.hexdigest() != expected.split(":", 1)[1]:
            progress.advance(-received)
            raise VerifyError("checksum mismatch")
        return expected

    def _fetch_series(self, entry: RemoteEntry, progress: Progress) -> list[list]:
        """Retrieve one DICOM series in this thread: each instance staged as it arrives,
        then the series placed (:class:`_Series`)."""
        if self._instances is None:
            raise PermanentError(f"{type(self.source).__name__} has no series to retrieve (it is not a HasInstances source)")
        series = _Series(self, entry)
        try:
            with self._instances.instances(entry) as items:
                for uid, payload in items:
                    if self._abort.is_set():  # the run is stopping: this series is not finished
                        raise Stopped()
                    series.add(uid, payload, progress)
            return series.place()
        except BaseException:
            series.undo(progress)
            raise
        finally:
            series.close()

    def _one_thread(
        self, todo: list[tuple[RemoteEntry, bool]], progress: Progress, jobs: int, again: list[tuple[RemoteEntry, bool]]
    ) -> Iterator[tuple[Future | None, tuple[RemoteEntry, bool]]]:
        """The series of ``todo`` retrieved from this thread, ``jobs`` at once, by a source
        that can (HasManyInstances: no GIL handed between threads at each instance), staged
        and placed as :meth:`_fetch_series` does; yields ``(done future, item)`` as each
        ends, as :func:`_bounded` does. A series that fails with a transient fault is put
        in ``again`` (tried again one at a time with the retry policy, after these). A stop
        starts no more series and lets those under way end; an abort (or a full disk)
        abandons those under way: their staged instances are removed and they are yielded
        with None, as are those never started."""
        assert isinstance(self.source, HasManyInstances)
        started: dict[str, tuple[RemoteEntry, bool]] = {}
        staging: dict[str, _Series] = {}
        broken: set[str] = set()  # failed writing an instance (reported at once): the rest of it is dropped
        waiting = _drained(todo)

        def entries() -> Iterator[RemoteEntry]:
            while not self._stop.is_set():  # (asked before one is taken: the rest are yielded below)
                item = next(waiting, None)
                if item is None:
                    return
                started[item[0].key] = item
                yield item[0]

        events = self.source.instances_many(entries(), jobs)
        try:
            for entry, uid, payload in events:
                if self._abort.is_set():
                    break
                if entry is None:  # nothing arrived for a while
                    continue
                key = entry.key
                if key in broken:
                    if not uid:  # its end
                        broken.discard(key)
                    continue
                if uid:  # an instance
                    series = staging.get(key)
                    if series is None:
                        series = staging[key] = _Series(self, entry)
                    try:
                        series.add(uid, payload, progress)  # type: ignore[arg-type]
                        continue
                    except OSError as exc:  # (a full disk: the run stops)
                        broken.add(key)
                        del staging[key]
                        series.undo(progress)
                        series.close()
                        failed: Future = Future()
                        failed.set_exception(exc)
                        yield failed, started.pop(key)
                        continue
                item = started.pop(key)  # the series ended
                series = staging.pop(key, None) or _Series(self, entry)
                done: Future = Future()
                stopping = False  # failed transiently while the run stops: not tried again
                try:
                    if isinstance(payload, BaseException):
                        raise payload
                    done.set_result(series.place())
                except TransientError as exc:
                    series.undo(progress)
                    stopping = self._stop.is_set()
                    if not stopping:
                        print(f"[retry] {entry.describe()}: {exc}; tried again after the series under way", flush=True)
                        again.append(item)
                        continue
                except Exception as exc:  # noqa: BLE001 (as a pool's future keeps it: the run reports it)
                    series.undo(progress)
                    done.set_exception(exc)
                finally:
                    series.close()
                yield (None if stopping else done), item
        finally:
            events.close()  # the series under way abandoned (their associations aborted)
            for series in staging.values():
                series.undo(progress)
                series.close()
        for item in started.values():  # cut short: not synced
            yield None, item
        for item in waiting:  # never started: the run stopped first
            yield None, item

    def _fetch(self, entry: RemoteEntry, progress: Progress) -> list[list]:
        """Download (and unpack) one entry into place; returns the manifest file list."""
        if entry.series:
            return self._fetch_series(entry, progress)
        dropoff, tmp = self.options.dropoff, self.state.tmp
        if not entry.unpack:
            code = self._staged.pop(entry.key, None)  # already here, checked, from a bulk tar
            staged = self._part_of(code) if code is not None and self._part_of is not None else None
            part = Path(staged[0]) if staged else tmp / f"{uuid.uuid4().hex}.part"
            try:
                verified = ("bulk" if staged[1] else None) if staged else self._download(entry, part, progress)
                _place(part, inside(dropoff, entry.path))
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            if verified is None:  # (an unpacked zip's members are checked by their CRCs)
                with self._lock:
                    self._unverified += 1
            return [[entry.path, entry.size, ""]]
        if entry.size <= IN_MEMORY_ZIP:
            archive: Path | io.BytesIO = io.BytesIO()
        else:
            self.options.zip_tmp.mkdir(parents=True, exist_ok=True)
            archive = self.options.zip_tmp / f"{uuid.uuid4().hex}.zip"
        try:
            self._download(entry, archive, progress)
            return unpack_zip(archive, entry.path, dropoff, tmp)
        finally:
            if isinstance(archive, Path):
                archive.unlink(missing_ok=True)

    def _with_retries(self, entry: RemoteEntry, progress: Progress) -> list[list]:
        """:meth:`_fetch`, tried again after each transient fault (sync/transfer.py). A file
        already staged from a bulk tar is placed even when the run is stopping (a rename:
        what arrived is kept), unless transfers are being abandoned."""
        if self._placeable(entry):
            return self._fetch(entry, progress)
        return self._retry.run(lambda: self._fetch(entry, progress), entry.describe, self._stop)

    def _inline(self, entry: RemoteEntry) -> bool:
        """Placed in the run's own thread, not the pool's: a staged file (one rename) when
        the staging found the file system fast (sync/bulk.py's ``_Turn``). Renames by
        several threads at once cost more in GIL hand-offs than they take there; on a slow
        (network) file system they are better side by side."""
        return self._fast_fs and entry.key in self._staged

    def _placeable(self, entry: RemoteEntry) -> bool:
        """Worth starting even when the run is stopping: staged already, a rename to do."""
        return entry.key in self._staged and not self._abort.is_set()

    # -- the run -------------------------------------------------------------------------

    def run(self, entries: Iterable[RemoteEntry]) -> Outcome:
        """Sync every entry. ``entries`` may be a generator: each is checked against the
        manifest as it arrives and dropped at once when it is already in place, so a no-op
        re-sync of 100,000 files never holds 100,000 entries."""
        started = time.monotonic()
        spill = self.options.zip_tmp
        outcome = Outcome(unchanged=SortedSpill(spill), created_paths=SortedSpill(spill), updated_paths=SortedSpill(spill))
        state = self.state
        sizes = self._sizes = _Sizes(str(self.options.dropoff) + "/")
        todo: list[tuple[RemoteEntry, bool]] = []
        listed: set[str] | None = set() if self.options.delete else None
        self.listed = self.listed_bytes = 0
        # no two entries of the run on one path (the sources see to it: this is the last guard)
        self._claims = (
            SpilledClaims(self.options.zip_tmp) if isinstance(self.source, HasUniquePaths) and self.source.unique_paths else Claims()
        )
        held = self._claims.hold if isinstance(self._claims, SpilledClaims) else None
        # the recorded files checked while the listing is read (stopped at its first entry):
        # for a source that reads its whole listing first (its paths unique: named from it);
        # nothing in the dropoff changes in this loop then (files to rename wait: blocked)
        ahead = _Ahead(state, str(self.options.dropoff) + "/") if held is not None else None
        checking = ahead  # until the first entry
        self._renamed = {False: 0, True: 0}  # entries renamed: files, series
        self._vacating = set()  # recorded files of entries fetched again: never adopted by another
        self.sessions = sessions = Tallies()
        fresh: list[RemoteEntry] = []  # not in the manifest
        blocked: list[tuple[RemoteEntry, Record, list]] = []
        try:
            for entry in entries:
                if self._abort.is_set():  # told to stop, its grace over, before the listing ended
                    outcome.listing_cut = True
                    break
                if checking is not None:
                    checking.stop()
                    checking = None
                self.listed += 1
                self.listed_bytes += entry.size
                if listed is not None:
                    listed.add(entry.key)
                signature = entry.signature
                sessions.listed(entry, signature)
                if held is not None:  # claimed once in place (kept on disk), or after the listing (_check_claims)
                    if entry.renamed:
                        self._renamed[entry.series] += 1
                else:
                    claimed = self._claim(entry, outcome)
                    if claimed is None:
                        continue
                    entry = claimed
                # the no-op re-sync's path (a million times): one file, as recorded, in place
                same = None
                if not (entry.unpack or entry.series) and is_plain(entry.path):
                    same = state.unchanged_file(entry.key, signature_text(signature), entry.path, entry.size)
                    known = ahead.in_place(entry.key) if same and ahead is not None else None
                    if same and (sizes(entry.path) == entry.size if known is None else known):
                        if held is not None:
                            held(entry.path)
                        outcome.skipped += 1
                        outcome.unchanged.append(entry.path)
                        sessions.in_place(entry, ((entry.path, entry.size),))
                        continue
                record = state.get(entry.key) if same is not False else None
                if record is None:  # adopted or fetched: decided once every recorded file is where it belongs
                    fresh.append(entry)
                    continue
                if record.signature == entry.signature:
                    moves = self._moves(record, entry)
                    if moves == [] and self._present(record):
                        if held is not None:
                            held(entry.path)
                        self._in_place(entry, record, outcome)
                        continue
                    if moves and isinstance(self._claims, SpilledClaims):  # moved once the guard is built (below)
                        blocked.append((entry, record, moves))
                        continue
                    if moves:  # synced under an earlier name: renamed in place, not fetched again
                        done = self._relocate(entry, record, moves, outcome)
                        if done is None:  # its new place is taken, for now: tried again below
                            blocked.append((entry, record, moves))
                        if done is not False:
                            continue
                self._vacating.update(f[0] for f in record.files)
                todo.append((entry, True))
        finally:
            if ahead is not None:
                ahead.stop()
            sizes.close()
        todo, fresh, blocked = self._check_claims(todo, fresh, blocked, outcome)
        sizes.close()
        for _ in range(len(blocked) + 1):  # a place another entry left meanwhile (bounded: one more each time)
            waiting, blocked = blocked, []
            for entry, record, moves in waiting:
                done = self._relocate(entry, record, moves, outcome)
                if done is None:
                    blocked.append((entry, record, moves))
                elif done is False:
                    self._vacating.update(f[0] for f in record.files)
                    todo.append((entry, True))
            if len(blocked) == len(waiting):
                break
        for entry, record, _ in blocked:  # still taken (by a file no entry claims): fetched again
            self._vacating.update(f[0] for f in record.files)
            todo.append((entry, True))
        for entry in fresh:
            adopted = self._adopt(entry)
            if adopted is not None:
                if not self.options.dry_run:
                    state.record(adopted)
                    sessions.in_place(entry, adopted.files)
                outcome.skipped += len(adopted.files)
                outcome.adopted += len(adopted.files)
                outcome.files += [FileResult(f[0], "skipped", True, "adopted: already intact in the dropoff") for f in adopted.files]
                continue
            todo.append((entry, os.path.lexists(os.path.join(self.options.dropoff, entry.path))))
        del fresh
        self._report_names(outcome)

        if self.options.dry_run:
            for entry, existing in todo:
                outcome.files.append(
                    FileResult(
                        entry.path + ("/" if entry.unpack else ""),
                        "would-transfer",
                        existing,
                        "Would update" if existing else "Would create",
                    )
                )
            size = human_bytes(sum(e.size for e, _ in todo))
            outcome.notes.append(f"dry run: {len(todo)} remote files would be transferred ({size}); nothing was written")
            outcome.seconds = time.monotonic() - started
            return outcome

        progress = Progress(len(todo), sum(e.size for e, _ in todo), self.options.interactive)
        # a source may know that fewer are better (a local folder: no more than the CPUs);
        # asked after the listing, which is when it knows
        wanted = self.source.max_jobs if isinstance(self.source, HasMaxJobs) else None
        jobs = max(1, min(self.options.jobs, wanted or self.options.jobs))
        self.jobs = jobs if todo else 0
        # A full disk (or quota) stops the run: no transfer starts after it (the next 1,000
        # would fail the same way), those under way end, and what finished is journalled.
        full: OSError | None = None
        unsynced: list[RemoteEntry] = []
        try:
            self._bulk(todo, progress, jobs, outcome)
            if self._staged:  # what a tar brought first: placed even if a stop came while the tars streamed
                todo.sort(key=lambda item: item[0].key not in self._staged)
            with _closing(ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sync"), self._request) as pool:
                try:
                    for future, (entry, existing) in self._transfers(pool, todo, progress, jobs):
                        try:
                            if future is None or future is ABANDONED:  # never started, or left behind: the run stopped first
                                self._request.abandoned += future is ABANDONED
                                raise Stopped()
                            files = future.result()
                        except Exception as exc:  # noqa: BLE001 (one file's failure is reported, never fatal to the others)
                            if not isinstance(exc, Stopped) and not is_disk_full(exc):
                                self._failed(outcome, entry, existing, exc, progress)
                                continue
                            if full is None and is_disk_full(exc):
                                full = exc
                                self._halt()
                            unsynced.append(entry)
                            outcome.files.append(FileResult(entry.path, "failed", existing, "", self._not_synced(full)))
                            progress.advance(0, 1)
                            continue
                        old = state.get(entry.key)
                        keep = {f[0] for f in files}
                        dropped = [f for f in old.files if f[0] not in keep and not self._claims.taken(f[0])] if old is not None else []
                        recorded = files
                        if dropped and self._source_problems():
                            # the source could not read everything, so "no longer there" may be
                            # "could not be read": the old files stay, and stay recorded
                            recorded, dropped = [*files, *dropped], []
                        try:
                            state.record(Record(entry.key, entry.signature, recorded))
                        except OSError as exc:
                            if not is_disk_full(exc):
                                raise
                            # the journal is full: its files are in place, whole, and the record
                            # waits for the manifest (SyncState.record); stop here
                            full = full or exc
                            self._halt()
                        for path, *_ in dropped:  # files of the old version that the new one no longer has
                            (self.options.dropoff / path).unlink(missing_ok=True)
                        sessions.in_place(entry, files, placed=len(files))
                        written = outcome.updated_paths if existing else outcome.created_paths  # (their audit rows: reports.py)
                        for path, size, _ in files:
                            outcome.bytes += size
                            written.append(path)
                        if existing:
                            outcome.updated += len(files)
                        else:
                            outcome.created += len(files)
                        progress.advance(0, 1)
                except BaseException:  # SIGTERM (Terminated), Ctrl-C: start nothing more, end what runs
                    self._halt()
                    raise

        finally:
            progress.close()

        if self._unverified:  # said once, never implied by "verified"
            outcome.notes.append(
                f"content not verified: {self._unverified} files (the server gave no hash for them; only their size was checked)"
            )
        if full is not None:
            outcome.failed += len(unsynced)
            outcome.seconds = time.monotonic() - started
            raise self._disk_full(full, unsynced, outcome) from full
        problems = self._source_problems()  # held by the source but not readable: failures, not notes
        outcome.failures += [f"{problem} (in the source; not synced)" for problem in problems]
        outcome.failed += len(problems)
        self._stopped(outcome, len(unsynced))
        if listed is not None and outcome.stopped:
            outcome.notes.append("--delete skipped: the run stopped before its end, so nothing is deleted")
        elif listed is not None:
            self._delete(listed, outcome)  # never after a failure
        outcome.seconds = time.monotonic() - started
        return outcome

    def _transfers(
        self, pool: ThreadPoolExecutor, todo: list[tuple[RemoteEntry, bool]], progress: Progress, jobs: int
    ) -> Iterator[tuple[Future | None, tuple[RemoteEntry, bool]]]:
        """Every transfer of ``todo``, yielded as it ends with its future (None: not
        started, or cut short, the run stopping): the series from this thread when the
        source says it is the better way (:meth:`_one_thread`), the rest (and the series
        to try again) ``jobs`` at once in ``pool`` (:func:`_bounded`)."""
        again: list[tuple[RemoteEntry, bool]] = []
        if isinstance(self.source, HasManyInstances) and self.source.one_thread:
            series = [item for item in todo if item[0].series]
            if series:
                todo[:] = [item for item in todo if not item[0].series]
                yield from self._one_thread(series, progress, jobs, again)
        todo += again
        yield from _bounded(
            pool, self._with_retries, _drained(todo), progress, jobs * 4, self._stop, self._abort, self._placeable, self._inline
        )

    def _bulk(self, todo: list[tuple[RemoteEntry, bool]], progress: Progress, jobs: int, outcome: Outcome) -> None:
        """Before the per-file transfers: what the source can fetch ahead in a few requests
        (HasPrefetch: Flywheel's hashes), and what it offers in bulk (many small files per
        request, sync/bulk.py) into staged parts; the transfers then place each staged file
        instead of downloading it (:meth:`_fetch`) and download the rest."""
        self._staged = {}
        if isinstance(self.source, HasPrefetch) and todo:  # the hashes the transfers will need, in a few requests
            self.source.prefetch([entry for entry, _ in todo], jobs)
        if not isinstance(self.source, HasBulk) or not todo:
            return
        from .bulk import stage

        def checksum(entry: RemoteEntry) -> str | None:
            return entry.checksum if entry.checksum is not None or self._checksum is None else self._checksum.checksum(entry)

        done = stage(self.source, [entry for entry, _ in todo], self.state.tmp, progress, jobs, self._stop, checksum, self._abort)
        self._staged, self._part_of, self._fast_fs = done.parts, done.part, not done.slow_fs
        if done.batches:
            outcome.notes.append(
                f"bulk download: {len(done.parts)} files in {done.batches} archives; the rest one by one"
                + (f" ({done.missing} missing on the server, {done.rejected} failed their check)" if done.missing or done.rejected else "")
            )
            for problem in done.problems[:3]:
                outcome.notes.append(f"bulk download broke off ({problem}); its files were fetched one by one")

    def _failed(self, outcome: Outcome, entry: RemoteEntry, existing: bool, exc: BaseException, progress: Progress) -> None:
        outcome.failed += 1
        reason = str(exc) if isinstance(exc, (PermanentError, OSError, ValueError)) else f"{exc.__class__.__name__}: {exc}"
        self.sessions.failed(entry, reason)
        outcome.failures.append(f"{entry.describe()}: {reason}")
        outcome.files.append(FileResult(entry.path, "failed", existing, "", reason))
        progress.advance(0, 1)

    def _halt(self) -> None:
        """Stop now (a full disk, an exception): no transfer starts, those under way end."""
        self._stop.set()
        self._abort.set()

    def _not_synced(self, full: OSError | None) -> str:
        """Why an entry the run did not get to is not synced."""
        if full is None and self._request.requested:
            return f"not synced: the run stopped {self._request.why}"
        return "not synced: the disk is full"

    def _stopped(self, outcome: Outcome, unsynced: int) -> None:
        """A run told to stop (sync/stopping.py) that left entries unsynced, or its listing
        unfinished, says so in its outcome (a stop that came after the last transfer is none)."""
        if self._request.requested and (unsynced or outcome.listing_cut):
            outcome.stopped, outcome.stop_kind, outcome.not_synced = self._request.why, self._request.kind, unsynced

    def _disk_full(self, exc: OSError, unsynced: list[RemoteEntry], outcome: Outcome) -> DiskFull:
        """The one-line error of a run stopped by a full disk: the folder, its free space and
        about how much the entries still to sync need (a series' size is not known before
        its retrieval: estimated from the instances this run wrote, when it wrote any, also
        those of series it could not finish)."""
        placed = outcome.created + outcome.updated
        instances, written = self._instances_written
        # a series' instances weigh what this run's instances weighed, finished series or not
        # (the first series may be the one the disk could not hold: the largest comes first)
        per_file = written / instances if instances else outcome.bytes / placed if placed else 0
        needed = sum(e.size or int(e.count * per_file) for e in unsynced)
        series = bool(unsynced) and all(e.series for e in unsynced)
        folders = [(self.options.dropoff, "set DropoffDirectory elsewhere"), (self.options.zip_tmp, "set TempDirectory elsewhere")]
        what = (
            f"the {len(unsynced)} {'series' if series else 'files'} still to sync"
            if unsynced
            else "the journal of this run (the dropoff's .clpipe-sync folder)"
        )  # every file arrived, not every record
        return DiskFull.at(exc, folders, needed=needed or None, purpose=what, outcome=outcome)

    def _source_problems(self) -> list[str]:
        """What the source holds but could not read ("path: reason"; a folder source knows
        them all before it lists its first series)."""
        return list(self.source.problems or []) if isinstance(self.source, HasProblems) else []

    def _delete(self, listed: set[str], outcome: Outcome) -> None:
        """Remove files this tool wrote whose remote file is gone: never after errors, and
        not more than max_delete files."""
        if outcome.failed:
            outcome.notes.append("--delete skipped: the run had errors, so nothing is deleted")
            return
        gone = [r for k in self.state.keys() if k not in listed and (r := self.state.get(k)) is not None]  # noqa: SIM118 (not a dict)
        count = sum(len(r.files) for r in gone)
        if gone and not listed:  # an unmounted share or an emptied query looks exactly like this
            outcome.failed += 1
            outcome.failures.append(
                f"--delete: the source listed nothing, so all {count} files synced before would be "
                "removed; nothing was deleted (check the source, e.g. that its share is mounted)"
            )
            return
        if count > self.options.max_delete:
            outcome.failed += 1
            outcome.failures.append(
                f"--delete would remove {count} files, more than the limit of {self.options.max_delete}; nothing was deleted"
            )
            return
        for record in gone:
            for path, *_ in record.files:
                if self._claims.taken(path):  # a listed entry's file now (its name came free): not deleted
                    continue
                (self.options.dropoff / path).unlink(missing_ok=True)
                outcome.deleted += 1
                outcome.files.append(FileResult(path, "completed", True, "Deleted from destination"))
            self.state.forget(record.key)


class _Ahead:
    """The recorded files checked in the dropoff while the source's listing is read: a
    thread reads the manifest block by block and looks up the size of each plain file it
    records (:meth:`SyncState.plain_files`). A listing read whole before its first entry
    (a source with unique paths: Flywheel's) mostly waits for the server, so the checks
    cost the run no time; a no-op re-sync of a million files then looks each file up once,
    before, not one by one after.

    Per block it keeps only the keys whose file is not as recorded (none, in a no-op); a
    block with more than ``MAX_BAD`` of them, or not reached, is not answered for (the
    engine looks at each file as before). It is stopped, and only then asked, when the
    first entry arrives, before the run changes anything in the dropoff."""

    MAX_BAD = 64  # keys kept per block (beyond: the block is looked at file by file)

    def __init__(self, state: SyncState, root: str) -> None:
        self._state = state
        self._sizes = _Sizes(root)
        self._checked: dict[int, frozenset[str]] = {}  # block number -> keys not in place
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._check, daemon=True, name="clpipe-ahead")
        self._thread.start()

    def _check(self) -> None:
        try:
            for number, files in self._state.plain_files():
                bad: set[str] = set()
                for key, path, size in files:
                    if self._halt.is_set():
                        return
                    if self._sizes(path) != size:
                        bad.add(key)
                        if len(bad) > self.MAX_BAD:
                            break
                else:
                    self._checked[number] = frozenset(bad)
        except (OSError, ValueError):  # a manifest unreadable meanwhile: its files are looked at one by one
            return
        finally:
            self._sizes.close()

    def stop(self) -> None:
        """Stop checking (the answers so far stay)."""
        self._halt.set()
        self._thread.join()

    def in_place(self, key: str) -> bool | None:
        """Is the file recorded for ``key`` in the dropoff with its recorded size? None:
        not known (looked at as before)."""
        number = self._state.block_of(key)
        bad = self._checked.get(number) if number is not None else None
        return None if bad is None else key not in bad


class _Sizes:
    """The sizes of files in the dropoff (-1: none there), each looked up in its folder,
    kept open: the entries of one folder come together, so a folder's path is walked once,
    not once a file (a no-op re-sync of a million files asks a million times)."""

    KEEP = 16  # folders kept open

    def __init__(self, root: str) -> None:
        self._root = root
        self._folders: dict[str, int] = {}

    def __call__(self, path: str) -> int:
        folder, _, name = path.rpartition("/")
        fd = self._folders.get(folder)
        if fd is None:
            try:
                fd = os.open(self._root + folder, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                return -1
            if len(self._folders) >= self.KEEP:
                os.close(self._folders.pop(next(iter(self._folders))))
            self._folders[folder] = fd
        try:
            return os.stat(name, dir_fd=fd).st_size
        except OSError:
            return -1

    def close(self) -> None:
        """Close the folders (also when files were moved between them: they are opened anew)."""
        for fd in self._folders.values():
            os.close(fd)
        self._folders.clear()


#: what :func:`_bounded` yields for a transfer left running when the run stopped
ABANDONED = object()
ABANDON_WAIT = 2.0  # seconds the transfers under way get to end at their next chunk once ``abort`` is set


class _Series:
    """One DICOM series on its way into the dropoff: every instance staged as
    ``<SOPInstanceUID>.dcm`` in a folder of its own under ``.clpipe-sync/tmp/`` (a
    repeated UID is written once), the count checked, then that folder renamed to the
    series' folder (one rename for the whole series), or, when the series' folder exists
    already, each instance renamed into it.

    A source yields each instance as bytes (a server's answer) or as the ``Path`` of a
    local file, which is copied by the kernel (:func:`copy_file`). tmp/ is on the
    dropoff's filesystem, so the renames are atomic; nothing but whole instances under
    their final names is ever in a series folder, not even after kill -9 (the next run
    empties tmp/). A failure removes what it staged (:meth:`undo`, :meth:`close`), and the
    series' folder if the placing made it and placed nothing in it."""

    def __init__(self, engine: Engine, entry: RemoteEntry):
        self.engine, self.entry = engine, entry
        self.stage = f"{engine.state.tmp}/series-{next(engine._parts)}"
        self.staged: dict[str, tuple[str, int]] = {}  # final name -> (staged path, size)
        self.received = 0
        self._made = False  # the staging folder (made at the first instance)

    def add(self, uid: str, payload: bytes | Path, progress: Progress) -> None:
        name = portable_name(f"{uid}.dcm") if uid else ""
        if not uid or name in self.staged:
            return
        if not self._made:
            os.mkdir(self.stage)
            self._made = True
        part = f"{self.stage}/{name}"
        size = copy_file(payload, part) if isinstance(payload, Path) else write_new(part, payload)
        self.staged[name] = (part, size)
        self.received += size
        progress.advance(size)

    def place(self) -> list[list]:
        """The count checked, the staged instances renamed into the series' folder; the
        manifest's file list."""
        entry, staged = self.entry, self.staged
        if entry.count and len(staged) < entry.count:
            raise VerifyError(f"received {len(staged)} of the series' {entry.count} instances")
        if not staged:
            raise VerifyError("the series has no instances to retrieve")
        folder = inside(self.engine.options.dropoff, entry.path)
        made = False
        placed = 0
        try:
            if not os.path.isdir(folder):  # a new series: its staged folder becomes it
                folder.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(self.stage, folder)
                    placed = len(staged)
                except OSError:
                    pass  # made meanwhile: instance by instance, below
            if not placed:
                made = not os.path.isdir(folder)
                folder.mkdir(parents=True, exist_ok=True)
                prefix = f"{folder}/"
                for name, (part, _) in staged.items():
                    os.replace(part, prefix + name)
                    placed += 1
        except BaseException:
            if made and not placed:
                try:
                    folder.rmdir()  # only when empty: nothing of this series is left behind
                except OSError:
                    pass
            raise
        return [[f"{entry.path}/{name}", size, ""] for name, (_, size) in staged.items()]

    def undo(self, progress: Progress) -> None:
        """The progress it made taken back (it failed, or was abandoned)."""
        progress.advance(-self.received)
        self.received = 0

    def close(self) -> None:
        """Its staging folder removed (what was not placed; renamed in whole: gone
        already), and what it wrote counted (a full disk's estimate: Engine)."""
        if self._made:
            shutil.rmtree(self.stage, ignore_errors=True)
        with self.engine._lock:
            self.engine._instances_written[0] += len(self.staged)
            self.engine._instances_written[1] += sum(size for _, size in self.staged.values())


def _place(part: Path, final: Path) -> None:
    """Rename ``part`` to ``final``, making ``final``'s folders only when the rename finds
    them missing: most files go into a folder an earlier file of the run made, and asking
    for the folder each time cost two more file-system calls a file (a ``mkdir`` that fails
    and a ``stat``; on a network file system, two more round trips)."""
    try:
        os.replace(part, final)
    except (FileNotFoundError, NotADirectoryError):  # (a missing part raises again below)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)


@contextmanager
def _closing(pool: ThreadPoolExecutor, request: StopRequest):
    """The pool, shut down at the end: waiting for its threads, unless transfers were left
    behind (a read that does not return): then not (the process ends without them)."""
    try:
        yield pool
    finally:
        pool.shutdown(wait=not request.abandoned, cancel_futures=True)


def _drained(items: list) -> Iterator:
    """Each of ``items`` in order, the list forgetting it as it is taken: the entries of a
    million-file sync are not all held until the last transfer ends."""
    items.reverse()
    while items:
        yield items.pop()


def _bounded(
    pool: ThreadPoolExecutor,
    work,
    todo: Iterable,
    progress: Progress,
    window: int,
    stop: threading.Event,
    abort: threading.Event | None = None,
    placeable=lambda entry: False,
    inline=lambda entry: False,
):
    """Run ``work(entry, progress)`` for every item, keeping at most ``window`` in flight
    (a queue of 100,000 futures would cost memory for nothing); yield each as it ends.
    Once ``stop`` is set no more are started (but those ``placeable(entry)`` says are cheap
    to finish: staged already): each of the rest is yielded with ``None``.
    Once ``abort`` is set, those still running :data:`ABANDON_WAIT` seconds later are
    yielded with :data:`ABANDONED` (left running in their threads). Those ``inline(entry)``
    says are cheap are run in this thread as they are taken, their future already done."""
    pending: dict = {}
    items = iter(todo)

    def submit(entry: RemoteEntry) -> Future:
        if not inline(entry):
            return pool.submit(work, entry, progress)
        done: Future = Future()
        try:
            done.set_result(work(entry, progress))
        except Exception as exc:  # noqa: BLE001 (as a pool's future keeps it: the caller reports it)
            done.set_exception(exc)
        return done

    for item in items:
        pending[submit(item[0])] = item
        if len(pending) >= window:
            break
    aborted_at = 0.0
    while pending:
        finished, _ = wait(pending, timeout=None if abort is None else 0.5, return_when=FIRST_COMPLETED)
        if not finished:
            if abort is not None and abort.is_set():
                aborted_at = aborted_at or time.monotonic()
                if time.monotonic() - aborted_at >= ABANDON_WAIT:
                    for future, item in list(pending.items()):
                        future.cancel()
                        yield ABANDONED, item
                    pending.clear()
            continue
        for done in finished:
            item = pending.pop(done)
            for extra in items:
                if stop.is_set() and not placeable(extra[0]):
                    yield None, extra
                    continue
                pending[submit(extra[0])] = extra
                break
            yield done, item
    for item in items:  # stopped before the queue ran dry
        yield None, item
