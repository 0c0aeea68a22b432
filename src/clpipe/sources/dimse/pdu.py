"""Upper-layer PDUs (PS3.8 9.3): their types and codes named, the A-ASSOCIATE-RQ and -AC
PDUs encoded and decoded (presentation contexts, SCP role selection, maximum PDU length,
implementation UID and version; other user information sub-items are skipped when read),
the small fixed ones and P-DATA-TF framing. Nothing here touches a socket (see wire.py).
Written here rather than through pynetdicom's PDU classes: importing pynetdicom imports
pydicom and numpy (~0.25 s), more than a whole small retrieval's work; the tests check
these encodings against pynetdicom's decoder and encoder."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ...errors import TransientError
from ..part10 import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from .uids import APPLICATION_CONTEXT

# -- PDU types (PS3.8 9.3.1) ----------------------------------------------------------------

A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_AC_PDU = 0x02
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07

HEADER = struct.Struct(">BBI")  # PDU type, reserved, PDU length (big endian, as all PDU fields)
HEADER_LENGTH = HEADER.size  # 6
PDV_HEADER = struct.Struct(">IBB")  # PDV item length, presentation context ID, message control header
PDV_OVERHEAD = HEADER_LENGTH + PDV_HEADER.size  # 12: the bytes of a P-DATA-TF holding one PDV around its fragment
#: message control header bits of a PDV (PS3.8 E.2)
PDV_COMMAND = 0x01  # else a dataset fragment
PDV_LAST = 0x02  # the last fragment of the command set or dataset

DEFAULT_MAX_PDU = 16384  # assumed of a peer until it says otherwise
MIN_FRAGMENT = 256  # the smallest dataset fragment we send, whatever the peer's maximum
MAX_PDU_BYTES = 1 << 28  # a PDU claiming more than this is not believed

# -- A-ASSOCIATE-RJ result, source and reason (PS3.8 9.3.4) -----------------------------------

RJ_PERMANENT = 1
RJ_TRANSIENT = 2
RJ_SOURCE_USER = 1  # DICOM UL service-user
RJ_SOURCE_ACSE = 2  # DICOM UL service-provider, ACSE related function
RJ_SOURCE_PRESENTATION = 3  # DICOM UL service-provider, presentation related function
#: reasons, per source
RJ_USER_NO_REASON = 1
RJ_USER_APPLICATION_CONTEXT = 2  # application context name not supported
RJ_USER_CALLING_AE = 3  # calling AE title not recognised
RJ_USER_CALLED_AE = 7  # called AE title not recognised
RJ_ACSE_PROTOCOL_VERSION = 2  # protocol version not supported
RJ_PRESENTATION_CONGESTION = 1  # temporary congestion
RJ_PRESENTATION_LIMIT = 2  # local limit exceeded
#: (source, reason) in words
RJ_REASONS = {
    (RJ_SOURCE_USER, RJ_USER_APPLICATION_CONTEXT): "application context not supported",
    (RJ_SOURCE_ACSE, RJ_ACSE_PROTOCOL_VERSION): "protocol version not supported",
    (RJ_SOURCE_PRESENTATION, RJ_PRESENTATION_CONGESTION): "temporary congestion",
    (RJ_SOURCE_PRESENTATION, RJ_PRESENTATION_LIMIT): "local limit exceeded",
}

# -- A-ASSOCIATE-AC: association and presentation context results (PS3.8 9.3.3, 7.1.1.13) ----

ASSOCIATION_ACCEPTED = 0
RESULT_SOURCE_USER = 1
CONTEXT_ACCEPTED = 0
CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


def pdu(kind: int, body: bytes) -> bytes:
    """A PDU: its header, then ``body``."""
    return HEADER.pack(kind, 0, len(body)) + body


#: the fixed PDUs (their four bytes after the header reserved)
A_RELEASE_RQ = pdu(A_RELEASE_RQ_PDU, bytes(4))
A_RELEASE_RP = pdu(A_RELEASE_RP_PDU, bytes(4))
A_ABORT = pdu(A_ABORT_PDU, bytes(4))  # source 0 (service user), reason 0 (not specified)


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU."""
    return pdu(A_ASSOCIATE_RJ_PDU, bytes((0, result, source, reason)))


def rj_fields(body: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ PDU's body (reserved, result, source, reason)."""
    return body[1], body[2], body[3]


def abort_fields(body: bytes) -> tuple[int, int]:
    """(source, reason) of an A-ABORT PDU's body (reserved, reserved, source, reason)."""
    return (body[2], body[3]) if len(body) >= 4 else (0, 0)


def p_data_tf(context_id: int, data: bytes, command: bool, max_pdu: int) -> Iterator[bytes]:
    """One command set or dataset as P-DATA-TF PDUs of one PDV each, none larger than the
    peer's ``max_pdu``."""
    room = max(max_pdu - PDV_OVERHEAD, MIN_FRAGMENT)
    for start in range(0, max(len(data), 1), room):
        chunk = data[start : start + room]
        control = (PDV_COMMAND if command else 0) | (PDV_LAST if start + room >= len(data) else 0)
        pdv = PDV_HEADER.pack(len(chunk) + 2, context_id, control) + chunk
        yield pdu(P_DATA_TF_PDU, pdv)


# -- A-ASSOCIATE-RQ/AC items (PS3.8 9.3.2, 9.3.3, Annex D) ---------------------------------

PROTOCOL_VERSION = 0x0001
ITEM = struct.Struct(">BBH")  # item type, reserved, item length
FIXED = struct.Struct(">HH16s16s32x")  # protocol version, reserved, called AE, calling AE, reserved
APPLICATION_CONTEXT_ITEM = 0x10
RQ_CONTEXT_ITEM = 0x20  # a proposed presentation context
AC_CONTEXT_ITEM = 0x21  # a presentation context's result
ABSTRACT_SYNTAX_ITEM = 0x30
TRANSFER_SYNTAX_ITEM = 0x40
USER_INFORMATION_ITEM = 0x50
MAXIMUM_LENGTH_ITEM = 0x51
IMPLEMENTATION_CLASS_UID_ITEM = 0x52
ROLE_SELECTION_ITEM = 0x54
IMPLEMENTATION_VERSION_ITEM = 0x55


@dataclass
class Context:
    """A presentation context as an A-ASSOCIATE-RQ proposes it (abstract syntax, transfer
    syntaxes) or an A-ASSOCIATE-AC answers it (result, the transfer syntax chosen)."""

    context_id: int
    abstract_syntax: str = ""  # none in an AC
    transfer_syntax: list[str] = field(default_factory=list)
    result: int = CONTEXT_ACCEPTED  # an AC's result (0: acceptance); a proposal has none


@dataclass
class Associate:
    """What clpipe reads of an A-ASSOCIATE-RQ or -AC."""

    called_ae_title: str
    calling_ae_title: str
    contexts: list[Context]
    maximum_length_received: int = 0  # 0: no limit given
    implementation_class_uid: str = ""


def _item(kind: int, body: bytes) -> bytes:
    return ITEM.pack(kind, 0, len(body)) + body


def _uid_item(kind: int, uid: str) -> bytes:
    return _item(kind, uid.encode("ascii", "replace"))


def _ae(title: str) -> bytes:
    return title.strip().encode("ascii", "replace")[:16].ljust(16, b" ")


def user_information(max_pdu: int, roles: Sequence[str] = ()) -> bytes:
    """Our A-ASSOCIATE user information item: maximum PDU length, implementation class UID,
    SCP role selection for the given SOP classes (we take the SCP role, not the SCU role),
    implementation version name; sub-items in the order of their types."""
    items = [_item(MAXIMUM_LENGTH_ITEM, struct.pack(">I", max_pdu)), _uid_item(IMPLEMENTATION_CLASS_UID_ITEM, IMPLEMENTATION_UID)]
    for sop_class in roles:
        uid = sop_class.encode("ascii", "replace")
        items.append(_item(ROLE_SELECTION_ITEM, struct.pack(">H", len(uid)) + uid + bytes((0, 1))))
    items.append(_item(IMPLEMENTATION_VERSION_ITEM, IMPLEMENTATION_VERSION.encode("ascii", "replace")))
    return _item(USER_INFORMATION_ITEM, b"".join(items))


def context_id(n: int) -> int:
    """The presentation context ID of our ``n``-th proposed context (0-based): 1, 3, 5..."""
    return 2 * n + 1


def _associate(kind: int, called: str, calling: str, contexts: bytes, max_pdu: int, roles: Sequence[str] = ()) -> bytes:
    fixed = FIXED.pack(PROTOCOL_VERSION, 0, _ae(called), _ae(calling))
    return pdu(kind, fixed + _uid_item(APPLICATION_CONTEXT_ITEM, APPLICATION_CONTEXT) + contexts + user_information(max_pdu, roles))


def associate_rq(called: str, calling: str, contexts: Sequence[tuple[str, Sequence[str]]], roles: Sequence[str], max_pdu: int) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` as IDs 1, 3, 5..."""
    items = []
    for n, (abstract, syntaxes) in enumerate(contexts):
        subs = _uid_item(ABSTRACT_SYNTAX_ITEM, abstract) + b"".join(_uid_item(TRANSFER_SYNTAX_ITEM, ts) for ts in syntaxes)
        items.append(_item(RQ_CONTEXT_ITEM, bytes((context_id(n), 0, 0, 0)) + subs))
    return _associate(A_ASSOCIATE_RQ_PDU, called, calling, b"".join(items), max_pdu, roles)


def associate_ac(request: Associate, results: Sequence[tuple[int, str, bool]], max_pdu: int) -> bytes:
    """The A-ASSOCIATE-AC PDU answering ``request`` (a decoded A-ASSOCIATE-RQ);
    ``results`` holds (context ID, transfer syntax, accepted) per proposed context."""
    items = []
    for number, syntax, accepted in results:
        result = CONTEXT_ACCEPTED if accepted else CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED
        items.append(_item(AC_CONTEXT_ITEM, bytes((number, 0, result, 0)) + _uid_item(TRANSFER_SYNTAX_ITEM, syntax)))
    return _associate(A_ASSOCIATE_AC_PDU, request.called_ae_title, request.calling_ae_title, b"".join(items), max_pdu)


def _items(data: bytes, pos: int) -> Iterator[tuple[int, bytes]]:
    """(item type, item value) of the items from ``pos`` to the end of ``data``."""
    while pos < len(data):
        kind, _reserved, length = ITEM.unpack_from(data, pos)
        end = pos + ITEM.size + length
        if end > len(data):
            raise ValueError(f"item type 0x{kind:02X} runs past the end of the PDU")
        yield kind, data[pos + ITEM.size : end]
        pos = end


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").lstrip(b" ").decode("ascii", "replace")


def _decode(kind: int, body: bytes) -> Associate:
    _version, _reserved, called, calling = FIXED.unpack_from(body, 0)
    found = Associate(_text(called), _text(calling), [])
    for item, value in _items(body, FIXED.size):
        if item in (RQ_CONTEXT_ITEM, AC_CONTEXT_ITEM) and len(value) >= 4:
            context = Context(value[0], result=value[2] if kind == A_ASSOCIATE_AC_PDU else CONTEXT_ACCEPTED)
            for sub, sub_value in _items(value, 4):
                if sub == ABSTRACT_SYNTAX_ITEM:
                    context.abstract_syntax = _text(sub_value)
                elif sub == TRANSFER_SYNTAX_ITEM:
                    context.transfer_syntax.append(_text(sub_value))
            found.contexts.append(context)
        elif item == USER_INFORMATION_ITEM:
            for sub, sub_value in _items(value, 0):
                if sub == MAXIMUM_LENGTH_ITEM and len(sub_value) >= 4:
                    found.maximum_length_received = struct.unpack_from(">I", sub_value)[0]
                elif sub == IMPLEMENTATION_CLASS_UID_ITEM:
                    found.implementation_class_uid = _text(sub_value)
    return found


def decode_associate(kind: int, body: bytes, where: str) -> Associate:
    """An A-ASSOCIATE-RQ or -AC PDU's body (the bytes after its header) read off the wire;
    TransientError naming ``where`` when it cannot be read."""
    try:
        return _decode(kind, body)
    except (struct.error, ValueError) as exc:
        raise TransientError(f"{where} sent an association PDU that cannot be read ({exc})") from None
