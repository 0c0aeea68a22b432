"""Upper-layer PDUs (PS3.8 9.3): their types and codes named, the A-ASSOCIATE PDUs
encoded and decoded by pynetdicom's PDU classes (presentation contexts, SCP role
selection, maximum PDU length, implementation UID), the small fixed ones and P-DATA-TF
framing written here. Nothing here touches a socket (see wire.py)."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext

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


def user_information(max_pdu: int, roles: Sequence[str] = ()) -> list[Any]:
    """Our A-ASSOCIATE user information: maximum PDU length, implementation class UID and
    version name, and SCP role selection for the given SOP classes."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    items: list[Any] = [length, uid, version]
    for sop_class in roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = sop_class, False, True
        items.append(role)
    return items


def context_id(n: int) -> int:
    """The presentation context ID of our ``n``-th proposed context (0-based): 1, 3, 5..."""
    return 2 * n + 1


def associate_rq(called: str, calling: str, contexts: Sequence[tuple[str, Sequence[str]]], roles: Sequence[str], max_pdu: int) -> bytes:
    """An A-ASSOCIATE-RQ PDU (encoded by pynetdicom) proposing ``contexts`` as IDs 1, 3, 5..."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.called_ae_title, primitive.calling_ae_title = called, calling
    offers = []
    for n, (abstract, syntaxes) in enumerate(contexts):
        offer = PresentationContext()
        offer.context_id, offer.abstract_syntax, offer.transfer_syntax = context_id(n), abstract, list(syntaxes)
        offers.append(offer)
    primitive.presentation_context_definition_list = offers
    primitive.user_information = user_information(max_pdu, roles)
    encoded = A_ASSOCIATE_RQ()
    encoded.from_primitive(primitive)
    return encoded.encode()


def associate_ac(request: A_ASSOCIATE, results: Sequence[tuple[int, str, bool]], max_pdu: int) -> bytes:
    """The A-ASSOCIATE-AC PDU answering ``request`` (a decoded A-ASSOCIATE primitive);
    ``results`` holds (context ID, transfer syntax, accepted) per proposed context."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.called_ae_title, primitive.calling_ae_title = request.called_ae_title, request.calling_ae_title
    primitive.result, primitive.result_source = ASSOCIATION_ACCEPTED, RESULT_SOURCE_USER
    answers = []
    for number, syntax, accepted in results:
        answer = PresentationContext()
        answer.context_id, answer.transfer_syntax = number, [syntax]
        answer.result = CONTEXT_ACCEPTED if accepted else CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED
        answers.append(answer)
    primitive.presentation_context_definition_results_list = answers
    primitive.user_information = user_information(max_pdu)
    encoded = A_ASSOCIATE_AC()
    encoded.from_primitive(primitive)
    return encoded.encode()


def decode_associate(kind: int, body: bytes, where: str) -> A_ASSOCIATE:
    """An A-ASSOCIATE-RQ or -AC PDU read off the wire, decoded by pynetdicom into its
    primitive; TransientError naming ``where`` when it cannot be read."""
    decoder = A_ASSOCIATE_RQ() if kind == A_ASSOCIATE_RQ_PDU else A_ASSOCIATE_AC()
    try:
        decoder.decode(pdu(kind, body))
        return decoder.to_primitive()
    except Exception as exc:  # noqa: BLE001 - pynetdicom raises several kinds on malformed bytes
        raise TransientError(f"{where} sent an association PDU that cannot be read ({exc})") from None
