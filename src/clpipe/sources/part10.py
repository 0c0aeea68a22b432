"""DICOM Part-10 files (PS3.10), read and written without pydicom on the fast paths: the
one home of the file format for every DICOM source.

Reading (the ``file://`` source's headers, a DICOMweb part's SOP Instance UID): a
:class:`Window` over a file (read on demand with ``pread``) or over bytes in memory, and
:func:`walk`, which collects the raw values of the wanted top-level elements up to a tag,
skipping everything else (sequences and encapsulated data included) without decoding it.
A file the walker cannot follow (big endian, deflated, an unknown VR, sequences nested
deeper than :data:`MAX_DEPTH`) raises :class:`Unfollowable`: the caller lets pydicom read it.

Writing (the DIMSE source's received datasets): :func:`part10_header`, the preamble,
``DICM`` and the File Meta Information put before a dataset's bytes as they arrived (its
pixel data never decoded).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from functools import lru_cache

from .. import __version__

PREAMBLE = b"\x00" * 128 + b"DICM"

#: clpipe's implementation class UID and version name (file meta, and the DIMSE association)
IMPLEMENTATION_UID = "2.25.210931605554583860529104387413997179620"
IMPLEMENTATION_VERSION = f"CLPIPE_{__version__}"[:16]

# -- the File Meta Information elements (group 0002, PS3.10 7.1) -----------------------------
META_VERSION = 0x00020001  # File Meta Information Version
MEDIA_SOP_CLASS_UID = 0x00020002  # Media Storage SOP Class UID
MEDIA_SOP_INSTANCE_UID = 0x00020003  # Media Storage SOP Instance UID
TRANSFER_SYNTAX_UID = 0x00020010
IMPLEMENTATION_CLASS_UID = 0x00020012
IMPLEMENTATION_VERSION_NAME = 0x00020013
SOURCE_APPLICATION_ENTITY_TITLE = 0x00020016
META_END = 0x0002FFFF  # the last tag of the file meta

# -- transfer syntaxes the reader tells apart --------------------------------------------------
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")

# -- encoding ----------------------------------------------------------------------------------
FIRST_READ = 8192  # the first block of every file; headers rarely need more
MAX_DEPTH = 16  # nested sequences deeper than this: let pydicom read the file
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
VRS = LONG_VRS | frozenset(map(str.encode, "AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()))
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

_HEADER = struct.Struct("<HHL")  # group, element, 32-bit length (implicit VR; item tags)
_EXPLICIT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_LENGTH = struct.Struct("<L")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class Unfollowable(Exception):
    """The fast reader cannot follow this file's encoding; pydicom reads it instead."""


# ----------------------------------------------------------------------------- reading


class Window:
    """A file read on demand through a small window: most headers fit the first block,
    and a long value that is not needed is skipped, never read."""

    __slots__ = ("fd", "base", "data")

    def __init__(self, fd: int, first: bytes):
        self.fd, self.base, self.data = fd, 0, first

    def at(self, pos: int, n: int) -> tuple[bytes, int]:
        """(buffer, offset) holding bytes ``pos .. pos+n``; EOFError past the end."""
        off = pos - self.base
        if off < 0 or off + n > len(self.data):
            if self.fd < 0:  # bytes in memory: there is nothing more
                raise EOFError
            self.base, self.data, off = pos, os.pread(self.fd, max(n, FIRST_READ), pos), 0
            if len(self.data) < n:
                raise EOFError
        return self.data, off

    def read(self, pos: int, n: int) -> bytes:
        data, off = self.at(pos, n)
        return data[off : off + n]


def _element(win: Window, pos: int, explicit: bool, last: int = 0xFFFFFFFF) -> tuple[int, int, int, bytes]:
    """(tag, value position, value length, VR or b"") of the element at ``pos``; only the
    tag when it is past ``last`` (what follows may be in another encoding)."""
    data, off = win.at(pos, 8)
    if not explicit:
        group, elem, length = _HEADER.unpack_from(data, off)
        return group << 16 | elem, pos + 8, length, b""
    group, elem, vr, length = _EXPLICIT.unpack_from(data, off)
    tag = group << 16 | elem
    if tag > last:
        return tag, pos, 0, b""
    if tag in (ITEM, ITEM_END, SEQUENCE_END):  # item tags carry a 32-bit length and no VR
        return tag, pos + 8, _HEADER.unpack_from(data, off)[2], b""
    if vr in LONG_VRS:
        data, off = win.at(pos + 8, 4)
        return tag, pos + 12, _LENGTH.unpack_from(data, off)[0], vr
    if vr not in VRS:
        raise Unfollowable(f"unknown VR {vr!r}")
    return tag, pos + 8, length, vr


def _skip_items(win: Window, pos: int, explicit: bool, depth: int) -> int:
    """Past an undefined-length value (a sequence, or encapsulated data): its items, then
    the sequence delimiter. Returns the position after it."""
    if depth > MAX_DEPTH:
        raise Unfollowable("sequences nested too deep")
    while True:
        data, off = win.at(pos, 8)
        group, elem, length = _HEADER.unpack_from(data, off)
        tag = group << 16 | elem
        if tag == SEQUENCE_END:
            return pos + 8
        if tag != ITEM:
            raise Unfollowable(f"({group:04X},{elem:04X}) where a sequence item was expected")
        pos = pos + 8 + length if length != UNDEFINED else _skip_item(win, pos + 8, explicit, depth + 1)


def _skip_item(win: Window, pos: int, explicit: bool, depth: int) -> int:
    """Past the elements of an undefined-length item, up to and past its delimiter."""
    while True:
        tag, vpos, length, vr = _element(win, pos, explicit)
        if tag == ITEM_END:
            return vpos
        pos = vpos + length if length != UNDEFINED else _skip_items(win, vpos, explicit and vr != b"UN", depth + 1)


def _walk_block(data: bytes, pos: int, explicit: bool, last: int, wanted, values: dict) -> tuple[int, int, bool]:
    """The plain part of :func:`walk`, in one loop over the first block: elements of
    defined length, all of it in ``data``. Returns (position, last tag, reached ``last``);
    :func:`walk` goes on from there for everything else."""
    n, previous = len(data), -1
    unpack = _EXPLICIT.unpack_from if explicit else _HEADER.unpack_from
    long_vrs, vrs, length_at = LONG_VRS, VRS, _LENGTH.unpack_from
    while pos + 12 <= n:
        if explicit:
            group, elem, vr, length = unpack(data, pos)
            tag = group << 16 | elem
            if tag > last:
                return pos, previous, True
            if vr in long_vrs:
                length, vpos = length_at(data, pos + 8)[0], pos + 12
            elif vr in vrs:
                vpos = pos + 8
            else:
                break
        else:
            group, elem, length = unpack(data, pos)
            tag, vpos = group << 16 | elem, pos + 8
            if tag > last:
                return pos, previous, True
        end = vpos + length
        if tag <= previous or length == UNDEFINED or end > n and tag in wanted:
            break
        if tag in wanted:
            values[tag] = data[vpos:end]
        pos, previous = end, tag
    return pos, previous, False


def walk(win: Window, pos: int, explicit: bool, last: int, wanted: Iterable[int]) -> tuple[dict[int, bytes], int]:
    """The raw values of the ``wanted`` top-level elements up to tag ``last``, and where it stopped."""
    values: dict[int, bytes] = {}
    previous = -1
    if win.base == 0:
        pos, previous, done = _walk_block(win.data, pos, explicit, last, wanted, values)
        if done:
            return values, pos
    while True:
        try:
            tag, vpos, length, vr = _element(win, pos, explicit, last)
        except EOFError:
            return values, pos  # the file ends before ``last``: what is there counts
        if tag > last:
            return values, pos
        if tag <= previous:  # tags ascend; anything else means this is not what it seemed
            raise Unfollowable("elements out of order")
        previous = tag
        if length == UNDEFINED:
            if tag in wanted:
                raise Unfollowable("an attribute of undefined length")
            pos = _skip_items(win, vpos, explicit and vr != b"UN", 1)  # UN of undefined length holds implicit VR items
            continue
        if tag in wanted:
            values[tag] = win.read(vpos, length)
        pos = vpos + length


def looks_explicit(win: Window, pos: int) -> bool:
    data, off = win.at(pos, 6)
    return data[off + 4 : off + 6] in VRS


def meta_sop_instance_uid(part: bytes) -> str:
    """MediaStorageSOPInstanceUID (0002,0003) from a Part-10 file's meta information, which
    is always Explicit VR Little Endian right after the preamble and ``DICM``; "" when the
    part has no such meta (or no plausible UID in it). Microseconds, where pydicom needs
    ~0.7 ms a file: this is what makes retrieving thousands of small instances cost little
    more than receiving them."""
    if part[128:132] != b"DICM":
        return ""
    try:
        meta, _ = walk(Window(-1, part), 132, True, META_END, (MEDIA_SOP_INSTANCE_UID,))
    except (Unfollowable, EOFError, struct.error):
        return ""
    uid = meta.get(MEDIA_SOP_INSTANCE_UID, b"").decode("ascii", "replace").rstrip("\0 ")
    return uid if _UID.fullmatch(uid) else ""


def dataset_text(data: bytes, tag: int, *, implicit: bool) -> str:
    """The value of the top-level element ``tag`` of an encoded dataset (no file meta,
    little endian) as text without its padding, "" when absent; :class:`Unfollowable`
    when the walker cannot follow the dataset (the caller lets pydicom read it)."""
    try:
        values, _ = walk(Window(-1, data), 0, not implicit, tag, (tag,))
    except struct.error as exc:
        raise Unfollowable(str(exc)) from None
    return values.get(tag, b"").decode("ascii", "replace").rstrip("\0 ")


# ----------------------------------------------------------------------------- writing


def padded(value: str, pad: bytes) -> bytes:
    """A text value in ASCII, padded to an even length with ``pad`` (NUL for UIDs, space
    for other strings)."""
    data = value.encode("ascii", "replace")
    return data + pad if len(data) % 2 else data


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One file meta element (group 0002) in Explicit VR Little Endian."""
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


@lru_cache(maxsize=1)
def _implementation() -> bytes:
    """The file meta elements that name the writer (clpipe): the same for every file."""
    return element(IMPLEMENTATION_CLASS_UID, b"UI", padded(IMPLEMENTATION_UID, b"\x00")) + element(
        IMPLEMENTATION_VERSION_NAME, b"SH", padded(IMPLEMENTATION_VERSION, b" ")
    )


_VERSION = element(META_VERSION, b"OB", b"\x00\x01")  # version 00\01


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str = "") -> bytes:
    """Preamble, ``DICM`` and the File Meta Information for a dataset received over the
    network (the dataset's bytes follow it unchanged)."""
    body = b"".join(
        (
            _VERSION,
            element(MEDIA_SOP_CLASS_UID, b"UI", padded(sop_class, b"\x00")),
            element(MEDIA_SOP_INSTANCE_UID, b"UI", padded(sop_instance, b"\x00")),
            element(TRANSFER_SYNTAX_UID, b"UI", padded(transfer_syntax, b"\x00")),
            _implementation(),
            (element(SOURCE_APPLICATION_ENTITY_TITLE, b"AE", padded(source_aet.strip()[:16], b" ")) if source_aet.strip() else b""),
        )
    )
    return PREAMBLE + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body
