"""Identifiers: the datasets of C-FIND, C-GET and C-MOVE requests and of C-FIND answers
(PS3.4 C.4), encoded and read here without pydicom, whose import (~0.2 s) was most of a
run's start-up. An identifier is a dict of keyword -> text, holding exactly the keys
present in it ("" for an element that is there but empty: universal matching in a
request, "the PACS knows this key but has no value" in an answer).

Only the keys of :data:`KEYS` are written or read (every key the DIMSE source asks for);
an answer's other elements are skipped, never decoded. Text is read as pydicom reads it:
trailing padding removed (leading spaces kept in LO, SH and PN, where they may belong to
the value), in the answer's Specific Character Set. An answer holding non-ASCII text in a
character set other than none, ISO_IR 6, Latin-1 (ISO_IR 100) or UTF-8 (ISO_IR 192), or
one the walker of :mod:`clpipe.sources.part10` cannot follow, is read by pydicom."""

from __future__ import annotations

import io
import struct

from ..part10 import Unfollowable, Window, walk

Identifier = dict[str, str]

#: keyword -> (tag, VR) of every key the DIMSE source writes into a request or reads of an answer
KEYS = {
    "SpecificCharacterSet": (0x00080005, "CS"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "StudyDate": (0x00080020, "DA"),
    "StudyTime": (0x00080030, "TM"),
    "AccessionNumber": (0x00080050, "SH"),
    "QueryRetrieveLevel": (0x00080052, "CS"),
    "Modality": (0x00080060, "CS"),
    "ModalitiesInStudy": (0x00080061, "CS"),
    "StudyDescription": (0x00081030, "LO"),
    "SeriesDescription": (0x0008103E, "LO"),
    "PatientName": (0x00100010, "PN"),
    "PatientID": (0x00100020, "LO"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "SeriesNumber": (0x00200011, "IS"),
    "NumberOfSeriesRelatedInstances": (0x00201209, "IS"),
}
CHARSET = KEYS["SpecificCharacterSet"][0]
UTF8 = "ISO_IR 192"
#: VRs whose leading spaces are value, not padding (PS3.5 6.2): only trailing ones go
LEADING_KEPT = frozenset({"LO", "SH", "PN"})
_BY_TAG = {tag: (keyword, vr) for keyword, (tag, vr) in KEYS.items()}
_LAST = max(_BY_TAG)
#: character sets decoded by Python's own codecs, as pydicom decodes them (no code extensions)
_CODECS = {(): "latin_1", ("ISO_IR 6",): "latin_1", ("ISO_IR 100",): "latin_1", (UTF8,): "utf_8"}
_EXPLICIT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length (every VR of KEYS)
_IMPLICIT = struct.Struct("<HHI")  # group, element, 32-bit length


class Unreadable(Exception):
    """An answer neither the walker nor pydicom can read."""


def encode(identifier: Identifier, implicit: bool) -> bytes:
    """A request's identifier, Little Endian (Implicit or Explicit VR), its elements in tag
    order; text in UTF-8 when its SpecificCharacterSet is ISO_IR 192, else Latin-1 (as
    pydicom writes it), padded to an even length (UIDs with NUL, the rest with a space)."""
    codec = "utf_8" if identifier.get("SpecificCharacterSet", "").strip() == UTF8 else "latin_1"
    out = []
    for tag, vr, value in sorted((*KEYS[keyword], value) for keyword, value in identifier.items()):
        data = value.encode(codec, "replace")
        if len(data) % 2:
            data += b"\x00" if vr == "UI" else b" "
        group, element = tag >> 16, tag & 0xFFFF
        if implicit:
            out.append(_IMPLICIT.pack(group, element, len(data)))
        else:
            out.append(_EXPLICIT.pack(group, element, vr.encode("ascii"), len(data)))
        out.append(data)
    return b"".join(out)


def decode(data: bytes, implicit: bool) -> Identifier:
    """An answer's identifier: the keys of :data:`KEYS` it holds, as text.
    :class:`Unreadable` when neither the walker nor pydicom can read it."""
    try:
        raw, _ = walk(Window(-1, data), 0, not implicit, _LAST, _BY_TAG)
    except (Unfollowable, EOFError, struct.error):
        return _by_pydicom(data, implicit)
    charset = _charset(raw.get(CHARSET))
    codec = _CODECS.get(charset)
    found = {}
    for tag, value in raw.items():
        keyword, vr = _BY_TAG[tag]
        if not value.isascii() or b"\x1b" in value:
            if codec is None:  # code extensions, or a character set Python's codecs do not name alike
                return _by_pydicom(data, implicit)
            text = value.decode(codec, "replace")
        else:
            text = value.decode("ascii")
        found[keyword] = _unpadded(text, vr)
    return found


def _unpadded(text: str, vr: str) -> str:
    """A value without its padding: trailing spaces and NULs of each of its values, and
    leading spaces too where they are padding."""
    if vr in LEADING_KEPT:
        return "\\".join(part.rstrip("\x00 ") for part in text.split("\\")) if "\\" in text else text.rstrip("\x00 ")
    return text.strip("\x00 ")


def _charset(raw: bytes | None) -> tuple[str, ...]:
    if not raw:
        return ()
    terms = tuple(t.strip() for t in raw.decode("ascii", "replace").split("\\"))
    return terms if any(terms) else ()


def _by_pydicom(data: bytes, implicit: bool) -> Identifier:
    """What the walker leaves: the identifier read by pydicom (character sets with code
    extensions, encodings the walker cannot follow)."""
    from pydicom.filereader import read_dataset

    try:
        ds = read_dataset(io.BytesIO(data), implicit, True)
        found = {}
        for keyword, (_tag, vr) in KEYS.items():
            if keyword in ds:
                value = ds[keyword].value
                if value is None:
                    text = ""
                elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
                    text = "\\".join(str(v) for v in value)
                else:
                    text = str(value)
                found[keyword] = _unpadded(text, vr)
        return found
    except Exception as exc:  # noqa: BLE001 - pydicom raises several kinds on malformed bytes
        raise Unreadable(f"{exc.__class__.__name__}: {exc}") from None
