"""The native sync engine: plan, transfer, verify, record. It knows nothing of Flywheel.

A *source* lists :class:`RemoteEntry` items and opens one as a stream of bytes; the engine
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
import struct
import sys
import threading
import time
import uuid
import zipfile
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from ..console import human_bytes, summary_line
from ..errors import DiskFull, is_disk_full
from .layout import Claims, flatten_members, inside, is_portable, safe_part
from .manifest import Record, SyncState

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
    renamed: bool = False  # its local name is not its remote one (made portable, or told apart from another's)

    def describe(self) -> str:
        return f"{self.path} ({self.name})" if self.name and self.name != posixpath.basename(self.path) else self.path

    @property
    def signature(self) -> list:
        return [self.size, self.modified, self.checksum or ""] + ([self.version] if self.version else [])


class Source(Protocol):
    def open(self, entry: RemoteEntry) -> AbstractContextManager[Iterator[bytes]]: ...

    def members(self, entry: RemoteEntry) -> list[tuple[str, int]] | None: ...

    # optional: ``checksum(entry)``, the server's "algorithm:hex" of a file whose listing
    # had none (None: the server has none), asked just before its download;
    # ``instances(entry)`` for series entries, a context manager yielding
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
    renamed: int = 0  # entries whose local name is not their remote one (see layout.py)
    moved: int = 0  # files synced under an earlier name, renamed in place to the current one

    def summary(self) -> str:
        return summary_line(self.created, self.updated, self.skipped, self.failed, self.bytes, self.seconds)


class VerifyError(TransientError):
    """The bytes that arrived are not the remote file (wrong size, checksum or zip CRC)."""


class _Stopped(Exception):
    """A transfer not started, not retried or cut short because the run stopped: a disk is
    full, or the process was told to stop (SIGTERM, Ctrl-C)."""


# what zipfile raises for damaged bytes, in the header as in the data (a flipped version
# field: NotImplementedError "zip file version ..."; a flipped offset: ValueError "negative
# seek value"; a flipped flag: RuntimeError "... is encrypted")
_ZIP_DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError, struct.error,
               ValueError, RuntimeError)


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
    when the job was started from one (its stdout then also goes to the log, so it says it is
    no terminal: the bar is not copied there)."""
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
        self._parts = itertools.count()  # this run's staged instances: .clpipe-sync/tmp/series-<n>.part
        self.jobs = 0  # transfers the last run ran at once (0: it had none to do)
        self._stop = threading.Event()  # set when a disk is full: no transfer starts after it
        self._unverified = 0  # files placed whose content the server gave no hash to check against
        self._claims = Claims()  # the local paths of this run's entries (set anew by run)
        self._vacating: set[str] = set()
        self._renamed = {False: 0, True: 0}

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
        members = self.source.members(entry)
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
            outcome.failed += 1
            outcome.failures.append(f"{entry.describe()}: {exc}")
            outcome.files.append(FileResult(entry.path, "failed", False, "", str(exc)))
            return None
        if path != entry.path:  # the source gave two entries one path: told apart here
            entry = replace(entry, path=path, renamed=True)
        if entry.renamed:
            outcome.renamed += 1
            self._renamed[entry.series] += 1
        return entry

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
        if all(f[0].startswith(prefix) and is_portable(f[0][len(prefix):]) for f in files):
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
        outcome.skipped += len(record.files)
        outcome.moved += len(moves)
        action = "would be renamed in place from " if self.options.dry_run else "renamed in place from "
        outcome.files += [FileResult(new, "skipped", True, action + old) for old, new, _ in moves]
        return True

    def _report_names(self, outcome: Outcome) -> None:
        files, series = self._renamed[False], self._renamed[True]
        if files or series:
            what = " and ".join(f"{n} {unit}" for n, unit in ((files, "files"), (series, "series folders")) if n)
            outcome.notes.append(f"{what} renamed: their names collided with another's or were not portable "
                                 "(see 'Local names' in docs/engines.md)")
        if outcome.moved:
            outcome.notes.append(f"{outcome.moved} files synced under earlier names "
                                 f"{'would be' if self.options.dry_run else 'were'} renamed in place (nothing downloaded)")

    # -- transfer ----------------------------------------------------------------------

    def _download(self, entry: RemoteEntry, target: Path | io.BytesIO, progress: Progress) -> str | None:
        """Stream the remote file into ``target`` (a path or memory), checking size and the
        server's checksum: the listing's, else the one the source looks up (its optional
        ``checksum(entry)``, asked just before the download, so only for files with work to
        do; a failed look-up is retried like any other transient fault). Returns the
        checksum the bytes matched, None when the server gave none (size checked only)."""
        expected = entry.checksum
        lookup = getattr(self.source, "checksum", None)
        if expected is None and lookup is not None:
            expected = lookup(entry)
        hasher = _hasher(expected)
        received = 0
        try:
            with (open(target, "wb") if isinstance(target, Path) else nullcontext(target)) as out, self.source.open(entry) as chunks:
                for chunk in chunks:
                    if self._stop.is_set():  # the run is stopping: this transfer is not finished
                        raise _Stopped()
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
        if hasher is None:
            return None
        if expected is not None and hasher.hexdigest() != expected.split(":", 1)[1]:
            progress.advance(-received)
            raise VerifyError("checksum mismatch")
        return expected

    def _fetch_series(self, entry: RemoteEntry, progress: Progress) -> list[list]:
        """Retrieve one DICOM series: every instance staged as ``<SOPInstanceUID>.dcm`` in a
        folder of its own under ``.clpipe-sync/tmp/`` (a repeated UID is written once), the
        count checked, then that folder renamed to the series' folder (one rename for the
        whole series), or, when the series' folder exists already, each instance renamed
        into it.

        A source yields each instance as bytes (a server's answer) or as the ``Path`` of a
        local file, which is copied by the kernel (:func:`copy_file`). tmp/ is on the
        dropoff's filesystem, so the renames are atomic; nothing but whole instances under
        their final names is ever in a series folder, not even after kill -9 (the next run
        empties tmp/). A failure removes what it staged, and the series' folder if this
        fetch made it and placed nothing in it."""
        folder = inside(self.options.dropoff, entry.path)
        stage = f"{self.state.tmp}/series-{next(self._parts)}"
        staged: dict[str, tuple[str, int]] = {}  # final name -> (staged path, size)
        made = False
        placed = 0
        received = 0
        try:
            os.mkdir(stage)
            with self.source.instances(entry) as items:
                for uid, payload in items:
                    if self._stop.is_set():  # the run is stopping: this series is not finished
                        raise _Stopped()
                    name = safe_part(f"{uid}.dcm") if uid else ""
                    if not uid or name in staged:
                        continue
                    part = f"{stage}/{name}"
                    size = copy_file(payload, part) if isinstance(payload, Path) else write_new(part, payload)
                    staged[name] = (part, size)
                    received += size
                    progress.advance(size)
            if entry.count and len(staged) < entry.count:
                raise VerifyError(f"received {len(staged)} of the series' {entry.count} instances")
            if not staged:
                raise VerifyError("the series has no instances to retrieve")
            if not os.path.isdir(folder):  # a new series: its staged folder becomes it
                folder.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(stage, folder)
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
            return [[f"{entry.path}/{name}", size, ""] for name, (_, size) in staged.items()]
        except BaseException:
            progress.advance(-received)
            if made and not placed:
                try:
                    folder.rmdir()  # only when empty: nothing of this series is left behind
                except OSError:
                    pass
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # what was not placed (renamed in whole: gone already)

    def _fetch(self, entry: RemoteEntry, progress: Progress) -> list[list]:
        """Download (and unpack) one entry into place; returns the manifest file list."""
        if entry.series:
            return self._fetch_series(entry, progress)
        dropoff, tmp = self.options.dropoff, self.state.tmp
        if not entry.unpack:
            part = tmp / f"{uuid.uuid4().hex}.part"
            try:
                verified = self._download(entry, part, progress)
                final = inside(dropoff, entry.path)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, final)
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
                        try:
                            final = inside(dropoff, rel)
                        except ValueError as exc:  # a hostile name, not damage: not retried
                            raise PermanentError(str(exc)) from None
                        part = tmp / f"{stem}-{n}.part"
                        staged.append((part, final, rel, info.file_size))  # before it exists: a failure removes it
                        with open(part, "wb") as out:
                            if info.file_size <= CHUNK:
                                out.write(zf.read(info))  # zipfile checks the member's CRC
                            else:
                                with zf.open(info) as src:
                                    shutil.copyfileobj(src, out, CHUNK)
            except _ZIP_DAMAGE as exc:  # a damaged header or body: retried like any corruption
                raise VerifyError(f"damaged zip ({str(exc) or exc.__class__.__name__})") from None
            except OSError as exc:  # a damaged offset makes a zip on disk seek before its start
                if exc.errno != errno.EINVAL:
                    raise
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
            if self._stop.is_set():  # a disk is full: the run is stopping; this one stays to do
                raise _Stopped()
            try:
                return self._fetch(entry, progress)
            except TransientError as exc:
                if attempt > self.options.retries:
                    raise PermanentError(f"{exc} (gave up after {attempt} attempts)") from None
                wait = exc.retry_after if exc.retry_after is not None else min(
                    self.options.backoff_cap, self.options.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                print(f"[retry] {entry.describe()}: {exc}; attempt {attempt + 1} in {wait:.1f} s", flush=True)
                if self._stop.wait(wait):
                    raise _Stopped() from None

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
        # no two entries of the run on one path (the sources see to it: this is the last guard)
        self._claims = Claims()
        self._renamed = {False: 0, True: 0}  # entries renamed: files, series
        self._vacating = set()  # recorded files of entries fetched again: never adopted by another
        fresh: list[RemoteEntry] = []  # not in the manifest
        blocked: list[tuple[RemoteEntry, Record, list]] = []
        for entry in entries:
            self.listed += 1
            self.listed_bytes += entry.size
            if listed is not None:
                listed.add(entry.key)
            claimed = self._claim(entry, outcome)
            if claimed is None:
                continue
            entry = claimed
            record = state.get(entry.key)
            if record is None:  # adopted or fetched: decided once every recorded file is where it belongs
                fresh.append(entry)
                continue
            if record.signature == entry.signature:
                moves = self._moves(record, entry)
                if moves == [] and self._present(record):
                    outcome.skipped += len(record.files)
                    outcome.unchanged.append(entry.key)
                    continue
                if moves:  # synced under an earlier name: renamed in place, not fetched again
                    done = self._relocate(entry, record, moves, outcome)
                    if done is None:  # its new place is taken, for now: tried again below
                        blocked.append((entry, record, moves))
                    if done is not False:
                        continue
            self._vacating.update(f[0] for f in record.files)
            todo.append((entry, True))
        for _ in range(len(blocked)):  # a place another entry left meanwhile (bounded: one more each time)
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
                outcome.skipped += len(adopted.files)
                outcome.adopted += len(adopted.files)
                outcome.files += [FileResult(f[0], "skipped", True, "adopted: already intact in the dropoff") for f in adopted.files]
                continue
            todo.append((entry, os.path.lexists(os.path.join(self.options.dropoff, entry.path))))
        del fresh
        self._report_names(outcome)

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
        # A full disk (or quota) stops the run: no transfer starts after it (the next 1,000
        # would fail the same way), those under way end, and what finished is journalled.
        full: OSError | None = None
        unsynced: list[RemoteEntry] = []
        try:
            with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sync") as pool:
                try:
                    for future, (entry, existing) in _bounded(pool, self._with_retries, todo, progress, jobs * 4, self._stop):
                        try:
                            if future is None:  # never started: the run stopped first
                                raise _Stopped()
                            files = future.result()
                        except (_Stopped, OSError) as exc:
                            if not isinstance(exc, _Stopped) and not is_disk_full(exc):
                                self._failed(outcome, entry, existing, exc, progress)
                                continue
                            if full is None and is_disk_full(exc):
                                full = exc
                                self._stop.set()
                            unsynced.append(entry)
                            outcome.files.append(FileResult(entry.path, "failed", existing, "", "not synced: the disk is full"))
                            progress.advance(0, 1)
                            continue
                        except Exception as exc:  # one file's failure is reported, never fatal to the others
                            self._failed(outcome, entry, existing, exc, progress)
                            continue
                        old = state.get(entry.key)
                        keep = {f[0] for f in files}
                        dropped = [f for f in old.files if f[0] not in keep and not self._claims.taken(f[0])] if old is not None else []
                        try:
                            if dropped and self._source_problems():
                                # the source could not read everything, so "no longer there" may be
                                # "could not be read": the old files stay, and stay recorded
                                state.record(Record(entry.key, entry.signature, [*files, *dropped]))
                                dropped = []
                            else:
                                state.record(Record(entry.key, entry.signature, files))
                        except OSError as exc:
                            if not is_disk_full(exc):
                                raise
                            # the journal is full: its files are in place, whole, but not recorded
                            # (the next run adopts them, or fetches a series again); stop here
                            full = full or exc
                            self._stop.set()
                            dropped = []
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
                except BaseException:  # SIGTERM (Terminated), Ctrl-C: start nothing more, end what runs
                    self._stop.set()
                    raise

        finally:
            progress.close()

        if self._unverified:  # said once, never implied by "verified"
            outcome.notes.append(f"content not verified: {self._unverified} files (the server gave no hash for them; "
                                 "only their size was checked)")
        if full is not None:
            outcome.failed += len(unsynced)
            outcome.seconds = time.monotonic() - started
            raise self._disk_full(full, unsynced, outcome) from full
        problems = self._source_problems()  # held by the source but not readable: failures, not notes
        outcome.failures += [f"{problem} (in the source; not synced)" for problem in problems]
        outcome.failed += len(problems)
        if listed is not None:
            self._delete(listed, outcome)  # never after a failure
        outcome.seconds = time.monotonic() - started
        return outcome

    @staticmethod
    def _failed(outcome: Outcome, entry: RemoteEntry, existing: bool, exc: BaseException, progress: Progress) -> None:
        outcome.failed += 1
        reason = str(exc) if isinstance(exc, (PermanentError, OSError, ValueError)) else f"{exc.__class__.__name__}: {exc}"
        outcome.failures.append(f"{entry.describe()}: {reason}")
        outcome.files.append(FileResult(entry.path, "failed", existing, "", reason))
        progress.advance(0, 1)

    def _disk_full(self, exc: OSError, unsynced: list[RemoteEntry], outcome: Outcome) -> DiskFull:
        """The one-line error of a run stopped by a full disk: the folder, its free space and
        about how much the entries still to sync need (a series' size is not known before
        its retrieval: estimated from the instances this run wrote, when it wrote any)."""
        placed = outcome.created + outcome.updated
        per_file = outcome.bytes / placed if placed else 0
        needed = sum(e.size or int(e.count * per_file) for e in unsynced)
        series = bool(unsynced) and all(e.series for e in unsynced)
        folders = [(self.options.dropoff, "set DropoffDirectory elsewhere"), (self.options.zip_tmp, "set TempDirectory elsewhere")]
        what = f"the {len(unsynced)} {'series' if series else 'files'} still to sync" if unsynced else \
            "the journal of this run (the dropoff's .clpipe-sync folder)"  # every file arrived, not every record
        return DiskFull.at(exc, folders, needed=needed or None, purpose=what, outcome=outcome)

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
                if self._claims.taken(path):  # a listed entry's file now (its name came free): not deleted
                    continue
                (self.options.dropoff / path).unlink(missing_ok=True)
                outcome.deleted += 1
                outcome.files.append(FileResult(path, "completed", True, "Deleted from destination"))
            self.state.forget(record.key)


def _bounded(pool: ThreadPoolExecutor, work, todo: list, progress: Progress, window: int, stop: threading.Event):
    """Run ``work(entry, progress)`` for every item, keeping at most ``window`` in flight
    (a queue of 100,000 futures would cost memory for nothing); yield each as it ends.
    Once ``stop`` is set no more are started: each of the rest is yielded with ``None``."""
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
                if stop.is_set():
                    yield None, extra
                    continue
                pending[pool.submit(work, extra[0], progress)] = extra
                break
            yield done, item
    for item in items:  # stopped before the queue ran dry
        yield None, item


def write_reports(outcome: Outcome, audit_csv: Path, summary_json: Path, extra: dict, state: SyncState | None = None) -> None:
    """The audit CSV in fw's columns (properly quoted; failed files get a row too) and a
    JSON summary beside it. ``state`` gives the files of the unchanged entries.

    Each is written whole under a temporary name and renamed, so a full disk never leaves
    half a report: it raises :class:`DiskFull` naming the folder and about how many bytes
    the reports need."""
    rows = [(f.path, f.status, f.existing, f.error, f.action) for f in outcome.files]
    if state is not None:
        rows += [(f[0], "skipped", True, "", "") for key in outcome.unchanged for f in state.get(key).files]
    rows.sort(key=lambda row: row[0])

    def audit(out) -> None:
        writer = csv.writer(out)
        writer.writerow(["src_path", "dest_path", "status", "existing", "error_message", "action_taken"])
        for path, status, existing, error, action in rows:
            writer.writerow(["" if action.startswith("Deleted") else path, path, status, str(existing), error, action])

    data = {
        **extra,
        "created": outcome.created, "updated": outcome.updated, "skipped": outcome.skipped,
        "adopted": outcome.adopted, "deleted": outcome.deleted, "failed": outcome.failed,
        "renamed": outcome.renamed, "renamed_in_place": outcome.moved,
        "bytes": outcome.bytes, "seconds": round(outcome.seconds, 3),
        "failures": outcome.failures, "notes": outcome.notes, "audit_csv": str(audit_csv),
    }
    summary = json.dumps(data, indent=2) + "\n"
    try:
        audit_csv.parent.mkdir(parents=True, exist_ok=True)
        _write_whole(audit_csv, audit)
        _write_whole(summary_json, lambda out: out.write(summary))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        counter = _Counter()
        audit(counter)
        needed = counter.bytes + len(summary.encode())
        raise DiskFull.at(exc, [(audit_csv.parent, ""), (summary_json.parent, "")], needed=needed,
                          purpose=f"the audit log {audit_csv.name} and the summary {summary_json.name}") from exc


class _Counter:
    """A text sink that only counts the UTF-8 bytes written to it."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, text: str) -> int:
        self.bytes += len(text.encode("utf-8"))
        return len(text)


def _write_whole(path: Path, fill) -> None:
    """``fill(text file)`` into a temporary file beside ``path``, renamed to ``path`` only
    when whole (on an error it is removed, and ``path`` stays as it was)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w", newline="", encoding="utf-8") as out:
            fill(out)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
