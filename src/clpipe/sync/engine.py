"""The native sync engine: plan, transfer, verify, record. It knows nothing of Flywheel.

A *source* lists :class:`RemoteEntry` items and opens one as a stream of bytes; the engine
makes the dropoff match: it skips what the manifest (or an intact earlier download, e.g.
by ``fw sync``) already has, downloads the rest in parallel into a temporary file on the
dropoff's own filesystem, checks size, checksum (when the source gives one) and zip CRCs,
renames each file into place, and journals it. Transient faults (429, 5xx, timeouts,
resets, truncated or corrupted bodies) are retried with backoff; one failed file is
reported and makes the run fail, never hides behind success.

A DICOM series (``entry.series``) comes from the source as instances, bytes or a local
file's path: each is staged under a hidden temporary name in the series' own folder
(a local file copied inside the kernel, as ``cp`` does), the series' instance count is
checked, then each is renamed to ``<SOPInstanceUID>.dcm`` beside it.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import itertools
import json
import os
import posixpath
import random
import shutil
import sys
import threading
import time
import uuid
import zipfile
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from ..console import human_bytes, summary_line
from .layout import flatten_members, inside, safe_part
from .manifest import PART_PREFIX, PART_SUFFIX, Record, SyncState, clear_stale_parts

CHUNK = 1 << 20
PROGRESS_EVERY = 15.0
IN_MEMORY_ZIP = 64 << 20  # zips up to this size are unpacked from memory, larger ones from TempDirectory


class TransientError(Exception):
    """Worth retrying: 429, 5xx, timeouts, dropped connections, bad bodies."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """Not worth retrying (404, 403, ...)."""


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    key: str  # stable identity of the remote file
    path: str  # where it lands, relative to the dropoff, POSIX (for a zip to unpack: the folder)
    size: int
    modified: float  # epoch seconds
    checksum: str | None  # "sha384:<hex>" etc., or None when the source gives none
    unpack: bool  # a zipped series to unpack into ``path``
    ref: object = None  # what the source needs to open it
    name: str = ""  # the remote file's own name, for messages
    count: int = 0  # a series: how many instances it holds (0: not known)
    version: str = ""  # what else identifies this version of it (a series: its instance count)
    series: bool = False  # a DICOM series: the source yields its instances, one file each

    def describe(self) -> str:
        return f"{self.path} ({self.name})" if self.name and self.name != posixpath.basename(self.path) else self.path

    @property
    def signature(self) -> list:
        return [self.size, self.modified, self.checksum or ""] + ([self.version] if self.version else [])


class Source(Protocol):
    def open(self, entry: RemoteEntry) -> AbstractContextManager[Iterator[bytes]]: ...

    def members(self, entry: RemoteEntry) -> list[tuple[str, int]] | None: ...

    # optional: ``instances(entry)`` for series entries, a context manager yielding
    # (SOPInstanceUID, bytes or a local file's Path); ``max_jobs``, the most transfers
    # worth running at once (read after the listing; Options.jobs is the ceiling);
    # ``problems``, what the source holds but could not read ("path: reason"): each fails
    # the run, and while there are any no synced file is removed (neither an old version's
    # nor by --delete), since "gone" may be "could not be read"


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


@dataclass(slots=True)
class FileResult:
    path: str
    status: str  # completed | skipped | failed
    existing: bool
    action: str
    error: str = ""


@dataclass
class Outcome:
    created: int = 0
    updated: int = 0
    skipped: int = 0
    adopted: int = 0
    deleted: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    files: list[FileResult] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # keys skipped as already synced (rows made when reporting)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return summary_line(self.created, self.updated, self.skipped, self.failed, self.bytes, self.seconds)


class VerifyError(TransientError):
    """The bytes that arrived are not the remote file (wrong size, checksum or zip CRC)."""


def _hasher(checksum: str | None):
    if not checksum:
        return None
    algorithm = checksum.split(":", 1)[0]
    try:
        return hashlib.new(algorithm)
    except ValueError:
        return None


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_MAX_COUNT = 1 << 30  # bytes asked of one copy_file_range / sendfile call
# copy_file_range fails this way where it cannot work (another filesystem on an older
# kernel, a filesystem without it, seccomp filters): sendfile is tried, then read/write
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP,
                             errno.EBADF, errno.ETXTBSY, errno.EPERM})
_NO_COPY_RANGE: set[int] = set()  # st_dev of source filesystems where copy_file_range failed so


def write_new(path: str, data: bytes) -> int:
    """Write ``data`` to a file that must not exist yet; returns its size."""
    fd = os.open(path, _CREATE, 0o666)
    try:
        return write_all(fd, data)
    finally:
        os.close(fd)


def copy_file(src: Path | str, dst: str) -> int:
    """Copy the local file ``src`` to a file ``dst`` that must not exist yet, inside the
    kernel (``copy_file_range``, as ``cp`` does; else ``sendfile``; else read/write): the
    bytes never pass through Python. Returns the bytes copied. An ``OSError`` of the
    copy names ``src`` and ``dst``, as ``shutil.copyfile``'s does; one of opening names
    the file it could not open."""
    fd_in = os.open(src, _READ)
    try:
        st = os.fstat(fd_in)
        fd_out = os.open(dst, _CREATE, 0o666)
        try:
            return _copy_fds(fd_in, fd_out, st.st_size, st.st_dev)
        except OSError as exc:
            exc.filename, exc.filename2 = os.fspath(src), dst
            raise
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _copy_fds(fd_in: int, fd_out: int, size: int, dev: int) -> int:
    """Copy from the current offsets to the end of ``fd_in``. Each call asks for one byte
    more than the rest of the file as ``fstat`` saw it, so a call that returns less after
    reaching that size has met the end (one call for a whole small file, as one ``read``
    would); a file that grew meanwhile is copied to its new end."""
    method = 0 if dev not in _NO_COPY_RANGE and hasattr(os, "copy_file_range") else 1
    copied = 0
    while True:
        ask = min(size - copied + 1 if copied <= size else CHUNK, _MAX_COUNT)
        try:
            if method == 0:
                n = os.copy_file_range(fd_in, fd_out, ask)
            elif method == 1:
                n = os.sendfile(fd_out, fd_in, None, ask)
            else:
                ask = min(ask, CHUNK)
                n = write_all(fd_out, os.read(fd_in, ask))
        except OSError as exc:
            if method < 2 and exc.errno in _NO_KERNEL_COPY:
                if method == 0:
                    _NO_COPY_RANGE.add(dev)
                method += 1
                continue
            raise
        if n == 0:
            if method == 0 and copied < size:  # some filesystems copy nothing this way: ask sendfile
                method = 1
                continue
            return copied
        copied += n
        if n < ask and copied >= size:
            return copied


def write_all(fd: int, data: bytes) -> int:
    done = os.write(fd, data)
    if done < len(data):  # a short write (a signal, a huge buffer): the rest
        view = memoryview(data)
        while done < len(view):
            done += os.write(fd, view[done:])
    return done


def _terminal():
    """Where the live bar goes: stdout when it is the terminal; else the terminal itself
    when the job was started from one (its output then goes through ``tee`` to the log)."""
    if sys.stdout.isatty():
        return sys.stdout
    try:
        return open("/dev/tty", "w")
    except OSError:
        return sys.stdout


def watched() -> bool:
    """Does somebody watch this run on a terminal (then: a live bar, not progress lines)?"""
    return sys.stdout.isatty() or os.environ.get("CLPIPE_TTY_PROGRESS") == "1"


class Progress:
    """A live bar on a terminal (rich), a plain line every PROGRESS_EVERY seconds otherwise."""

    def __init__(self, total_files: int, total_bytes: int, interactive: bool):
        self.total_files, self.total_bytes = total_files, total_bytes
        self.done_files = self.done_bytes = 0
        self.started = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._bar = None
        if interactive and total_files:
            from rich.progress import BarColumn, DownloadColumn, Progress as Bar, TimeRemainingColumn, TransferSpeedColumn

            from rich.console import Console

            self._bar = Bar("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=Console(file=_terminal(), stderr=False))
            self._task = self._bar.add_task(f"syncing {total_files} files", total=total_bytes or None)
            self._bar.start()

    def advance(self, nbytes: int, files: int = 0) -> None:
        with self._lock:
            self.done_bytes += nbytes
            self.done_files += files
            if self._bar is not None:
                self._bar.update(self._task, advance=nbytes)
            elif time.monotonic() - self._last >= PROGRESS_EVERY:
                self._last = time.monotonic()
                rate = self.done_bytes / max(self._last - self.started, 1e-6) / 1e6
                print(f"[progress {time.strftime('%H:%M:%S')}] {self.done_files}/{self.total_files} files, "
                      f"{self.done_bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, {rate:.1f} MB/s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class Engine:
    def __init__(self, source: Source, state: SyncState, options: Options):
        self.source, self.state, self.options = source, state, options
        self._lock = threading.Lock()
        self._token = uuid.uuid4().hex[:12]  # this run's staged files: .clpipe-<token>-<n>.part
        self._parts = itertools.count()
        self.jobs = 0  # transfers the last run ran at once (0: it had none to do)

    # -- planning ----------------------------------------------------------------------

    def _present(self, record: Record) -> bool:
        root = str(self.options.dropoff) + "/"
        for path, size, *_ in record.files:
            try:
                if os.stat(root + path).st_size != size:
                    return False
            except OSError:
                return False
        return True

    def _adopt(self, entry: RemoteEntry) -> Record | None:
        """A file or unpacked series already in the dropoff (written by ``fw sync`` or by a
        run killed before it journalled): adopt it when it is intact, as ``fw`` judges
        (same size, not older than the remote file)."""
        dropoff = self.options.dropoff
        if entry.series:  # its files are named by SOPInstanceUID: only a retrieval knows them
            return None
        if not entry.unpack:
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
        members = self.source.members(entry)
        if not members:
            return None
        names = flatten_members([name for name, size in members])
        files = []
        for name, size in members:
            rel = f"{entry.path}/{names[name]}"
            try:
                st = os.stat(dropoff / rel)
            except OSError:
                return None
            if st.st_size != size or st.st_mtime < entry.modified:
                return None
            files.append([rel, size, ""])
        return Record(entry.key, entry.signature, files)

    # -- transfer ----------------------------------------------------------------------

    def _download(self, entry: RemoteEntry, target: Path | io.BytesIO, progress: Progress) -> None:
        """Stream the remote file into ``target`` (a path or memory), checking size and checksum."""
        hasher = _hasher(entry.checksum)
        received = 0
        try:
            with (open(target, "wb") if isinstance(target, Path) else nullcontext(target)) as out, self.source.open(entry) as chunks:
                for chunk in chunks:
                    out.write(chunk)
                    received += len(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                    progress.advance(len(chunk))
        except BaseException:
            progress.advance(-received)
            raise
        if received != entry.size:
            progress.advance(-received)
            raise VerifyError(f"received {received} bytes, expected {entry.size}")
        if hasher is not None and hasher.hexdigest() != entry.checksum.split(":", 1)[1]:
            progress.advance(-received)
            raise VerifyError("checksum mismatch")

    def _fetch_series(self, entry: RemoteEntry, progress: Progress) -> list[list]:
        """Retrieve one DICOM series: every instance staged under a temporary name in the
        series' own folder (a repeated UID is written once), the count checked, then each
        renamed to ``<SOPInstanceUID>.dcm`` in that folder.

        A source yields each instance as bytes (a server's answer) or as the ``Path`` of a
        local file, which is copied by the kernel (:func:`copy_file`). Staging beside the
        final name keeps the rename within one folder, and no file is ever whole under its
        final name before it is complete; a failure removes what it staged, and leftovers of
        a killed run are removed when the series is fetched again (:func:`clear_stale_parts`)."""
        folder = inside(self.options.dropoff, entry.path)
        made = not os.path.isdir(folder)
        if made:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            clear_stale_parts(folder, self._token)
        base = f"{folder}/{PART_PREFIX}{self._token}-"
        marker = self.state.begin_staging(folder, made, f"{self._token}-{next(self._parts)}")
        staged: dict[str, tuple[str, int]] = {}  # final name -> (staged path, size)
        placed = 0
        received = 0
        try:
            with self.source.instances(entry) as items:
                for uid, payload in items:
                    name = safe_part(f"{uid}.dcm") if uid else ""
                    if not uid or name in staged:
                        continue
                    part = f"{base}{next(self._parts)}{PART_SUFFIX}"
                    # recorded before it exists: whatever happens next, the cleanup below sees it
                    staged[name] = (part, 0)
                    size = copy_file(payload, part) if isinstance(payload, Path) else write_new(part, payload)
                    staged[name] = (part, size)
                    received += size
                    progress.advance(size)
            if entry.count and len(staged) < entry.count:
                raise VerifyError(f"received {len(staged)} of the series' {entry.count} instances")
            if not staged:
                raise VerifyError("the series has no instances to retrieve")
            prefix = f"{folder}/"
            for name, (part, _) in staged.items():
                os.replace(part, prefix + name)
                placed += 1
            return [[f"{entry.path}/{name}", size, ""] for name, (_, size) in staged.items()]
        except BaseException:
            progress.advance(-received)
            for part, _ in list(staged.values())[placed:]:  # the renamed ones are whole files in place
                try:
                    os.unlink(part)
                except OSError:
                    pass
            if made and not placed:
                try:
                    folder.rmdir()  # only when empty: nothing of this series is left behind
                except OSError:
                    pass
            raise
        finally:
            self.state.end_staging(marker)

    def _fetch(self, entry: RemoteEntry, progress: Progress) -> list[list]:
        """Download (and unpack) one entry into place; returns the manifest file list."""
        if entry.series:
            return self._fetch_series(entry, progress)
        dropoff, tmp = self.options.dropoff, self.state.tmp
        if not entry.unpack:
            part = tmp / f"{uuid.uuid4().hex}.part"
            try:
                self._download(entry, part, progress)
                final = inside(dropoff, entry.path)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, final)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            return [[entry.path, entry.size, ""]]
        if entry.size <= IN_MEMORY_ZIP:
            archive: Path | io.BytesIO = io.BytesIO()
        else:
            self.options.zip_tmp.mkdir(parents=True, exist_ok=True)
            archive = self.options.zip_tmp / f"{uuid.uuid4().hex}.zip"
        staged: list[tuple[Path, Path, str, int]] = []
        placed = 0
        try:
            self._download(entry, archive, progress)
            try:
                with zipfile.ZipFile(archive) as zf:
                    infos = [i for i in zf.infolist() if not i.is_dir() and i.file_size > 0]
                    names = flatten_members([i.filename for i in infos])
                    stem = uuid.uuid4().hex
                    for n, info in enumerate(infos):
                        rel = f"{entry.path}/{names[info.filename]}"
                        part = tmp / f"{stem}-{n}.part"
                        with open(part, "wb") as out:
                            if info.file_size <= CHUNK:
                                out.write(zf.read(info))  # zipfile checks the member's CRC
                            else:
                                with zf.open(info) as src:
                                    shutil.copyfileobj(src, out, CHUNK)
                        staged.append((part, inside(dropoff, rel), rel, info.file_size))
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as exc:
                raise VerifyError(f"damaged zip ({exc})") from None
            for folder in {final.parent for _, final, _, _ in staged}:
                folder.mkdir(parents=True, exist_ok=True)
            for part, final, _, _ in staged:
                os.replace(part, final)
                placed += 1
            return [[rel, size, ""] for _, _, rel, size in staged]
        finally:
            if isinstance(archive, Path):
                archive.unlink(missing_ok=True)
            for part, *_ in staged[placed:]:  # the renamed ones are in place: nothing to remove
                part.unlink(missing_ok=True)

    def _with_retries(self, entry: RemoteEntry, progress: Progress) -> list[list]:
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._fetch(entry, progress)
            except TransientError as exc:
                if attempt > self.options.retries:
                    raise PermanentError(f"{exc} (gave up after {attempt} attempts)") from None
                wait = exc.retry_after if exc.retry_after is not None else min(
                    self.options.backoff_cap, self.options.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                print(f"[retry] {entry.describe()}: {exc}; attempt {attempt + 1} in {wait:.1f} s", flush=True)
                time.sleep(wait)

    # -- the run -------------------------------------------------------------------------

    def run(self, entries: Iterable[RemoteEntry]) -> Outcome:
        """Sync every entry. ``entries`` may be a generator: each is checked against the
        manifest as it arrives and dropped at once when it is already in place, so a no-op
        re-sync of 100,000 files never holds 100,000 entries."""
        started = time.monotonic()
        outcome = Outcome()
        state = self.state
        todo: list[tuple[RemoteEntry, bool]] = []
        listed: set[str] | None = set() if self.options.delete else None
        self.listed = self.listed_bytes = 0
        for entry in entries:
            self.listed += 1
            self.listed_bytes += entry.size
            if listed is not None:
                listed.add(entry.key)
            record = state.get(entry.key)
            if record is not None and record.signature == entry.signature and self._present(record):
                outcome.skipped += len(record.files)
                outcome.unchanged.append(entry.key)
                continue
            adopted = self._adopt(entry) if record is None else None
            if adopted is not None:
                if not self.options.dry_run:
                    state.record(adopted)
                outcome.skipped += len(adopted.files)
                outcome.adopted += len(adopted.files)
                outcome.files += [FileResult(f[0], "skipped", True, "adopted: already intact in the dropoff") for f in adopted.files]
                continue
            existing = record is not None or os.path.lexists(os.path.join(self.options.dropoff, entry.path))
            todo.append((entry, existing))

        if self.options.dry_run:
            for entry, existing in todo:
                outcome.files.append(FileResult(entry.path + ("/" if entry.unpack else ""), "would-transfer", existing,
                                                "Would update" if existing else "Would create"))
            outcome.notes.append(f"dry run: {len(todo)} remote files would be transferred ({human_bytes(sum(e.size for e, _ in todo))}); nothing was written")
            outcome.seconds = time.monotonic() - started
            return outcome

        progress = Progress(len(todo), sum(e.size for e, _ in todo), self.options.interactive)
        # a source may know that fewer are better (a local folder: no more than the CPUs);
        # asked after the listing, which is when it knows
        jobs = max(1, min(self.options.jobs, getattr(self.source, "max_jobs", None) or self.options.jobs))
        self.jobs = jobs if todo else 0
        try:
            with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sync") as pool:
                for future, (entry, existing) in _bounded(pool, self._with_retries, todo, progress, window=jobs * 4):
                    try:
                        files = future.result()
                    except Exception as exc:  # one file's failure is reported, never fatal to the others
                        outcome.failed += 1
                        reason = str(exc) if isinstance(exc, (PermanentError, OSError, ValueError)) else f"{exc.__class__.__name__}: {exc}"
                        message = f"{entry.describe()}: {reason}"
                        outcome.failures.append(message)
                        outcome.files.append(FileResult(entry.path, "failed", existing, "", reason))
                        progress.advance(0, 1)
                        continue
                    old = state.get(entry.key)
                    keep = {f[0] for f in files}
                    dropped = [f for f in old.files if f[0] not in keep] if old is not None else []
                    if dropped and self._source_problems():
                        # the source could not read everything, so "no longer there" may be
                        # "could not be read": the old files stay, and stay recorded
                        state.record(Record(entry.key, entry.signature, [*files, *dropped]))
                        dropped = []
                    else:
                        state.record(Record(entry.key, entry.signature, files))
                    for path, *_ in dropped:  # files of the old version that the new one no longer has
                        (self.options.dropoff / path).unlink(missing_ok=True)
                    for path, size, _ in files:
                        outcome.bytes += size
                        if existing:
                            outcome.updated += 1
                        else:
                            outcome.created += 1
                        outcome.files.append(FileResult(path, "completed", existing,
                                                        "Updated file on destination" if existing else "Created file on destination"))
                    progress.advance(0, 1)
        finally:
            progress.close()

        problems = self._source_problems()  # held by the source but not readable: failures, not notes
        outcome.failures += [f"{problem} (in the source; not synced)" for problem in problems]
        outcome.failed += len(problems)
        if listed is not None:
            self._delete(listed, outcome)  # never after a failure
        outcome.seconds = time.monotonic() - started
        return outcome

    def _source_problems(self) -> list[str]:
        """What the source holds but could not read ("path: reason"; a folder source knows
        them all before it lists its first series)."""
        return list(getattr(self.source, "problems", None) or [])

    def _delete(self, listed: set[str], outcome: Outcome) -> None:
        """Remove files this tool wrote whose remote file is gone: never after errors, and
        not more than max_delete files."""
        if outcome.failed:
            outcome.notes.append("--delete skipped: the run had errors, so nothing is deleted")
            return
        gone = [self.state.get(k) for k in self.state.keys() if k not in listed]
        count = sum(len(r.files) for r in gone)
        if gone and not listed:  # an unmounted share or an emptied query looks exactly like this
            outcome.failed += 1
            outcome.failures.append(f"--delete: the source listed nothing, so all {count} files synced before would be "
                                    "removed; nothing was deleted (check the source, e.g. that its share is mounted)")
            return
        if count > self.options.max_delete:
            outcome.failed += 1
            outcome.failures.append(f"--delete would remove {count} files, more than the limit of {self.options.max_delete}; nothing was deleted")
            return
        for record in gone:
            for path, *_ in record.files:
                (self.options.dropoff / path).unlink(missing_ok=True)
                outcome.deleted += 1
                outcome.files.append(FileResult(path, "completed", True, "Deleted from destination"))
            self.state.forget(record.key)


def _bounded(pool: ThreadPoolExecutor, work, todo: list, progress: Progress, window: int):
    """Run ``work(entry, progress)`` for every item, keeping at most ``window`` in flight
    (a queue of 100,000 futures would cost memory for nothing); yield each as it ends."""
    pending: dict = {}
    items = iter(todo)
    for item in items:
        pending[pool.submit(work, item[0], progress)] = item
        if len(pending) >= window:
            break
    while pending:
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for done in finished:
            item = pending.pop(done)
            for extra in items:
                pending[pool.submit(work, extra[0], progress)] = extra
                break
            yield done, item


def write_reports(outcome: Outcome, audit_csv: Path, summary_json: Path, extra: dict, state: SyncState | None = None) -> None:
    """The audit CSV in fw's columns (properly quoted; failed files get a row too) and a
    JSON summary beside it. ``state`` gives the files of the unchanged entries."""
    audit_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(audit_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["src_path", "dest_path", "status", "existing", "error_message", "action_taken"])
        rows = [(f.path, f.status, f.existing, f.error, f.action) for f in outcome.files]
        if state is not None:
            rows += [(f[0], "skipped", True, "", "") for key in outcome.unchanged for f in state.get(key).files]
        rows.sort(key=lambda row: row[0])
        for path, status, existing, error, action in rows:
            writer.writerow(["" if action.startswith("Deleted") else path, path, status, str(existing), error, action])
    data = {
        **extra,
        "created": outcome.created, "updated": outcome.updated, "skipped": outcome.skipped,
        "adopted": outcome.adopted, "deleted": outcome.deleted, "failed": outcome.failed,
        "bytes": outcome.bytes, "seconds": round(outcome.seconds, 3),
        "failures": outcome.failures, "notes": outcome.notes, "audit_csv": str(audit_csv),
    }
    summary_json.write_text(json.dumps(data, indent=2) + "\n")
