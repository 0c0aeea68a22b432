"""A received dataset as a DICOM Part-10 file (PS3.10): the preamble, ``DICM`` and the
File Meta Information written here, the dataset's bytes after them as they arrived (its
pixel data never decoded)."""

from __future__ import annotations

import struct
from functools import lru_cache

from .messages import padded
from .uids import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"

# -- the File Meta Information elements written (group 0002, PS3.10 7.1) --------------------
META_VERSION = 0x0001  # (0002,0001) File Meta Information Version
MEDIA_STORAGE_SOP_CLASS_UID = 0x0002
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x0003
TRANSFER_SYNTAX_UID = 0x0010
IMPLEMENTATION_CLASS_UID = 0x0012
IMPLEMENTATION_VERSION_NAME = 0x0013
SOURCE_APPLICATION_ENTITY_TITLE = 0x0016


def element(number: int, vr: bytes, value: bytes) -> bytes:
    """One group-2 element in Explicit VR Little Endian."""
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2s2xI", 2, number, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, number, vr, len(value)) + value


@lru_cache(maxsize=1)
def _implementation() -> bytes:
    """The file meta elements that name the writer (clpipe): the same for every file."""
    return (element(IMPLEMENTATION_CLASS_UID, b"UI", padded(IMPLEMENTATION_UID, b"\x00"))
            + element(IMPLEMENTATION_VERSION_NAME, b"SH", padded(IMPLEMENTATION_VERSION, b" ")))


_VERSION = element(META_VERSION, b"OB", b"\x00\x01")  # version 00\01


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str = "") -> bytes:
    """Preamble, ``DICM`` and the File Meta Information for a dataset received over the
    network (the dataset's bytes follow it unchanged)."""
    body = b"".join((
        _VERSION,
        element(MEDIA_STORAGE_SOP_CLASS_UID, b"UI", padded(sop_class, b"\x00")),
        element(MEDIA_STORAGE_SOP_INSTANCE_UID, b"UI", padded(sop_instance, b"\x00")),
        element(TRANSFER_SYNTAX_UID, b"UI", padded(transfer_syntax, b"\x00")),
        _implementation(),
        (element(SOURCE_APPLICATION_ENTITY_TITLE, b"AE", padded(source_aet.strip()[:16], b" "))
         if source_aet.strip() else b""),
    ))
    return PREAMBLE + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body
