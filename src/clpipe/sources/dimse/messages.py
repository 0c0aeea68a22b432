"""DIMSE messages (PS3.7): the group-0000 command sets of C-FIND, C-GET, C-MOVE, C-STORE
and C-ECHO, always Implicit VR Little Endian, encoded and parsed here (no pydicom on the
per-instance path); status codes named, and described in words from pynetdicom's tables
(imported only to say what went wrong). Identifiers are in identifiers.py."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..part10 import padded

# -- command field values (PS3.7 E.1-1) ---------------------------------------------------

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030

# -- command set elements: the element numbers of group 0000 used here (PS3.7 E.1-1) -------

AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
FAILED_SUBOPERATIONS = 0x1022  # Number of Failed Sub-operations

PRIORITY_MEDIUM = 0x0000
DATA_SET_PRESENT = 0x0000  # CommandDataSetType: any value but NO_DATASET means a dataset follows
NO_DATASET = 0x0101

# -- status codes (PS3.4 C.4, PS3.7 C) ----------------------------------------------------

SUCCESS = 0x0000
PENDING = (0xFF00, 0xFF01)
CANCEL = 0xFE00
#: C-GET/C-MOVE: sub-operations complete, one or more failures (the count says how many)
SUBOPERATIONS_FAILED = 0xB000
REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
REFUSED_NOT_AUTHORIZED = 0x0124
#: Refused: out of resources (the C-STORE status for an instance nobody waits for, too)
OUT_OF_RESOURCES = 0xA700
#: C-MOVE/C-GET: refused, out of resources, unable to calculate number of matches
OUT_OF_RESOURCES_MATCHES = 0xA701
MOVE_DESTINATION_UNKNOWN = 0xA801
#: the failure ranges "refused: out of resources" (A7xx) and "unable to process" (Cxxx)
OUT_OF_RESOURCES_RANGE = range(0xA700, 0xA7FF + 1)
UNABLE_TO_PROCESS_RANGE = range(0xC000, 0xCFFF + 1)
UNABLE_TO_PROCESS = 0xC000
NO_STATUS = UNABLE_TO_PROCESS  # a response without a Status element is read as a failure, never as success


def status_words(code: int) -> str:
    """A status code in words, e.g. ``status 0xA801, Move destination unknown``, from
    pynetdicom's tables of what each code means (the retrieval's own first)."""
    from pynetdicom.status import (
        GENERAL_STATUS,
        QR_FIND_SERVICE_CLASS_STATUS,
        QR_GET_SERVICE_CLASS_STATUS,
        QR_MOVE_SERVICE_CLASS_STATUS,
        code_to_category,
    )

    tables = (QR_MOVE_SERVICE_CLASS_STATUS, QR_GET_SERVICE_CLASS_STATUS, QR_FIND_SERVICE_CLASS_STATUS, GENERAL_STATUS)
    words = next((table[code][1] for table in tables if table.get(code, ("", ""))[1]), "")
    if not words:
        words = "cancelled" if code == CANCEL else code_to_category(code).lower()
    return f"status 0x{code:04X}, {words}"


@dataclass
class Final:
    """How a C-FIND, C-GET or C-MOVE ended, as its last response said."""

    status: int | None  # None: no final response (timeout, abort)
    failed: int = 0
    comment: str = ""


# -- encoding -------------------------------------------------------------------------------


def us(value: int) -> bytes:
    """An unsigned short (US) value, little endian."""
    return struct.pack("<H", value)


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set (group 0000, Implicit VR Little Endian, elements in tag order), its
    group length first."""
    body = b"".join(struct.pack("<HHI", 0, number, len(value)) + value for number, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def request(model: str, command: int, message_id: int, destination: str = "") -> bytes:
    """The command set of a C-FIND, C-GET or C-MOVE request (an identifier follows it);
    ``destination``: the C-MOVE destination AE title."""
    elements = [(AFFECTED_SOP_CLASS_UID, padded(model, b"\x00")), (COMMAND_FIELD, us(command)), (MESSAGE_ID, us(message_id))]
    if destination:
        elements.append((MOVE_DESTINATION, padded(destination, b" ")))
    elements += [(PRIORITY, us(PRIORITY_MEDIUM)), (COMMAND_DATA_SET_TYPE, us(DATA_SET_PRESENT))]
    return command_set(elements)


def response(fields: dict[int, bytes], command: int, status: int) -> bytes:
    """The command set of a C-STORE or C-ECHO response to a request's command ``fields``."""
    elements = [
        (AFFECTED_SOP_CLASS_UID, fields.get(AFFECTED_SOP_CLASS_UID, b"")),
        (COMMAND_FIELD, us(command)),
        (MESSAGE_ID_BEING_RESPONDED_TO, fields.get(MESSAGE_ID, us(0))),
        (COMMAND_DATA_SET_TYPE, us(NO_DATASET)),
        (STATUS, us(status)),
    ]
    if AFFECTED_SOP_INSTANCE_UID in fields:
        elements.append((AFFECTED_SOP_INSTANCE_UID, fields[AFFECTED_SOP_INSTANCE_UID]))
    return command_set(elements)


# -- decoding -------------------------------------------------------------------------------


def parse_command(data: bytes) -> dict[int, bytes]:
    """Element number -> value bytes of a command set."""
    fields, i = {}, 0
    while i + 8 <= len(data):
        _group, number, length = struct.unpack_from("<HHI", data, i)
        fields[number] = bytes(data[i + 8 : i + 8 + length])
        i += 8 + length
    return fields


def field_us(fields: dict[int, bytes], number: int, default: int = 0) -> int:
    """A US element of a command set (``default`` when absent or too short)."""
    value = fields.get(number)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else default


def field_text(fields: dict[int, bytes], number: int) -> str:
    """A text element of a command set, without its padding."""
    return fields.get(number, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def text(ds: Any, keyword: str) -> str:
    """An identifier's value as text ("" when absent or empty)."""
    value = ds.get(keyword) if ds is not None else None
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).rstrip(" \x00")
