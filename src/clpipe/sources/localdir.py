"""The ``file://`` source: a scanner's export folder or a mounted network share.

Such folders are untidy: nested folders, files with or without ``.dcm``, text and JSON
files beside the images, the same instance copied under two names, now and then an old
file without the 128-byte preamble. :meth:`FolderSource.series` walks the tree once, reads
the start of every file, keeps what is DICOM, groups it by SeriesInstanceUID and removes
repeated SOPInstanceUIDs; :meth:`FolderSource.instances` then hands the engine each
file's path, and the engine copies it inside the kernel, as ``cp`` does.

Why a reader of its own: a listing competes with ``cp -r``, which copies a 10 kB file in
~60-80 µs. ``pydicom.dcmread(stop_before_pixels=True, specific_tags=...)`` needs ~250 µs
a file just to read the header (it builds a data set of every element up to the pixels),
so headers are read by :func:`read_header`, a small walker that stops after the last
attribute it needs (0020,0011), keeps the raw bytes of those few values and decodes them
only for the first file of each series: ~20 µs a file, one 8 KiB read. Anything it
cannot follow (big endian, deflated, other oddities) goes to pydicom's ``read_partial``
with the same stopping point, and both paths decode values with the same code, so they
agree (the tests check it on every file of the test tree).

Incremental: a series' version is a fingerprint of its files (SOPInstanceUID, size,
mtime), so an unchanged series is skipped, and one whose files changed, or that gained
or lost files, is copied again.

Re-syncs: the engine gives the source its dropoff's state folder
(:meth:`FolderSource.cache_listing`), where a :class:`ListingCache` keeps what each file's
header gave, keyed by the file's (size, mtime, inode, ctime): the next listing calls
``stat`` on every file, as ``rsync`` does, and opens only those whose stamp changed.
No pydicom is imported unless a header needs it.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import itertools
import json
import os
import stat
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, PreflightError, TransientError
from ..layout import STATE_DIR
from .dicom import DicomQuery, Series, SourceSettings, SourceURL, cpus
from .part10 import (
    DEFLATED,
    EXPLICIT_BE,
    FIRST_READ,
    IMPLICIT_LE,
    MEDIA_SOP_INSTANCE_UID,
    TRANSFER_SYNTAX_UID,
    Unfollowable,
    Window,
    looks_explicit,
    walk,
)

# The attributes a series needs (and the instance's own UID), with the VR that decides how
# the value becomes text; implicit VR files carry no VR, explicit ones may say UN.
ATTRIBUTES: dict[int, tuple[str, str]] = {
    0x00080005: ("SpecificCharacterSet", "CS"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080020: ("StudyDate", "DA"),
    0x00080030: ("StudyTime", "TM"),
    0x00080050: ("AccessionNumber", "SH"),
    0x00080060: ("Modality", "CS"),
    0x00081030: ("StudyDescription", "LO"),
    0x0008103E: ("SeriesDescription", "LO"),
    0x00100010: ("PatientName", "PN"),
    0x00100020: ("PatientID", "LO"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00200011: ("SeriesNumber", "IS"),
}
LAST_TAG = max(ATTRIBUTES)  # nothing after (0020,0011) is read
SERIES_KEYS = tuple(name for name, _ in ATTRIBUTES.values() if name not in ("SpecificCharacterSet", "SOPInstanceUID"))
MAX_EXAMPLES = 3  # file names quoted in a note
PROBE = 128  # files read one by one to see whether reading headers waits on I/O
STAT_CHUNK = 256  # files stat-ed by one task when a share's stat waits (ListingCache._stats)
NOT_DICOM_NAMES = frozenset({"DICOMDIR"})  # the media index: no series of its own, and can be large


# ----------------------------------------------------------------------------- headers


class Header:
    """What the listing keeps of one DICOM file. ``attrs`` (SERIES_KEYS -> text, "" when
    absent) is decoded on first use: only the first file of each series needs it, and
    decoding is a third of the time spent on a header."""

    __slots__ = ("sop_uid", "series_uid", "size", "mtime_ns", "_values", "_attrs")

    def __init__(self, sop_uid: str, series_uid: str, size: int, mtime_ns: int, values: dict[int, bytes]):
        self.sop_uid, self.series_uid, self.size, self.mtime_ns = sop_uid, series_uid, size, mtime_ns
        self._values = values
        self._attrs: dict[str, str] | None = None

    @property
    def attrs(self) -> dict[str, str]:
        if self._attrs is None:
            values = self._values
            charset = _encodings(values.get(0x00080005))
            attrs = {}
            for tag, name, vr in _SERIES_ATTRIBUTES:
                raw = values.get(tag)
                attrs[name] = "" if not raw else _uid(raw) if vr == "UI" else _decode(raw, vr, charset)
            self._attrs = attrs
        return self._attrs

    def _key(self) -> tuple:
        return self.sop_uid, self.series_uid, self.size, self.mtime_ns, self.attrs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Header) and self._key() == other._key()

    def __repr__(self) -> str:
        return f"Header{self._key()!r}"


def _fast_values(fd: int, first: bytes) -> dict[int, bytes] | None:
    """Raw values of ATTRIBUTES (plus the file meta's SOP instance UID) from a Part 10
    file or a bare little-endian data set; ``None`` when the file is not DICOM."""
    win = Window(fd, first)
    pos = 132 if first[128:132] == b"DICM" else 0
    if len(first) < pos + 8:
        return None
    group = first[pos] | first[pos + 1] << 8
    transfer_syntax = None
    meta: dict[int, bytes] = {}
    if group == 0x0002:
        meta, pos = walk(win, pos, True, 0x0002FFFF, (TRANSFER_SYNTAX_UID, MEDIA_SOP_INSTANCE_UID))
        transfer_syntax = _uid(meta.get(TRANSFER_SYNTAX_UID, b"")) or None
    elif pos == 0 and group != 0x0008:  # a bare data set starts with group 0008 (SOP Common)
        return None
    if transfer_syntax == IMPLICIT_LE:
        explicit = False
    elif transfer_syntax == EXPLICIT_BE or transfer_syntax in DEFLATED:
        raise Unfollowable(f"transfer syntax {transfer_syntax}")
    elif transfer_syntax is None:
        try:
            explicit = looks_explicit(win, pos)
        except EOFError:
            return None
    else:
        explicit = True  # explicit VR little endian, and every compressed syntax
    values, _ = walk(win, pos, explicit, LAST_TAG, ATTRIBUTES)
    if MEDIA_SOP_INSTANCE_UID in meta:
        values.setdefault(0x00080018, meta[MEDIA_SOP_INSTANCE_UID])
    return values


def _pydicom_values(path: str) -> dict[int, bytes]:
    """The same raw values, read by pydicom (for what the fast reader cannot follow). The
    raw elements are taken as they are, so the text is made by the same code as above."""
    from pydicom.filereader import read_partial

    with open(path, "rb") as fh:
        ds = read_partial(fh, stop_when=lambda tag, vr, length: tag > LAST_TAG, force=True, specific_tags=list(ATTRIBUTES))
    values = {}
    for tag in ATTRIBUTES:
        if tag in ds:
            raw = ds.get_item(tag)
            value = getattr(raw, "value", None)
            if isinstance(value, str):  # pydicom has already decoded Specific Character Set
                value = value.encode("ascii", "replace")
            elif value is not None and not isinstance(value, bytes):  # ... or as a MultiValue
                value = "\\".join(map(str, value)).encode("ascii", "replace")
            values[tag] = value or b""
    sop = ds.file_meta.get("MediaStorageSOPInstanceUID") if getattr(ds, "file_meta", None) is not None else None
    if sop and 0x00080018 not in values:
        values[0x00080018] = str(sop).encode("ascii", "replace")
    return values


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").lstrip(b" ").decode("ascii", "replace")


def _encodings(raw: bytes | None) -> tuple[str, ...]:
    if not raw:
        return ()
    terms = [t.strip() for t in raw.decode("ascii", "replace").split("\\")]
    return tuple(terms) if any(terms) else ()


# Character sets that need neither pydicom nor its import (~0.3 s): no code extensions.
# No Specific Character Set: pydicom decodes non-ASCII bytes as ISO 8859-1, so do we.
_SINGLE_BYTE_OR_UTF8 = {(): "latin_1", ("ISO_IR 6",): "latin_1", ("ISO_IR 100",): "latin_1", ("ISO_IR 192",): "utf_8"}
_PYTHON_ENCODINGS: dict[tuple[str, ...], list[str]] = {}


def _decode(raw: bytes, vr: str, charset: tuple[str, ...]) -> str:
    """A value as text, as pydicom would decode it (Specific Character Set honoured), with
    leading and trailing spaces removed: they are padding in every VR read here."""
    raw = raw.rstrip(b"\x00 ")
    if raw.isascii() and b"\x1b" not in raw:  # the common case: no character set involved
        return raw.decode("ascii").strip()
    codec = _SINGLE_BYTE_OR_UTF8.get(charset)
    if codec:  # no code extensions possible: Python's codec is what pydicom would use
        return raw.decode(codec, "replace").strip()
    from pydicom.charset import convert_encodings, decode_bytes
    from pydicom.valuerep import PN_DELIMS, TEXT_VR_DELIMS

    encodings = _PYTHON_ENCODINGS.get(charset)
    if encodings is None:
        encodings = _PYTHON_ENCODINGS[charset] = convert_encodings(list(charset) or None)
    if vr == "PN":
        text = "=".join(decode_bytes(part, encodings, PN_DELIMS) for part in raw.split(b"="))
    else:
        text = decode_bytes(raw, encodings, TEXT_VR_DELIMS)
    return text.strip()


def header_from_values(values: dict[int, bytes], size: int, mtime_ns: int) -> Header | None:
    """A :class:`Header`, or ``None`` when the file names no instance or no series (a
    DICOMDIR, a file that only looked like DICOM)."""
    sop = _uid(values.get(0x00080018, b""))
    series = _uid(values.get(0x0020000E, b""))
    if not sop or not series or not _plausible_uid(sop) or not _plausible_uid(series):
        return None
    return Header(sop, series, size, mtime_ns, values)


_SERIES_ATTRIBUTES = [(tag, name, vr) for tag, (name, vr) in ATTRIBUTES.items() if name in SERIES_KEYS]


def _plausible_uid(uid: str) -> bool:
    return len(uid) <= 64 and not uid.strip("0123456789.")


def read_header(path: str, *, fast: bool = True) -> Header | None:
    """The header of one file, or ``None`` when it is not a DICOM instance. ``OSError``
    when it cannot be read. ``fast=False`` makes pydicom walk it (for the tests)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        first = os.read(fd, FIRST_READ)
        try:
            if not fast:
                raise Unfollowable("asked for pydicom")
            values = _fast_values(fd, first)
        except (Unfollowable, EOFError, struct.error):  # it looked like DICOM, but not one the walker follows
            values = _pydicom_or_none(path)
    finally:
        os.close(fd)
    return None if values is None else header_from_values(values, st.st_size, st.st_mtime_ns)


_PYDICOM = threading.Lock()


def _pydicom_or_none(path: str) -> dict[int, bytes] | None:
    """pydicom's reading, without its warnings: a file that only looks like DICOM makes
    pydicom warn about every garbage "character set" it meets. (``catch_warnings`` is
    process-wide, hence the lock; this path is rare.)"""
    with _PYDICOM, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _pydicom_values(path)
        except OSError:
            raise
        except Exception:  # pydicom could not make sense of it either: not DICOM
            return None


# ----------------------------------------------------------------------------- the tree


@dataclass
class FolderStats:
    """What the listing met, for the notes the run prints."""

    files: int = 0
    instances: int = 0
    not_dicom: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "path: reason"
    linked_folders: list[str] = field(default_factory=list)
    dropoffs: list[str] = field(default_factory=list)
    cached: int = 0  # files whose header came from the listing cache (not opened)

    def notes(self, root: Path) -> list[str]:
        out = []

        def eg(items: list[str]) -> str:
            return ", ".join(items[:MAX_EXAMPLES]) + (", ..." if len(items) > MAX_EXAMPLES else "")

        if not self.files:
            out.append(f"{root} holds no files at all; if it is a network share, is it mounted?")
        if self.not_dicom:
            out.append(f"skipped {len(self.not_dicom)} files that are not DICOM instances (e.g. {eg(self.not_dicom)})")
        if self.duplicates:
            out.append(
                f"ignored {len(self.duplicates)} files that repeat an instance found in another file "
                f"(same SOPInstanceUID; e.g. {eg(self.duplicates)})"
            )
        if self.unreadable:
            out.append(
                f"could not read {len(self.unreadable)} files, so the run fails: they may be DICOM; give the "
                f"user running the sync read permission, or move them out of the folder (e.g. {eg(self.unreadable)})"
            )
        if self.linked_folders:
            out.append(
                f"did not follow {len(self.linked_folders)} symlinked folders (e.g. {eg(self.linked_folders)}); "
                "point SourceURL at the real folder to include them"
            )
        if self.dropoffs:
            out.append(f"skipped {len(self.dropoffs)} clpipe dropoff folders inside the source (e.g. {eg(self.dropoffs)})")
        return out


def _check_folder(root: Path) -> None:
    """One clear error for a source folder that cannot be listed."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise PreflightError(
            f"the source folder {root} does not exist; if it is a network share, mount it "
            "(and check the path in SourceURL, file:///path/to/folder)"
        ) from None
    except PermissionError:
        raise PreflightError(
            f"cannot reach the source folder {root}: permission denied on a folder above it; "
            "ask for read and execute (x) permission on every folder of the path"
        ) from None
    except OSError as exc:
        raise PreflightError(
            f"cannot reach the source folder {root}: {exc.strerror}; is the share mounted and the server reachable?"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"SourceURL: {root} is a file, not a folder; file:// must name the folder that holds "
            "the DICOM files (it is searched with its subfolders)"
        )
    try:
        with os.scandir(root):
            pass
    except PermissionError:
        raise PreflightError(
            f"cannot list the source folder {root}: permission denied; the user running the sync "
            "needs read and execute (r-x) permission on it and its subfolders"
        ) from None
    except OSError as exc:
        raise PreflightError(
            f"cannot list the source folder {root}: {exc.strerror}; is the share mounted and the server reachable?"
        ) from None


def walk_files(root: str, stats: FolderStats) -> list[str]:
    """Every candidate file under ``root``, in path order (names sorted in each folder,
    depth first), without hidden files and folders (``.clpipe-sync``, ``._*`` AppleDouble,
    ``.DS_Store``), symlinked folders (they may lead out of the tree or in circles) and
    folders that are a clpipe dropoff (a copy of what is synced must not be synced again)."""
    files: list[str] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(((e.name, e) for e in it if not e.name.startswith(".")), key=lambda x: x[0])
        except OSError as exc:
            stats.unreadable.append(f"{folder}/: {exc.strerror}")
            continue
        subfolders = []
        for name, entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(entry.path)
                elif entry.is_dir():
                    stats.linked_folders.append(entry.path)
                elif entry.is_file():
                    if name in NOT_DICOM_NAMES:
                        stats.files += 1
                        stats.not_dicom.append(entry.path)
                    else:
                        files.append(entry.path)
                elif entry.is_symlink():
                    stats.unreadable.append(f"{entry.path}: a broken symbolic link")
            except OSError as exc:
                stats.unreadable.append(f"{entry.path}: {exc.strerror}")
        for sub in reversed(subfolders):
            if os.path.isdir(os.path.join(sub, STATE_DIR)):
                stats.dropoffs.append(sub)
            else:
                stack.append(sub)
    stats.files += len(files)
    return files


def _read_or_note(path: str) -> Header | None | str:
    try:
        return read_header(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"


def read_headers(files: list[str], jobs: int, on_probe=None) -> Iterator[tuple[str, Header | None | str]]:
    """(path, header, or why it could not be read) for every file, in order.

    Reading a header is ~20 µs of Python on a local disk, where threads only add GIL
    hand-overs (measured: 4 threads 30-100% slower). On a network share each open and read
    waits for the server instead, and threads overlap those waits. So the first PROBE
    files are read in this thread, timing wall clock against CPU; when they mostly
    waited, the rest is read by ``jobs`` threads. ``on_probe(waits)`` is told the verdict."""
    waited = busy = 0.0
    for path in files[:PROBE]:
        wall, cpu = time.perf_counter(), time.thread_time()
        header = _read_or_note(path)
        busy += time.thread_time() - cpu
        waited += time.perf_counter() - wall
        yield path, header
    waits = waited - busy >= busy
    if on_probe is not None:
        on_probe(waits)
    rest = files[PROBE:]
    if jobs <= 1 or not rest or not waits:
        for path in rest:
            yield path, _read_or_note(path)
        return
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="dicom-headers") as pool:
        yield from zip(rest, pool.map(_read_or_note, rest, chunksize=32), strict=True)


def _vanished(path: str, exc: OSError) -> TransientError:
    reason = "it is gone" if isinstance(exc, FileNotFoundError) else f"it cannot be read ({exc.strerror or exc})"
    return TransientError(
        f"{path}: {reason}, though it was there when the folder was listed; was it moved or deleted, or the share unmounted?"
    )


# ----------------------------------------------------------------------------- the listing cache

LISTING_CACHE = "folder-listing"  # in the dropoff's state folder (given by the engine: cache_listing)
CACHE_MAGIC = b"clpipe folder listing 1"  # and the SHA-1 of the rest: a damaged file is ignored
CACHED_TAGS = tuple(tag for tag in ATTRIBUTES if tag != 0x00080018)  # a series' values; the instance's UID is per file
RACY_NS = 2_000_000_000  # a file changed this recently may change again within its timestamp's granularity: not kept
_NOT_DICOM = "-"


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _stat_by_folder(paths: list[str]) -> Iterator[os.stat_result | None]:
    """``_stat_or_none`` of each path, each folder of consecutive paths opened once and
    its files looked up in it (the walk gives a folder's files together): the folders'
    path is not walked again for every file."""
    current, fd = None, -1
    try:
        for path in paths:
            folder, _, name = path.rpartition("/")
            if folder != current:
                if fd >= 0:
                    os.close(fd)
                current, fd = folder, -1
                with suppress(OSError):
                    fd = os.open(folder or "/", os.O_RDONLY | os.O_DIRECTORY)
            if fd < 0:
                yield _stat_or_none(path)
                continue
            try:
                yield os.stat(name, dir_fd=fd)
            except OSError:
                yield None
    finally:
        if fd >= 0:
            os.close(fd)


class ListingCache:
    """What the last listing read of each file, so that a file whose (size, mtime, inode,
    ctime) did not change is not opened again: its SOPInstanceUID and the raw values of
    the series' attributes (each distinct set once), or "not DICOM".

    One text file written whole (temporary file, fsync, rename), streamed: a header line
    with the format and the SHA-1 of the rest, one line per file (path relative to the
    folder, size, mtime_ns, inode, ctime_ns, SOPInstanceUID, index of its values; ``-``:
    not DICOM), then a JSON line (the source folder, the tags, the sets of values, the
    last probe's verdict). It is a speed-up only: one that is missing, damaged, of another
    version or of another folder is ignored (and rewritten); a file is read again whenever
    any of the four changed; a file changed less than RACY_NS before it was looked at is
    not kept (a second change within the same timestamp would not show); files that could
    not be read are never kept; nothing is written when nothing changed, or when ``write``
    is false (a dry run)."""

    def __init__(self, path: Path, root: str, write: bool):
        self.path, self.root, self.write = path, root, write
        self._old: dict[str, str] = {}  # relative path -> "size\tmtime\tino\tctime\tsop\tindex"
        self._table: list[tuple[str, dict[int, bytes]]] = []  # index -> (SeriesInstanceUID, raw values)
        self._raw: list[list] = []  # index -> the values as stored (latin-1 text or None per CACHED_TAGS)
        self.waits: bool | None = None  # the last probe's verdict (reading waits on I/O)
        self.valid = False
        self.hits = self.reads = 0
        self._new_raw: dict[tuple, int] = {}  # the sets of values of the cache being made -> their index

    def load(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError:
            return
        try:
            head, _, body = data.partition(b"\n")
            magic, _, digest = head.rpartition(b" ")
            if magic != CACHE_MAGIC or digest.decode("ascii") != hashlib.sha1(body).hexdigest():
                return
            rows, _, meta_line = body.decode("utf-8", "surrogateescape").rstrip("\n").rpartition("\n")
            meta = json.loads(meta_line)
            if meta.get("root") != self.root or meta.get("tags") != list(CACHED_TAGS):
                return
            raw, table = meta["values"], []
            for stored in raw:
                values = {tag: v.encode("latin_1") for tag, v in zip(CACHED_TAGS, stored, strict=True) if v is not None}
                table.append((_uid(values.get(0x0020000E, b"")), values))
            old = dict(line.split("\t", 1) for line in rows.split("\n") if line)
            waits = meta.get("waits")
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeError):
            return
        self._old, self._table, self._raw, self.valid = old, table, raw, True
        self.waits = waits if isinstance(waits, bool) else None

    def headers(self, files: list[str], jobs: int, on_probe) -> Iterator[tuple[str, Header | None | str]]:
        """As :func:`read_headers`, the files whose stamp is the cached one served from the
        cache; only the others are read. The new cache is written when the last is given."""
        prefix = self.root if self.root.endswith("/") else self.root + "/"
        old, table = self._old, self._table
        recent = time.time_ns() - RACY_NS
        results: list = [None] * len(files)  # Header | None (cached) or the stamp to keep after a read ("" never kept)
        hit = [False] * len(files)
        kept: list[tuple[int, str, str]] = []  # (position, relative path, stored line's rest): the new cache, in order
        misses: list[str] = []
        skip, get, keep = len(prefix), old.get, kept.append  # (the loop runs once per file)
        for i, (path, st) in enumerate(zip(files, self._stats(files, jobs), strict=True)):
            rel = path[skip:]
            if st is None:  # read_header says why
                results[i] = ""
                misses.append(path)
                continue
            stamp = f"{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\t{st.st_ctime_ns}\t"
            line = get(rel)
            if line is not None and line.startswith(stamp):
                sop, _, index = line[len(stamp) :].partition("\t")
                if index == _NOT_DICOM:
                    results[i] = None
                elif index.isascii() and index.isdigit() and int(index) < len(table):
                    series_uid, values = table[int(index)]
                    results[i] = Header(sop, series_uid, st.st_size, st.st_mtime_ns, values)
                else:  # not a line this code wrote: the file is read
                    line = None
                if line is not None:
                    hit[i] = True
                    keep((i, rel, line))
                    continue
            fresh = max(st.st_mtime_ns, st.st_ctime_ns) >= recent or "\t" in rel or "\n" in rel
            results[i] = "" if fresh else stamp
            misses.append(path)
        self.hits, self.reads = len(kept), len(misses)
        changed = not self.valid or len(kept) != len(old)
        judge = len(misses) >= PROBE or self.waits is None  # enough files to read to judge whether reading waits
        verdict: list[bool] = []

        def probed(waits: bool) -> None:
            verdict.append(waits)
            if judge and on_probe is not None:
                on_probe(waits)

        if not judge and on_probe is not None and self.waits is not None:
            on_probe(self.waits)  # too few files to read to judge: the last run's verdict stands
        read = read_headers(misses, jobs, probed) if misses else iter(())
        added: list[tuple[int, str]] = []  # (position, the new line) of each file read now
        self._new_raw = {}
        by_bytes: dict[tuple, str] = {}  # a set of raw values read now -> its index in the new cache
        for i, path in enumerate(files):
            if hit[i]:
                yield path, results[i]
                continue
            got, header = next(read)
            stamp, results[i] = results[i], None
            if stamp and not isinstance(header, str):
                changed = True
                if not self.write:  # a dry run: nothing to write
                    pass
                elif header is None:
                    added.append((i, f"{path[skip:]}\t{stamp}\t{_NOT_DICOM}\n"))
                else:  # the line made now: the header (and its values) are not kept for the save
                    raw = tuple(map(header._values.get, CACHED_TAGS))
                    number: str | None = by_bytes.get(raw)
                    if number is None:
                        number = by_bytes[raw] = self._index_of(tuple(None if v is None else v.decode("latin_1") for v in raw))
                    added.append((i, f"{path[skip:]}\t{stamp}{header.sop_uid}\t{number}\n"))
            yield got, header
        if verdict and len(misses) >= PROBE:
            changed = changed or verdict[0] != self.waits
            self.waits = verdict[0]
        if changed and self.write:
            self._save(kept, added)

    def _stats(self, files: list[str], jobs: int) -> Iterator[os.stat_result | None]:
        """``os.stat`` of each file (None: it cannot be reached). On a share where the last
        listing found that reading waits (each ``stat`` a round trip to the server), by
        ``jobs`` threads, which overlap the waits; on a local disk, in this thread."""
        if not (self.waits and jobs > 1 and len(files) > PROBE):
            return _stat_by_folder(files)
        # one task per STAT_CHUNK files: a task per file (a thread pool's map ignores
        # chunksize) cost more than the stat itself, 18 µs a file
        chunks = [files[i : i + STAT_CHUNK] for i in range(0, len(files), STAT_CHUNK)]
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="dicom-stat") as pool:
            return itertools.chain.from_iterable(list(pool.map(lambda chunk: list(_stat_by_folder(chunk)), chunks)))

    def _index_of(self, stored: tuple) -> str:
        """The index of a set of values (latin-1 text or None per CACHED_TAGS) in the new cache."""
        index = self._new_raw.get(stored)
        if index is None:
            index = self._new_raw[stored] = len(self._new_raw)
        return str(index)

    def _save(self, kept: list[tuple[int, str, str]], added: list[tuple[int, str]]) -> None:
        """The new cache: the lines kept (their values re-numbered) and those read now, in
        the listing's order."""
        by_old: dict[str, str] = {}  # a kept line's index -> the new one

        def kept_lines() -> Iterator[tuple[int, str]]:
            for i, rel, line in kept:
                rest, _, index = line.rpartition("\t")
                if index != _NOT_DICOM:
                    new = by_old.get(index)
                    if new is None:
                        new = by_old[index] = self._index_of(tuple(self._raw[int(index)]))
                    index = new
                yield i, f"{rel}\t{rest}\t{index}\n"

        # streamed (a large folder's cache is never held whole), the checksum filled in at the end
        lines = (line for _, line in heapq.merge(kept_lines(), added, key=lambda row: row[0]))
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")  # shard tasks may race
        try:
            with open(temp, "wb") as out:
                out.write(CACHE_MAGIC + b" " + b"0" * 40 + b"\n")
                digest = hashlib.sha1()
                while batch := "".join(itertools.islice(lines, 4096)):
                    data = batch.encode("utf-8", "surrogateescape")
                    digest.update(data)
                    out.write(data)
                meta = {"root": self.root, "tags": list(CACHED_TAGS), "values": list(self._new_raw), "waits": self.waits}
                data = (json.dumps(meta) + "\n").encode("ascii")
                digest.update(data)
                out.write(data)
                out.seek(len(CACHE_MAGIC) + 1)
                out.write(digest.hexdigest().encode("ascii"))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except (OSError, ValueError):  # cannot be written (a read-only or full dropoff): the next run reads the files
            with suppress(OSError):
                os.unlink(temp)
            return
        self._sweep()

    def _sweep(self) -> None:
        """Remove the temporary files of writers killed before their rename (an hour old:
        no writer takes that long)."""
        prefix, old = f".{self.path.name}.", time.time() - 3600
        with suppress(OSError), os.scandir(self.path.parent) as it:
            for entry in it:
                if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                    with suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_mtime < old:
                            os.unlink(entry.path)


# ----------------------------------------------------------------------------- the source


@dataclass
class _Found:
    attrs: dict
    instances: dict = field(default_factory=dict)  # SOPInstanceUID -> (path, size, mtime_ns)


def fingerprint(instances: dict) -> str:
    """A series' version: its files' (SOPInstanceUID, size, mtime), sorted; any change to
    a file, and any file added or removed, gives another one."""
    text = "".join([f"{uid}\t{size}\t{mtime_ns}\n" for uid, (_, size, mtime_ns) in sorted(instances.items())])
    return f"files:{hashlib.sha1(text.encode()).hexdigest()}"


class FolderSource:
    """A folder of DICOM files (a scanner export, a mounted share), searched with its
    subfolders. ``notes`` and ``stats`` tell what the last listing skipped.

    ``max_jobs`` (read by the engine after the listing): how many series are worth copying
    at once. Copying from a local disk (or the page cache) is CPU work in the kernel
    (creating files, copying pages), so more threads than CPUs only contend (measured on
    2 CPUs: 2 jobs 10-15% faster than 4); from a share whose reads wait on the server,
    all ``jobs`` overlap those waits. The listing's header probe tells which it is."""

    def __init__(self, url: SourceURL, settings: SourceSettings | None = None):
        self.root = Path(url.path)
        self.jobs = max(1, (settings or SourceSettings()).jobs)
        self.max_jobs = self.jobs
        self.stats = FolderStats()
        self.notes: list[str] = []
        self._cache: tuple[Path, bool] | None = None  # (file, write it): see cache_listing
        _check_folder(self.root)

    @classmethod
    def check(cls, url: SourceURL, settings: SourceSettings | None = None) -> None:
        """Before a job is queued: the folder exists and can be listed."""
        _check_folder(Path(url.path))

    @property
    def problems(self) -> list[str]:
        """Files of the folder that could not be read ("path: reason"): they may be DICOM
        instances nobody can check, so each one is a failure of the run, not a note."""
        return list(self.stats.unreadable)

    def cache_listing(self, folder: Path | str, *, write: bool = True) -> None:
        """Keep a :class:`ListingCache` in ``folder`` (the engine gives the dropoff's state
        folder): the next listing opens only the files that changed since this one.
        ``write=False`` (a dry run) reads it but writes none."""
        self._cache = (Path(folder) / LISTING_CACHE, write)

    @property
    def tree_root(self) -> str:
        """The folder walked (a run may tell from its stamp that nothing in it changed:
        sync/quick.py walks it as :func:`walk_files` does)."""
        return str(self.root)

    def _probed(self, waits: bool) -> None:
        self.max_jobs = self.jobs if waits else min(self.jobs, cpus())

    def series(self, query: DicomQuery) -> Iterator[Series]:
        """Every series in the folder that matches ``query``, each once, in the order of
        their first file; at most ``query.limit`` studies."""
        _check_folder(self.root)
        self.stats = stats = FolderStats()
        found: dict[str, _Found] = {}
        files = walk_files(str(self.root), stats)
        if self._cache is None:
            headers = read_headers(files, self.jobs, self._probed)
        else:
            cache = ListingCache(self._cache[0], str(self.root), write=self._cache[1])
            cache.load()
            headers = cache.headers(files, self.jobs, self._probed)
        for path, header in headers:
            if isinstance(header, str):
                stats.unreadable.append(header)
            elif header is None:
                stats.not_dicom.append(path)
            else:
                uid = header.series_uid
                group = found.get(uid)
                if group is None:
                    group = found[uid] = _Found(header.attrs)
                if header.sop_uid in group.instances:
                    stats.duplicates.append(path)
                else:
                    group.instances[header.sop_uid] = (path, header.size, header.mtime_ns)
        stats.instances = sum(len(g.instances) for g in found.values())
        if self._cache is not None:
            stats.cached = cache.hits
        self.notes = stats.notes(self.root)
        studies: set[str] = set()
        for uid, group in found.items():
            attrs = group.attrs
            if not (query.study_matches(attrs) and query.series_matches(attrs)):
                continue
            study = attrs["StudyInstanceUID"] or f"(no StudyInstanceUID, series {uid})"
            if study not in studies:
                if query.limit and len(studies) >= query.limit:
                    continue
                studies.add(study)
            yield Series(
                dict(attrs),
                count=len(group.instances),
                ref=[(sop, path) for sop, (path, _, _) in group.instances.items()],
                version=fingerprint(group.instances),
            )

    @contextmanager
    def instances(self, entry) -> Iterator[Iterator[tuple[str, Path]]]:
        """``(SOPInstanceUID, the file's Path)`` for each file of a series (``entry``: the
        engine's entry whose ``ref`` is the :class:`Series`, or the Series itself). The
        engine copies each file itself, inside the kernel (``copy_file_range``, as ``cp``
        does; see :func:`clpipe.sync.fileio.copy_file`): the bytes never pass through Python,
        and a file is opened once. A file that is gone or unreadable now: ``TransientError``
        naming it (retried: a share that dropped out may come back); an error on the
        dropoff's side (full, read-only) stays the engine's own."""
        series = entry.ref if isinstance(getattr(entry, "ref", None), Series) else entry
        current: list[str] = [""]

        def files() -> Iterator[tuple[str, Path]]:
            for uid, path in series.ref:
                current[0] = path
                yield uid, Path(path)

        try:
            yield files()
        except OSError as exc:  # the engine copying a file
            if (
                not current[0]
                or os.fspath(exc.filename or "") != current[0]
                or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
            ):
                raise  # the dropoff's side (full, read-only): the engine reports it as it is
            if exc.filename2:  # opened both ends, then the copy broke: either side may be the cause
                raise TransientError(
                    f"copying {current[0]} to {exc.filename2} failed ({exc.strerror or exc}); "
                    "check the share the folder is on and the dropoff's filesystem"
                ) from None
            raise _vanished(current[0], exc) from None

    def close(self) -> None:
        """Nothing to release: files are opened and closed one by one."""
