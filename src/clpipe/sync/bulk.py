"""Many small files in few requests: a source's bulk archives (tars), streamed.

For a source that can send many files as one tar (:class:`~clpipe.sources.base.HasBulk`:
Flywheel's ``POST download`` ticket), :func:`stage` fetches the batches the source offers,
a few at once, before the engine's per-file transfers start. Each tar is read as it
arrives (``tarfile`` in stream mode: never whole on disk or in memory); a regular member
whose path is exactly one of the batch's (:attr:`BulkBatch.members`: no other matching,
no guessing) is written to a part file in the dropoff's ``.clpipe-sync/tmp/`` and checked
like a download: its size, and the server's hash when there is one (the listing's, or the
source's ``checksum(entry)``). The engine then renames each staged part into place and
journals it exactly as it does a downloaded file (``Engine._fetch``).

Whatever a tar does not deliver whole and verified (a member missing, damaged, of another
size or hash, an empty ``<path>.MISSING`` member for content the server lacks, a tar cut
short or unreadable, a ticket refused) is left to the per-file downloads, with their
retries: the bulk path can make a run faster, never wronger. A tar whose first members
match none of the batch's paths (a server that names them otherwise) is abandoned early.
"""

from __future__ import annotations

import itertools
import os
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TransferError
from ..sources.base import BulkBatch, HasBulk, RemoteEntry
from .fileio import write_all
from .progress import Progress
from .transfer import hasher

CHUNK = 1 << 20  # bytes of a member read at once
SLOW_IO = 200e-6  # seconds a file-system call takes on average, above which tars write side by side (_Turn)
GIVE_UP_AFTER = 64  # members read without one matching: the tar is not named as expected
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


@dataclass
class Staged:
    """What :func:`stage` fetched: entry key -> its part's code (:meth:`part` gives the
    staged part file and whether a hash was checked: an int, not a path and a tuple, for
    each of 100,000 files), and how it went, for the run's notes."""

    parts: dict[str, int] = field(default_factory=dict)
    stem: str = ""  # every part file is "<stem>-<number>.part"
    numbers: Iterator[int] = field(default_factory=itertools.count)  # (next() is atomic: the batches' threads share it)
    batches: int = 0  # tars asked for
    missing: int = 0  # ".MISSING" members: content the server does not have
    rejected: int = 0  # members of the right path but the wrong size or hash
    problems: list[str] = field(default_factory=list)  # batches that broke off, and why
    slow_fs: bool = False  # the file system's calls were slow at the end (_Turn): the engine places side by side

    def part(self, code: int) -> tuple[str, bool]:
        """(the staged part file, whether its hash was checked) of a code in :attr:`parts`."""
        return f"{self.stem}-{code >> 1}.part", bool(code & 1)


class _Reader:
    """A read-only file over an iterator of byte pieces, for ``tarfile``'s stream mode.

    A read takes what it needs from the current piece by position, so a piece is copied
    once, not again for every read that takes part of it (tarfile reads 10 KiB at a time;
    the pieces are what the network delivered, tens of KiB). Read by the holder of
    ``turn`` (:class:`_Turn`), which it gives up while it waits for the next piece."""

    def __init__(self, chunks: Iterator[bytes], turn: threading.Lock):
        self._chunks, self._piece, self._at, self._turn = chunks, b"", 0, turn

    def _next(self) -> bytes:
        """The next piece, waited for without the turn (another tar's members go on)."""
        self._turn.release()
        try:
            return next(self._chunks, b"")
        finally:
            self._turn.acquire()

    def read(self, size: int = -1) -> bytes:
        piece, at = self._piece, self._at
        if 0 <= size <= len(piece) - at:  # (the usual case: within the current piece)
            self._at = at + size
            return piece[at : at + size]
        parts, have = [piece[at:]], len(piece) - at
        self._piece, self._at = b"", 0
        while size < 0 or have < size:
            piece = self._next()
            if not piece:
                break
            if size >= 0 and have + len(piece) > size:  # the rest of this piece is for later reads
                self._piece, self._at = piece, size - have
                parts.append(piece[: size - have])
                break
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)


def stage(
    source: HasBulk,
    entries: Sequence[RemoteEntry],
    tmp: Path,
    progress: Progress,
    jobs: int,
    stop: threading.Event,
    checksum: Callable[[RemoteEntry], str | None],
    abort: threading.Event | None = None,
) -> Staged:
    """Fetch the source's bulk batches of ``entries`` (``jobs`` tars at once) into part files
    in ``tmp``; ``checksum(entry)`` gives the hash to check a member against (None: size
    only). Once ``stop`` is set no tar starts; once ``abort`` is (default: ``stop``) those
    under way end at their next member. Never raises for a batch: what it did not deliver
    is simply not in the result."""
    abort = abort or stop
    staged = Staged(stem=f"{tmp}/bulk-{uuid.uuid4().hex}")
    batches = source.bulk_batches(entries)
    if not batches:
        return staged
    staged.batches = len(batches)
    lock = threading.Lock()
    turn = _Turn()

    def one(batch: BulkBatch) -> None:
        if stop.is_set():
            return
        try:
            _fetch_batch(source, batch, progress, abort, checksum, staged, lock, turn)
        except (TransferError, OSError, tarfile.TarError, EOFError, ValueError) as exc:
            with lock:
                staged.problems.append(f"{exc.__class__.__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(batches))), thread_name_prefix="bulk") as pool:
        try:
            list(pool.map(one, batches))
        except BaseException:  # an exception out of the run: the tars under way stop at their next member
            stop.set()
            abort.set()
            raise
    staged.slow_fs = turn.slow
    return staged


def _fetch_batch(
    source: HasBulk,
    batch: BulkBatch,
    progress: Progress,
    stop: threading.Event,
    checksum: Callable[[RemoteEntry], str | None],
    staged: Staged,
    lock: threading.Lock,
    turn: _Turn,
) -> None:
    # the hashes first (a failed look-up raises: the whole batch goes file by file, retried there)
    expected = {key: checksum(entry) for key, entry in batch.members.items()}
    seen = matched = 0
    with source.open_bulk(batch) as chunks:
        if chunks is None:
            return
        with turn.lock, tarfile.open(fileobj=_Reader(chunks, turn.lock), mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                archive.members = []  # (stream mode keeps every member read: 5,000 a tar, never looked at again)
                if stop.is_set():
                    return
                seen += 1
                entry = batch.members.get(member.name) if member.isreg() else None
                if entry is None or entry.key in staged.parts:
                    if member.isreg() and member.size == 0 and member.name.endswith(".MISSING") and member.name[:-8] in batch.members:
                        with lock:
                            staged.missing += 1
                        matched += 1
                    elif not matched and seen >= GIVE_UP_AFTER:
                        return  # not one path as expected: the rest goes file by file
                    continue
                matched += 1
                number = next(staged.numbers)
                part = f"{staged.stem}-{number}.part"
                # a member of another size is not written at all (it is read past)
                ok = (
                    _write_member(archive, member, part, entry, expected[member.name], progress, turn)
                    if member.size == entry.size
                    else None
                )
                with lock:
                    if ok is None:
                        staged.rejected += 1
                    else:
                        staged.parts[entry.key] = number << 1 | ok


class _Turn:
    """Whose turn it is to read and write tar members: one tar's at a time, the others
    waiting for it or for their bytes (which still arrive for all tars at once).

    Each member costs a few system calls (open, write, close), and every system call lets
    another thread take the GIL; with several threads each writing members, those hand-offs
    cost more than the work itself when the file system answers in microseconds (measured:
    4 tars whose bytes are all at hand, 2.5x slower at once than one after the other). On a
    file system that answers slowly (NFS, a busy parallel file system: hundreds of
    microseconds a call), the calls are better made side by side, so :meth:`io` times each
    call and, while the recent ones took more than :data:`SLOW_IO` on average, makes them
    without the turn."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.slow = False
        self._mean = 0.0  # seconds a file-system call took lately (a moving average)

    def io(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` (a file-system call), held by the turn holder; without the turn
        while the file system is slow."""
        slow = self.slow
        if slow:
            self.lock.release()
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._mean += (time.perf_counter() - started - self._mean) / 16  # (threads may race here: an estimate)
            self.slow = self._mean > SLOW_IO
            if slow:
                self.lock.acquire()


def _write_member(
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    part: str,
    entry: RemoteEntry,
    checksum: str | None,
    progress: Progress,
    turn: _Turn,
) -> bool | None:
    """Write one member to ``part`` and check it: True (hash checked), False (size only),
    None (wrong size or hash: ``part`` removed)."""
    digest = hasher(checksum)
    received = 0
    source = archive.extractfile(member)
    if source is None:
        return None
    io = turn.io
    fd = io(os.open, part, _CREATE, 0o666)
    try:
        try:
            # never more than the member has left: a read of CHUNK bytes allocates CHUNK
            # bytes first, and for the many small members of a tar that allocation and its
            # release, in several threads at once, cost more system time than the transfer
            while received < member.size:
                data = source.read(min(CHUNK, member.size - received))
                if not data:
                    break
                io(write_all, fd, data)
                received += len(data)
                if digest is not None:
                    digest.update(data)
        finally:
            io(os.close, fd)
        good = received == entry.size and (digest is None or checksum is None or digest.hexdigest() == checksum.split(":", 1)[1])
    except BaseException:
        os.unlink(part)
        raise
    if not good:
        os.unlink(part)
        return None
    progress.advance(received)
    return digest is not None
