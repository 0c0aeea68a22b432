"""What a source is to the sync engine: the entry type and the source protocols.

A *source* lists its remote items as :class:`RemoteEntry` values and hands out the bytes
of one. What every source has is :class:`Source`; everything else is an *ability*, a
small protocol of its own that the engine discovers at run time with ``isinstance`` (the
protocols are ``runtime_checkable``), as rclone discovers a backend's optional features:

- :class:`HasFiles`: ``open(entry)`` streams one file's bytes (a file, or a zip to unpack);
- :class:`HasInstances`: ``instances(entry)`` yields a DICOM series' instances as
  ``(SOPInstanceUID, bytes or the Path of a local file)``, one file each;
- :class:`HasMembers`: ``members(entry)``, a zip's members, to adopt a folder unpacked
  before (by ``fw sync``, or by a run killed before it journalled);
- :class:`HasChecksum`: ``checksum(entry)``, the server's hash of a file whose listing had
  none, asked just before its download;
- :class:`HasMaxJobs`: ``max_jobs``, the most transfers worth running at once, read after
  the listing (the engine's ``jobs`` stays the ceiling);
- :class:`HasProblems`: ``problems``, what the source holds but could not read ("path:
  reason"); each fails the run, and while there are any no synced file is removed, since
  "gone" may be "could not be read";
- :class:`HasNotes`: ``notes``, what a user should know about the listing (files skipped,
  a server that transcoded), printed after the run;
- :class:`HasBulk`: ``bulk_batches(entries)`` and ``open_bulk(batch)``, many small files in
  one archive (a tar) per batch instead of one request each (``sync/bulk.py``);
- :class:`HasPrefetch`: ``prefetch(entries, jobs)``, what the source can fetch for the
  entries about to be transferred in a few requests, ahead of them (Flywheel: the hashes);
- :class:`HasUniquePaths`: ``unique_paths``, True when the source gave every entry a path
  of its own, named from its whole listing (Flywheel): the engine then keeps the claimed
  paths on disk and builds its guard only for what it fetches (``layout.SpilledClaims``).

The listing is not part of :class:`Source`: what to list takes different arguments for
each kind (a Flywheel project and its filters: ``FlywheelSource.entries``; a DICOM query:
``series(query)``, turned into entries by :func:`clpipe.sources.dicom.entries`), and the
engine only takes the entries, as any iterable. A source raises the transfer errors of
:mod:`clpipe.errors` (:class:`~clpipe.errors.TransientError`, retried;
:class:`~clpipe.errors.PermanentError`, not).

This module imports nothing of the engine, the CLI or the batch executors: sources
depend on it, never the other way round.
"""

from __future__ import annotations

import posixpath
from collections.abc import Generator, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

#: one instance of a series as a source gives it: the Part-10 file's bytes, or the path of a local file
Payload = bytes | Path


@dataclass(frozen=True, slots=True)
class Session:
    """The scan session an entry belongs to, as the dropoff holds it: the folder of the
    session (relative to the dropoff, POSIX; its identity in the sessions file) and the
    subject and session labels as that folder's path has them (what the BIDS step parses
    back with DICOMFormatString), with the labels on the source. One object is shared by
    all the entries of a session."""

    path: str
    subject: str
    session: str
    source_subject: str = ""
    source_session: str = ""


def session_of(path: str, depths: tuple[int, int], source_subject: str, source_session: str, known: dict[str, Session]) -> Session | None:
    """The :class:`Session` of an entry at ``path`` whose layout puts the subject and the
    session at the path components ``depths`` (0-based; the session's is -1 when the layout
    has no session folder: the subject's folder is then the session), one object per
    folder (``known``, kept by the caller for one listing)."""
    subject_at, session_at = depths
    parts = path.split("/")
    last = max(subject_at, session_at)
    if subject_at < 0 or last >= len(parts) - 1:  # no subject folder, or the entry is that folder itself
        return None
    folder = "/".join(parts[: last + 1])
    found = known.get(folder)
    if found is None:
        session = parts[session_at] if session_at >= 0 else ""
        found = known[folder] = Session(folder, parts[subject_at], session, source_subject, source_session)
    return found


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    """One remote item as a source lists it: a file, a zip to unpack, or a DICOM series."""

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
    session: Session | None = None  # the scan session it belongs to (None: a file of no session, e.g. the project's)
    subject: str = ""  # the subject's label on the source (a sharded sync splits by it: sync/shards.py); "": none

    def describe(self) -> str:
        return f"{self.path} ({self.name})" if self.name and self.name != posixpath.basename(self.path) else self.path

    @property
    def signature(self) -> list:
        return [self.size, self.modified, self.checksum or ""] + ([self.version] if self.version else [])


@runtime_checkable
class Source(Protocol):
    """Every source: it lists entries (each kind in its own terms, see above) and is closed
    when the run ends."""

    def close(self) -> None: ...


@runtime_checkable
class HasFiles(Protocol):
    """A source of files: ``open(entry)`` is a context manager yielding the file's bytes
    in pieces as they arrive."""

    def open(self, entry: RemoteEntry) -> AbstractContextManager[Iterator[bytes]]: ...


@runtime_checkable
class HasInstances(Protocol):
    """A source of DICOM series: ``instances(entry)`` is a context manager yielding
    ``(SOPInstanceUID, payload)`` for every instance of the series ``entry``."""

    def instances(self, entry: RemoteEntry) -> AbstractContextManager[Iterator[tuple[str, Payload]]]: ...


@runtime_checkable
class HasManyInstances(Protocol):
    """Several series retrieved from one thread: where ``one_thread`` says it is the better
    way (read after the listing), ``instances_many(entries, jobs)`` retrieves the series
    ``entries`` gives, up to ``jobs`` at once, taking the next one as one ends; it yields
    ``(entry, SOPInstanceUID, payload)`` for each instance, ``(entry, "", None)`` when a
    series ended with all its instances, ``(entry, "", error)`` when it did not, and
    ``(None, "", None)`` now and then while nothing arrives. Closing it abandons the
    series under way (sources/dimse: C-GET on several associations, read as they answer)."""

    @property
    def one_thread(self) -> bool: ...

    def instances_many(
        self, entries: Iterator[RemoteEntry], jobs: int
    ) -> Generator[tuple[RemoteEntry | None, str, Payload | BaseException | None], None, None]: ...


@runtime_checkable
class HasMembers(Protocol):
    """``members(entry)``: (name, size) of each member of the zip ``entry``, or None when
    they cannot be known."""

    def members(self, entry: RemoteEntry) -> list[tuple[str, int]] | None: ...


@runtime_checkable
class HasChecksum(Protocol):
    """``checksum(entry)``: the server's ``algorithm:hex`` of a file whose listing had
    none (None: the server has none); may raise a transfer error."""

    def checksum(self, entry: RemoteEntry) -> str | None: ...


@runtime_checkable
class HasMaxJobs(Protocol):
    """``max_jobs``: the most transfers worth running at once (read after the listing)."""

    @property
    def max_jobs(self) -> int | None: ...


@runtime_checkable
class HasListingCache(Protocol):
    """``cache_listing(folder, write=)``: keep what a listing read in ``folder`` (the
    dropoff's state folder), so the next listing reads only what changed; ``write=False``
    reads it but writes none (a dry run, ``status -refresh``)."""

    def cache_listing(self, folder: Path | str, *, write: bool = True) -> None: ...


@runtime_checkable
class HasTreeStamp(Protocol):
    """``tree_root``: the source is a folder tree on a file system whose every change shows
    in its entries' names, sizes and times, so a run can tell that nothing changed from a
    walk alone (sync/quick.py) without listing it."""

    @property
    def tree_root(self) -> str: ...


@runtime_checkable
class HasUniquePaths(Protocol):
    """``unique_paths``: no two entries of a listing on one local path, and none inside
    another's file or unpacked folder (the names were settled from the whole listing)."""

    @property
    def unique_paths(self) -> bool: ...


@runtime_checkable
class HasProblems(Protocol):
    """``problems``: what the source holds but could not read, as "path: reason"."""

    @property
    def problems(self) -> Sequence[str]: ...


@runtime_checkable
class HasNotes(Protocol):
    """``notes``: what a user should know about the last listing, one line each."""

    @property
    def notes(self) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class BulkBatch:
    """Files a source can send in one archive: ``members`` maps the exact path each has in
    the archive to its entry (only a member with exactly that path is taken for it);
    ``ref`` is what the source needs to ask for the archive."""

    members: dict[str, RemoteEntry]
    ref: object = None


@runtime_checkable
class HasBulk(Protocol):
    """Many small files in few requests: ``bulk_batches(entries)`` groups those of
    ``entries`` worth fetching that way (the others are left out); ``open_bulk(batch)`` is
    a context manager yielding the batch's tar as pieces of bytes as they arrive, or None
    when the server's offer is not worth taking. What a batch does not deliver, whole and
    verified, is downloaded one file at a time."""

    def bulk_batches(self, entries: Sequence[RemoteEntry]) -> list[BulkBatch]: ...

    def open_bulk(self, batch: BulkBatch) -> AbstractContextManager[Iterator[bytes] | None]: ...


@runtime_checkable
class HasPrefetch(Protocol):
    """``prefetch(entries, jobs)``, called once before the transfers of ``entries``: what
    the source can fetch for them in a few requests, ``jobs`` at once (Flywheel: the hashes
    of their containers, a listing per session instead of a request per container). It
    raises nothing: what it could not fetch is asked for as before, entry by entry."""

    def prefetch(self, entries: Sequence[RemoteEntry], jobs: int) -> None: ...
