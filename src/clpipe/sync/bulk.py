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
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TransferError
from ..sources.base import BulkBatch, HasBulk, RemoteEntry
from .fileio import write_all
from .progress import Progress
from .transfer import hasher

CHUNK = 1 << 20  # bytes of a member read at once
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

    def part(self, code: int) -> tuple[str, bool]:
        """(the staged part file, whether its hash was checked) of a code in :attr:`parts`."""
        return f"{self.stem}-{code >> 1}.part", bool(code & 1)


class _Reader:
    """A read-only file over an iterator of byte pieces, for ``tarfile``'s stream mode."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._buffer = chunks, b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            piece = next(self._chunks, b"")
            if not piece:
                break
            self._buffer += piece
        if size < 0:
            size = len(self._buffer)
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


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

    def one(batch: BulkBatch) -> None:
        if stop.is_set():
            return
        try:
            _fetch_batch(source, batch, progress, abort, checksum, staged, lock)
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
    return staged


def _fetch_batch(
    source: HasBulk,
    batch: BulkBatch,
    progress: Progress,
    stop: threading.Event,
    checksum: Callable[[RemoteEntry], str | None],
    staged: Staged,
    lock: threading.Lock,
) -> None:
    # the hashes first (a failed look-up raises: the whole batch goes file by file, retried there)
    expected = {key: checksum(entry) for key, entry in batch.members.items()}
    seen = matched = 0
    with source.open_bulk(batch) as chunks:
        if chunks is None:
            return
        with tarfile.open(fileobj=_Reader(chunks), mode="r|") as archive:  # type: ignore[call-overload]
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
                ok = _write_member(archive, member, part, entry, expected[member.name], progress) if member.size == entry.size else None
                with lock:
                    if ok is None:
                        staged.rejected += 1
                    else:
                        staged.parts[entry.key] = number << 1 | ok


def _write_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, part: str, entry: RemoteEntry, checksum: str | None, progress: Progress
) -> bool | None:
    """Write one member to ``part`` and check it: True (hash checked), False (size only),
    None (wrong size or hash: ``part`` removed)."""
    digest = hasher(checksum)
    received = 0
    source = archive.extractfile(member)
    if source is None:
        return None
    fd = os.open(part, _CREATE, 0o666)
    try:
        try:
            while True:
                data = source.read(CHUNK)
                if not data:
                    break
                write_all(fd, data)
                received += len(data)
                if digest is not None:
                    digest.update(data)
        finally:
            os.close(fd)
        good = received == entry.size and (digest is None or checksum is None or digest.hexdigest() == checksum.split(":", 1)[1])
    except BaseException:
        os.unlink(part)
        raise
    if not good:
        os.unlink(part)
        return None
    progress.advance(received)
    return digest is not None
