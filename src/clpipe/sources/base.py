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
  a server that transcoded), printed after the run.

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
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

#: one instance of a series as a source gives it: the Part-10 file's bytes, or the path of a local file
Payload = bytes | Path


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
class HasProblems(Protocol):
    """``problems``: what the source holds but could not read, as "path: reason"."""

    @property
    def problems(self) -> Sequence[str]: ...


@runtime_checkable
class HasNotes(Protocol):
    """``notes``: what a user should know about the last listing, one line each."""

    @property
    def notes(self) -> Sequence[str]: ...
