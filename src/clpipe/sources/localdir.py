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
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, PreflightError, TransientError
from ..layout import STATE_DIR
from .dicom import DicomQuery, Series, SourceSettings, SourceURL
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


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _vanished(path: str, exc: OSError) -> TransientError:
    reason = "it is gone" if isinstance(exc, FileNotFoundError) else f"it cannot be read ({exc.strerror or exc})"
    return TransientError(
        f"{path}: {reason}, though it was there when the folder was listed; was it moved or deleted, or the share unmounted?"
    )


# ----------------------------------------------------------------------------- the source


@dataclass
class _Found:
    attrs: dict
    instances: dict = field(default_factory=dict)  # SOPInstanceUID -> (path, size, mtime_ns)


def fingerprint(instances: dict) -> str:
    """A series' version: its files' (SOPInstanceUID, size, mtime), sorted; any change to
    a file, and any file added or removed, gives another one."""
    digest = hashlib.sha1()
    for uid, (_, size, mtime_ns) in sorted(instances.items()):
        digest.update(f"{uid}\t{size}\t{mtime_ns}\n".encode())
    return f"files:{digest.hexdigest()}"


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

    def _probed(self, waits: bool) -> None:
        self.max_jobs = self.jobs if waits else min(self.jobs, _cpus())

    def series(self, query: DicomQuery) -> Iterator[Series]:
        """Every series in the folder that matches ``query``, each once, in the order of
        their first file; at most ``query.limit`` studies."""
        _check_folder(self.root)
        self.stats = stats = FolderStats()
        found: dict[str, _Found] = {}
        for path, header in read_headers(walk_files(str(self.root), stats), self.jobs, self._probed):
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
