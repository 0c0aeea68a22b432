"""The DIMSE source: a PACS reached with C-FIND, and C-GET or C-MOVE.

``series(query)`` asks the PACS with Study Root C-FINDs: the studies that match the
filters, then each study's series, each once (pynetdicom's own Q/R SCP answers once per
instance at STUDY and SERIES level), each with its instance count
(NumberOfSeriesRelatedInstances, else an IMAGE-level C-FIND that counts distinct SOP
Instance UIDs) so that an unchanged series is never retrieved again. Keys the PACS leaves
out of its answers stay empty (dcmqrscp has no SeriesDescription); a SeriesDescription
filter on such a PACS is an error, not a silent "nothing matched".

``instances(entry)`` retrieves one series, by C-GET (default: the instances come back on
our own association) or by C-MOVE (the PACS opens an association to the storage SCP this
source runs on ``move_port``; the PACS must know our AE title, host and port). Every
received dataset is handed on as a Part-10 file made of its bytes as they arrived (file
meta written here, pixel data never decoded), so what the PACS sends compressed stays
compressed. (Which transfer syntax it sends is its choice: Orthanc and pynetdicom send
each instance as stored; dcmtk's dcmqrscp sends the first context accepted for the SOP
class, Explicit VR Little Endian, decompressing RLE.)

How the protocol is spoken: the association is negotiated with pynetdicom's PDU classes
(A-ASSOCIATE-RQ/AC encoded and decoded by ``pynetdicom.pdu``: presentation contexts, SCP
role selection, maximum PDU length, implementation UID), on both sides: :class:`_Channel`
for the associations we request, :class:`_StorageSCP` for those the PACS opens to deliver
a C-MOVE. The per-instance path (P-DATA-TF fragments, the group-0000 command sets of
C-FIND, C-GET, C-MOVE, C-STORE and C-ECHO from PS3.7, A-RELEASE, A-ABORT) is read and
written here, on the socket the engine's thread already holds. Why not pynetdicom's
Association for that path (measured with pynetdicom 3.0.4 and py-spy, and in
bench/results/dicom_dimse.md, whose pynetdicom C-GET rows use its fastest settings): per
received instance it runs three threads, a polling loop and pydicom encodes and decodes
three command sets, ~2 ms of CPU under the GIL, so parallel associations in one process
do not add up (2,209 instances: 5.2-6.7 s, against 1.3 s for dcmtk's getscu, the goal's
peer, and 1.0 s here); here the whole run costs ~1 s of CPU and the retrieval is bound by
the PACS and the disk. Identifiers are pydicom datasets; received datasets are
never decoded (only read up to SeriesInstanceUID to route a C-MOVE's instances).

* C-GET runs in the engine's own thread: no hand-off, backpressure for free (the next
  instance is read when the engine asks for it), and a series the engine stops reading
  is aborted, not left half done. C-MOVE sends the request from a thread of its own; the
  storage SCP's threads hand instances to the engine through a bounded queue.
* Every socket has Nagle off (else each sub-operation can wait ~40 ms for a delayed ACK)
  and every wait a timeout (``SourceSettings.timeout``); associations are kept in a small
  pool and reused for the next series (dropped when idle for long, when the PACS closed
  them, or when an operation was left half done).
"""

from __future__ import annotations

import io
import ipaddress
import queue
import select
import socket
import ssl
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification, MaximumLengthNotification,
                                       SCP_SCU_RoleSelectionNegotiation)
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import (GENERAL_STATUS, QR_FIND_SERVICE_CLASS_STATUS, QR_GET_SERVICE_CLASS_STATUS,
                               QR_MOVE_SERVICE_CLASS_STATUS, code_to_category)

from .. import __version__
from ..errors import ConfigError
from ..sync.engine import PermanentError, TransientError
from .dicom import DicomQuery, Series, SourceSettings, SourceURL

#: DICOM keywords kept in ``Series.attrs``
STUDY_KEYS = ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription",
              "AccessionNumber")
SERIES_KEYS = ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality")

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
#: compressed transfer syntaxes offered for image storage (so such data arrives unchanged):
#: RLE Lossless, JPEG Baseline, JPEG Lossless SV1, JPEG-LS Lossless, JPEG 2000 (lossless, any)
COMPRESSED = ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70",
              "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
#: image storage SOP classes an MRI archive holds, each offered with every transfer syntax above
IMAGE_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
)
#: other storage SOP classes found in MR studies (uncompressed transfer syntaxes only)
OTHER_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data (vendor data, e.g. Siemens CSA)
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR (CT and PET studies)
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.3.12.2.1107.5.9.1",  # Siemens CSA Non-Image (private: spectroscopy raw data, protocols)
)
QR_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
QR_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
QR_GET = "1.2.840.10008.5.1.4.1.2.2.3"

MAX_PDU = 1 << 20  # the largest PDU we accept (fewer, larger reads than the usual 16 KiB)
LISTING_ATTEMPTS = 3  # a listing that meets a transient fault is tried this often (1 s, 2 s apart)
IDLE_REUSE = 20.0  # a pooled association idle longer than this is closed, not reused
QUEUE_DEPTH = 8  # received instances held for the engine before the sender is made to wait
PENDING = (0xFF00, 0xFF01)
#: how clpipe names itself in associations and file meta: a UUID-derived UID (PS3.5 B.2)
IMPLEMENTATION_UID = "2.25.210931605554583860529104387413997179620"
IMPLEMENTATION_VERSION = f"CLPIPE_{__version__}"[:16]
PREAMBLE = b"\x00" * 128 + b"DICM"
#: A PACS built on pynetdicom (its implementation class UID root) sends C-MOVE sub-operations
#: with send_c_store(), whose thread can lose a response that arrives too soon after the
#: request (its reactor takes it off the queue: a race in pynetdicom 3.0); the sub-operation
#: then fails after its DIMSE timeout. Measured with pynetdicom's qrscp: 3 of 195 C-MOVEs
#: failed when we answered at once, none with 3 ms. Such peers are answered after this delay.
PYNETDICOM_ROOT = "1.2.826.0.1.3680043.9.3811."
PYNETDICOM_DELAY = 0.005
REFUSED = 0xA700  # C-STORE status for an instance nobody waits for ("out of resources")


# ----------------------------------------------------------------------------- helpers


def _element(number: int, vr: bytes, value: bytes) -> bytes:
    """One group-2 element in Explicit VR Little Endian."""
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2s2xI", 2, number, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, number, vr, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii", "replace")
    return data + pad if len(data) % 2 else data


@lru_cache(maxsize=1)
def _implementation() -> bytes:
    """The file meta elements that name the writer (clpipe): the same for every file."""
    return (_element(0x0012, b"UI", _padded(IMPLEMENTATION_UID, b"\x00"))
            + _element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION, b" ")))


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str = "") -> bytes:
    """Preamble, ``DICM`` and the File Meta Information for a dataset received over the
    network (the dataset's bytes follow it unchanged)."""
    body = b"".join((
        b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",  # (0002,0001) version 00\01
        _element(0x0002, b"UI", _padded(sop_class, b"\x00")),
        _element(0x0003, b"UI", _padded(sop_instance, b"\x00")),
        _element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _implementation(),
        _element(0x0016, b"AE", _padded(source_aet.strip()[:16], b" ")) if source_aet.strip() else b"",
    ))
    return PREAMBLE + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


def tls_context(settings: SourceSettings, server_side: bool = False) -> ssl.SSLContext | None:
    """The TLS context for our associations (``None``: no TLS), from TLSCAFile, TLSCertFile
    and TLSKeyFile; ``ConfigError`` naming the setting when a file is missing or unusable.
    ``server_side``: for the C-MOVE storage SCP (needs our certificate and key)."""
    ca, cert, key = settings.tls_ca, settings.tls_cert, settings.tls_key
    if not (ca or cert or key):
        return None
    for path, name in ((ca, "TLSCAFile"), (cert, "TLSCertFile"), (key, "TLSKeyFile")):
        if path and not Path(path).is_file():
            raise ConfigError(f"{name}: {path} does not exist or is not a file")
    if bool(cert) != bool(key):
        raise ConfigError("TLSCertFile and TLSKeyFile go together: set both (our certificate and its private key) or neither")
    if server_side and not cert:
        raise ConfigError("C-MOVE over TLS: the PACS connects to our storage SCP, which needs TLSCertFile and TLSKeyFile")
    purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
    try:
        context = ssl.create_default_context(purpose, cafile=ca or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLSCAFile: {ca} is not a PEM file of CA certificates ({exc})") from None
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"TLSCertFile/TLSKeyFile: {cert} and {key} are not a PEM certificate and its key ({exc})") from None
    if server_side and ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _text(ds, keyword: str) -> str:
    """An identifier's value as text ("" when absent or empty)."""
    value = ds.get(keyword) if ds is not None else None
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).rstrip(" \x00")


#: DicomQuery fields matched at study level, and the keyword each one matches
STUDY_FILTERS = {"patient_id": "PatientID", "patient_name": "PatientName", "accession_number": "AccessionNumber",
                 "study_date": "StudyDate"}


def _unanswered(query: DicomQuery, identifier) -> DicomQuery:
    """The query without the study filters whose key the PACS left out of its answer: it
    was given them and matched them itself, and "" would never match here."""
    missing = {name: "" for name, keyword in STUDY_FILTERS.items() if getattr(query, name) and keyword not in identifier}
    return replace(query, **missing) if missing else query


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: pynetdicom's tables of what each status code means, the retrieval's own first
STATUS_TABLES = (QR_MOVE_SERVICE_CLASS_STATUS, QR_GET_SERVICE_CLASS_STATUS, QR_FIND_SERVICE_CLASS_STATUS,
                 GENERAL_STATUS)


def _status_words(code: int) -> str:
    words = next((table[code][1] for table in STATUS_TABLES if table.get(code, ("", ""))[1]), "")
    if not words:
        words = "cancelled" if code == 0xFE00 else code_to_category(code).lower()
    return f"status 0x{code:04X}, {words}"


# ----------------------------------------------------------------------------- delivery


class _End:
    """The last item of a delivery: how the C-MOVE ended."""

    def __init__(self, status: "_Final", error: Exception | None = None):
        self.status, self.error = status, error


class _Delivery:
    """C-MOVE: received instances on their way from the storage SCP's thread to the
    engine's thread: a bounded queue (a fast PACS waits for our disk instead of filling
    memory)."""

    def __init__(self, series_uid: str):
        self.series_uid = series_uid
        self.items: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self.cancelled = threading.Event()
        self.received = 0
        self.last_arrival = time.monotonic()  # when the C-MOVE last showed life (its start, an instance)

    def put(self, item) -> bool:
        """Hand one item on; False when the engine stopped listening."""
        while not self.cancelled.is_set():
            try:
                self.items.put(item, timeout=0.2)
                self.last_arrival = time.monotonic()
                return True
            except queue.Full:
                continue
        return False

    def finish(self, end: _End) -> None:
        try:
            self.items.put_nowait(end)
        except queue.Full:  # the engine is still draining: wait for room unless it stopped
            self.put(end)


# ----------------------------------------------------------------------------- the upper layer
#
# Association PDUs by pynetdicom; P-DATA-TF, A-RELEASE, A-ABORT (PS3.8) and the few command
# sets needed (PS3.7 group 0000, always Implicit VR Little Endian) here; identifiers are
# pydicom datasets, received datasets are never decoded. See the module docstring.

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
MAX_PDU_BYTES = 1 << 28  # a PDU claiming more than this is not believed
READ_SIZE = 1 << 18  # bytes asked of the socket at a time
C_STORE_RQ, C_STORE_RSP, C_GET_RQ, C_GET_RSP, C_FIND_RQ, C_FIND_RSP = 0x0001, 0x8001, 0x0010, 0x8010, 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0021, 0x8021, 0x0030, 0x8030
EXPLICIT_BE = "1.2.840.10008.1.2.2"  # retired; never accepted by our storage SCP
NO_DATASET = 0x0101
NO_STATUS = 0xC000  # a response without a Status element is read as a failure, never as success


def _user_information(max_pdu: int, roles: list[str] = ()) -> list:
    """Our A-ASSOCIATE user information: maximum PDU length, implementation class UID and
    version name, and SCP role selection for the given SOP classes."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    items = [length, uid, version]
    for sop_class in roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = sop_class, False, True
        items.append(role)
    return items


def _associate_rq(called: str, calling: str, contexts: list[tuple[str, list[str]]], roles: list[str],
                  max_pdu: int) -> bytes:
    """An A-ASSOCIATE-RQ PDU (encoded by pynetdicom) proposing ``contexts`` as IDs 1, 3, 5..."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.called_ae_title, primitive.calling_ae_title = called, calling
    offers = []
    for n, (abstract, syntaxes) in enumerate(contexts):
        offer = PresentationContext()
        offer.context_id, offer.abstract_syntax, offer.transfer_syntax = 2 * n + 1, abstract, list(syntaxes)
        offers.append(offer)
    primitive.presentation_context_definition_list = offers
    primitive.user_information = _user_information(max_pdu, roles)
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _associate_ac(request, results: list[tuple[int, str, bool]], max_pdu: int) -> bytes:
    """The A-ASSOCIATE-AC PDU answering ``request`` (a decoded A-ASSOCIATE primitive);
    ``results`` holds (context ID, transfer syntax, accepted) per proposed context."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.called_ae_title, primitive.calling_ae_title = request.called_ae_title, request.calling_ae_title
    primitive.result, primitive.result_source = 0, 1
    answers = []
    for context_id, syntax, accepted in results:
        answer = PresentationContext()
        answer.context_id, answer.transfer_syntax = context_id, [syntax]
        answer.result = 0 if accepted else 4  # 4: transfer syntaxes not supported
        answers.append(answer)
    primitive.presentation_context_definition_results_list = answers
    primitive.user_information = _user_information(max_pdu)
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _decode_pdu(kind_class, kind: int, body: bytes, where: str):
    """An association PDU read off the wire, decoded by pynetdicom into its primitive."""
    pdu = kind_class()
    try:
        pdu.decode(struct.pack(">BBI", kind, 0, len(body)) + body)
        return pdu.to_primitive()
    except Exception as exc:  # pynetdicom raises several kinds on malformed bytes
        raise TransientError(f"{where} sent an association PDU that cannot be read ({exc})") from None


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set (group 0000, Implicit VR Little Endian, elements in tag order)."""
    body = b"".join(struct.pack("<HHI", 0, number, len(value)) + value for number, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _parse_command(data: bytes) -> dict[int, bytes]:
    """Element number -> value bytes of a command set."""
    fields, i = {}, 0
    while i + 8 <= len(data):
        group, number, length = struct.unpack_from("<HHI", data, i)
        fields[number] = bytes(data[i + 8:i + 8 + length])
        i += 8 + length
    return fields


def _field_us(fields: dict[int, bytes], number: int, default: int = 0) -> int:
    value = fields.get(number)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else default


def _field_text(fields: dict[int, bytes], number: int) -> str:
    return fields.get(number, b"").rstrip(b"\x00 ").decode("ascii", "replace")


@dataclass
class _Final:
    """How a C-GET or C-MOVE ended, as its last response said."""

    status: int | None  # None: no final response (timeout, abort)
    failed: int = 0
    comment: str = ""


class _Released(TransientError):
    """The peer released the association (normal for the storage SCP's peer)."""


class _Wire:
    """PDUs and DIMSE messages over one socket, either side of an association. Every
    wait is bounded by the socket's timeout; errors are TransientError in words."""

    def __init__(self, sock: socket.socket, where: str, timeout: float):
        self.sock, self.where, self.timeout = sock, where, timeout
        self.peer_max = 16384
        self.accepted: dict[int, tuple[str, str]] = {}  # context ID -> (abstract syntax, transfer syntax)
        self._buffer, self._offset = bytearray(), 0
        #: asked when a read times out: True to wait another timeout (a C-MOVE whose PACS
        #: sends no Pending responses is alive while its instances keep arriving)
        self.keep_waiting = None

    def _recv(self, size: int) -> bytes:
        """Exactly ``size`` bytes, read through a buffer (one recv() often holds a whole
        C-STORE: its command PDU, its data PDU and the next response's header)."""
        while len(self._buffer) - self._offset < size:
            if self._offset:
                del self._buffer[:self._offset]
                self._offset = 0
            try:
                chunk = self.sock.recv(max(READ_SIZE, size - len(self._buffer)))
            except (socket.timeout, TimeoutError):
                if self.keep_waiting is not None and self.keep_waiting():
                    continue
                raise TransientError(f"no answer from {self.where} within {self.timeout:.0f} s (NetworkTimeout); it will be tried again") from None
            except OSError as exc:
                raise TransientError(f"the connection to {self.where} broke ({exc})") from None
            if not chunk:
                raise TransientError(f"{self.where} closed the connection")
            self._buffer += chunk
        start = self._offset
        self._offset += size
        return bytes(self._buffer[start:self._offset])

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self._recv(6)
        kind, length = header[0], struct.unpack(">I", header[2:6])[0]
        if length > MAX_PDU_BYTES:
            raise TransientError(f"{self.where} sent a PDU of {length} bytes: not DICOM, or broken")
        return kind, self._recv(length)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise TransientError(f"the connection to {self.where} broke ({exc})") from None

    def _send_message(self, context_id: int, data: bytes, command: bool) -> None:
        """One command set or dataset as P-DATA-TF PDUs no larger than the peer accepts."""
        room = max(self.peer_max - 12, 256)
        for start in range(0, max(len(data), 1), room):
            chunk = data[start:start + room]
            control = (1 if command else 0) | (2 if start + room >= len(data) else 0)
            pdv = struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk
            self._send(struct.pack(">BBI", 4, 0, len(pdv)) + pdv)

    def _respond(self, context_id: int, fields: dict[int, bytes], command: int, status: int) -> None:
        """A C-STORE/C-ECHO response to a request's command fields."""
        elements = [(0x0002, fields.get(0x0002, b"")), (0x0100, _us(command)), (0x0120, fields.get(0x0110, _us(0))),
                    (0x0800, _us(NO_DATASET)), (0x0900, _us(status))]
        if 0x1000 in fields:
            elements.append((0x1000, fields[0x1000]))
        self._send_message(context_id, _command(elements), True)

    def messages(self) -> Iterator[tuple[int, dict[int, bytes], list]]:
        """(context ID, command fields, dataset fragments) for each message the peer sends."""
        command: list = []
        data: list = []
        fields: dict[int, bytes] | None = None
        while True:
            kind, pdu = self._read_pdu()
            if kind != 4:
                self._unexpected(kind, pdu)
            i = 0
            while i + 6 <= len(pdu):
                length, context_id, control = struct.unpack_from(">IBB", pdu, i)
                fragment = pdu[i + 6:i + 4 + length]
                i += 4 + length
                if control & 1:
                    command.append(fragment)
                    if control & 2:
                        fields, command = _parse_command(b"".join(command)), []
                        if _field_us(fields, 0x0800, NO_DATASET) == NO_DATASET:
                            yield context_id, fields, []
                            fields = None
                else:
                    data.append(fragment)
                    if control & 2:
                        if fields is None:
                            raise TransientError(f"{self.where} sent a dataset without a command")
                        yield context_id, fields, data
                        fields, data = None, []

    def _unexpected(self, kind: int, pdu: bytes) -> None:
        if kind == 7:
            source, reason = (pdu[2], pdu[3]) if len(pdu) >= 4 else (0, 0)
            raise TransientError(f"{self.where} aborted the association (source {source}, reason {reason})")
        if kind == 5:
            self._send(struct.pack(">BBI", 6, 0, 4) + bytes(4))
            raise _Released(f"{self.where} released the association in the middle of an operation")
        raise TransientError(f"{self.where} sent an unexpected PDU (type {kind})")

    def abort(self) -> None:
        try:
            self.sock.sendall(struct.pack(">BBI", 7, 0, 4) + bytes(4))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Channel(_Wire):
    """An association we request (C-FIND, C-GET, C-MOVE), over a plain or TLS socket,
    used by one thread at a time. Errors are TransientError/PermanentError in words."""

    def __init__(self, source: "DimseSource"):
        self.source = source
        self.idle_since = time.monotonic()
        self.usable = False  # established, and no operation half done
        self.final = _Final(None)
        self._message_id = 0
        super().__init__(self._connect(), f"the PACS {source.where}", source.timeout)
        try:
            self._negotiate()
        except BaseException:
            self.close()
            raise
        self.usable = True

    # -- transport ---------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        src = self.source
        try:
            sock = socket.create_connection((src.host, src.port), timeout=min(src.timeout, 30.0))
        except OSError as exc:
            raise TransientError(f"could not connect to the PACS {src.where}: {_connect_words(exc, src)}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if src._tls is not None:
            try:
                sock = src._tls.wrap_socket(sock, server_hostname=src.host)
            except ssl.SSLCertVerificationError as exc:
                sock.close()
                raise PermanentError(f"the PACS {src.where}: its TLS certificate is not trusted ({exc.verify_message}); "
                                     "check TLSCAFile") from None
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise TransientError(f"could not connect to the PACS {src.where}: the TLS handshake failed ({exc}); check "
                                     "that the PACS speaks TLS on this port and TLSCAFile/TLSCertFile/TLSKeyFile") from None
        sock.settimeout(src.timeout)
        return sock

    def _negotiate(self) -> None:
        src = self.source
        requested = {2 * n + 1: abstract for n, (abstract, _) in enumerate(src._get_contexts)}
        # for the storage classes we take the SCP role (C-GET's C-STOREs come to us)
        storage = [a for a in dict.fromkeys(requested.values()) if a not in (QR_FIND, QR_GET, QR_MOVE)]
        self._send(_associate_rq(src.called_aet, src.calling_aet, src._get_contexts, storage, src.max_pdu))
        kind, pdu = self._read_pdu()
        if kind == 3 and len(pdu) >= 4:  # A-ASSOCIATE-RJ: reserved, result, source, reason
            raise src._rejection(pdu[1], pdu[2], pdu[3])
        if kind == 7:
            raise TransientError(f"the PACS {src.where} aborted the association request; check the AE titles "
                                 f"(ours: {src.calling_aet!r}, the PACS's: {src.called_aet!r})")
        if kind != 2:
            raise TransientError(f"the PACS {src.where} answered the association request with PDU type {kind}: "
                                 "is this its DICOM port?")
        answer = _decode_pdu(A_ASSOCIATE_AC, kind, pdu, self.where)
        for context in answer.presentation_context_definition_results_list:
            if context.result == 0 and context.context_id in requested and context.transfer_syntax:
                self.accepted[context.context_id] = (requested[context.context_id], str(context.transfer_syntax[0]))
        self.peer_max = answer.maximum_length_received or MAX_PDU_BYTES
        offered = {abstract for abstract, _ in self.accepted.values()}
        if QR_FIND not in offered:
            self.abort()
            raise PermanentError(f"the PACS {src.where} does not offer Study Root C-FIND to AE {src.calling_aet!r}; "
                                 "allow it there")
        if src.retrieve == "move" and QR_MOVE not in offered:
            self.abort()
            raise PermanentError(f"the PACS {src.where} does not offer Study Root C-MOVE to AE {src.calling_aet!r}; "
                                 "allow it there, or use RetrieveMethod \"get\"")
        if src.retrieve == "get" and QR_GET not in offered:
            self.abort()
            raise PermanentError(f"the PACS {src.where} does not offer Study Root C-GET to AE {src.calling_aet!r}; "
                                 "allow it there, or use RetrieveMethod \"move\"")
        if src.retrieve == "get" and not offered - {QR_FIND, QR_GET, QR_MOVE}:
            self.abort()
            raise PermanentError(f"the PACS {src.where} accepted none of the storage SOP classes for C-GET")

    def release(self) -> None:
        """A-RELEASE (bounded: a PACS that does not answer within 5 s is left). When the
        PACS asks to release at the same moment (a release collision, PS3.8 7.2), we, the
        requestor, answer its request and are done."""
        try:
            self.sock.settimeout(min(self.source.timeout, 5.0))
            self._send(struct.pack(">BBI", 5, 0, 4) + bytes(4))
            while True:
                kind = self._read_pdu()[0]
                if kind in (6, 7):  # A-RELEASE-RP, A-ABORT
                    break
                if kind == 5:  # the PACS's own A-RELEASE-RQ
                    self._send(struct.pack(">BBI", 6, 0, 4) + bytes(4))
                    break
        except (TransientError, OSError):
            pass
        self.close()

    def close(self) -> None:
        self.usable = False
        super().close()

    def alive(self) -> bool:
        """Still usable: the PACS has sent nothing since (an A-ABORT, a release, a close)."""
        if not self.usable:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    # -- DIMSE -------------------------------------------------------------------------

    def _request(self, model: str, command: int, identifier, destination: str = "") -> None:
        """Send a C-FIND/C-GET/C-MOVE request: its command set, then the identifier."""
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        context_id, (_, syntax) = next((c, a) for c, a in self.accepted.items() if a[0] == model)
        encoded = DicomBytesIO()
        encoded.is_little_endian, encoded.is_implicit_VR = True, syntax == IMPLICIT_LE
        write_dataset(encoded, identifier)
        self._message_id = self._message_id % 0xFFFF + 1
        self.usable = False  # until the final response: an abandoned request leaves the association unusable
        self.final = _Final(None)
        elements = [(0x0002, _padded(model, b"\x00")), (0x0100, _us(command)), (0x0110, _us(self._message_id))]
        if destination:
            elements.append((0x0600, _padded(destination, b" ")))
        elements += [(0x0700, _us(0)), (0x0800, _us(0))]
        self._send_message(context_id, _command(elements), True)
        self._send_message(context_id, encoded.getvalue(), False)

    def find(self, identifier) -> list:
        """A Study Root C-FIND: the identifiers of its matches (pydicom datasets)."""
        from pydicom.filereader import read_dataset

        self._request(QR_FIND, C_FIND_RQ, identifier)
        matches = []
        for context_id, fields, data in self.messages():
            if _field_us(fields, 0x0100) != C_FIND_RSP:
                raise TransientError(f"the PACS {self.source.where} sent an unexpected DIMSE message during a C-FIND")
            status = _field_us(fields, 0x0900, NO_STATUS)
            if status in PENDING:
                if data:
                    implicit = self.accepted.get(context_id, ("", EXPLICIT_LE))[1] == IMPLICIT_LE
                    matches.append(read_dataset(io.BytesIO(b"".join(data)), implicit, True))
                continue
            self.final = _Final(status, 0, _field_text(fields, 0x0902))
            self.usable = True
            return matches

    def get(self, identifier) -> Iterator[tuple[str, bytes]]:
        """Send a C-GET and yield ``(SOPInstanceUID, Part-10 bytes)`` for each C-STORE it
        causes (answered with success as it arrives); ``self.final`` says how it ended.
        The next message is read only when the engine asks for the next instance."""
        self._request(QR_GET, C_GET_RQ, identifier)
        for context_id, fields, data in self.messages():
            command = _field_us(fields, 0x0100)
            if command == C_STORE_RQ and data:
                sop_class, uid = _field_text(fields, 0x0002), _field_text(fields, 0x1000)
                syntax = self.accepted.get(context_id, ("", EXPLICIT_LE))[1]
                # answered at once, before the engine writes it: the PACS reads the next
                # instance meanwhile (a C-GET's success only says "received": should the
                # engine fail to write it, the series is retrieved again)
                self._respond(context_id, fields, C_STORE_RSP, 0x0000)
                yield uid, b"".join([part10_header(sop_class, uid, syntax, self.source.called_aet), *data])
            elif command == C_GET_RSP:
                status = _field_us(fields, 0x0900, NO_STATUS)
                if status in PENDING:
                    continue
                self.final = _Final(status, _field_us(fields, 0x1022), _field_text(fields, 0x0902))
                self.usable = True
                return
            else:
                raise TransientError(f"the PACS {self.source.where} sent an unexpected DIMSE message "
                                     f"(command 0x{command:04X}) during a C-GET")

    def move(self, identifier, destination: str, delivery: "_Delivery | None" = None) -> _Final:
        """Send a C-MOVE to ``destination`` and wait for its final response (the
        instances go to that AE's storage SCP, not here). Pending responses are optional
        (PS3.4 C.4.2.1.5): while ``delivery`` has received an instance within the timeout,
        a silent association is still waited for."""
        if delivery is not None:
            self.keep_waiting = lambda: time.monotonic() - delivery.last_arrival < self.timeout
        try:
            self._request(QR_MOVE, C_MOVE_RQ, identifier, destination)
            for context_id, fields, data in self.messages():
                if _field_us(fields, 0x0100) != C_MOVE_RSP:
                    raise TransientError(f"the PACS {self.source.where} sent an unexpected DIMSE message during a C-MOVE")
                status = _field_us(fields, 0x0900, NO_STATUS)
                if status in PENDING:
                    continue
                self.final = _Final(status, _field_us(fields, 0x1022), _field_text(fields, 0x0902))
                self.usable = True
                return self.final
        finally:
            self.keep_waiting = None


class _Connection(_Wire):
    """An association the PACS requests to our storage SCP, for C-MOVE sub-operations:
    every presentation context is accepted with the first transfer syntax it proposes
    (nothing is decoded, so any will do but the retired big-endian one)."""

    def __init__(self, scp: "_StorageSCP", sock: socket.socket, peer: tuple):
        super().__init__(sock, f"the PACS at {peer[0]}", scp.source.timeout)
        self.scp = scp
        self.calling_aet = ""
        self.respond_delay = 0.0

    def serve(self) -> None:
        try:
            if self.scp.tls is not None:
                self.sock = self.scp.tls.wrap_socket(self.sock, server_side=True)
            self._accept()
            for context_id, fields, data in self.messages():
                command = _field_us(fields, 0x0100)
                if command == C_STORE_RQ and data:
                    syntax = self.accepted.get(context_id, ("", EXPLICIT_LE))[1]
                    status = self.scp.source._store(fields, data, syntax, self.calling_aet)
                    if self.respond_delay:
                        time.sleep(self.respond_delay)
                    self._respond(context_id, fields, C_STORE_RSP, status)
                elif command == C_ECHO_RQ:
                    self._respond(context_id, fields, C_ECHO_RSP, 0x0000)
                else:
                    self.abort()
                    return
        except _Released:
            pass
        except (TransientError, OSError, ssl.SSLError):
            self.abort()  # the C-MOVE's final status says what went missing
        finally:
            self.close()
            self.scp.forget(self)

    def _accept(self) -> None:
        kind, pdu = self._read_pdu()
        if kind != 1:
            raise TransientError(f"{self.where} sent PDU type {kind} instead of an association request")
        request = _decode_pdu(A_ASSOCIATE_RQ, kind, pdu, self.where)
        self.calling_aet = request.calling_ae_title
        if request.called_ae_title.strip() != self.scp.source.calling_aet:
            # only a move to our AE title is ours; A-ASSOCIATE-RJ: rejected (permanent), by the
            # service user, called AE title not recognised
            self._send(struct.pack(">BBI", 3, 0, 4) + bytes((0, 1, 1, 7)))
            raise _Released(f"{self.where} called AE {request.called_ae_title.strip()!r}, not ours "
                            f"({self.scp.source.calling_aet!r}); refused")
        self.peer_max = request.maximum_length_received or MAX_PDU_BYTES
        if str(request.implementation_class_uid or "").startswith(PYNETDICOM_ROOT):
            self.respond_delay = PYNETDICOM_DELAY
        results = []
        for offer in request.presentation_context_definition_list:
            chosen = next((str(ts) for ts in offer.transfer_syntax if ts != EXPLICIT_BE), "")
            if chosen:
                self.accepted[offer.context_id] = (str(offer.abstract_syntax), chosen)
            results.append((offer.context_id, chosen or str((offer.transfer_syntax or [EXPLICIT_LE])[0]), bool(chosen)))
        self._send(_associate_ac(request, results, self.scp.source.max_pdu))


class _StorageSCP:
    """Where the PACS sends a C-MOVE's instances: a listening socket, one thread per
    association. Made once per source; ``shutdown()`` closes it and its associations."""

    def __init__(self, source: "DimseSource", bind: str, port: int):
        self.source = source
        self.tls = tls_context(source.settings, server_side=True)
        try:
            self.sock = socket.create_server((bind, port))
        except OSError as exc:
            raise PermanentError(f"cannot receive C-MOVE images on {bind}:{port} ({exc.strerror or exc}): is another "
                                 "clpipe run or DICOM program using MovePort? Choose another port and register it "
                                 "on the PACS") from None
        self.sock.settimeout(0.2)  # the accept loop looks at ``closed`` this often
        self.closed = False
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="dimse-storage-scp")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                sock, peer = self.sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.source.timeout)
            connection = _Connection(self, sock, peer)
            with self._lock:
                self._connections.add(connection)
            threading.Thread(target=connection.serve, daemon=True, name="dimse-storage").start()

    def forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def shutdown(self) -> None:
        self.closed = True
        self._thread.join(timeout=2.0)
        self.sock.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()


def _connect_words(exc: OSError, src: "DimseSource") -> str:
    if isinstance(exc, socket.gaierror):
        return f"the host name {src.host!r} is not known; check the SourceURL"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused on port {src.port}; check the host and port in the SourceURL and that the PACS is running"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return (f"no answer on port {src.port} within {min(src.timeout, 30.0):.0f} s; check the host and port, and that a "
                "firewall lets this machine through")
    return f"{exc.strerror or exc}; check the host, the port and the network"


# ----------------------------------------------------------------------------- the source


class DimseSource:
    """A PACS at ``dimse://CALLED_AET@host:port``. See the module docstring.

    ``settings``: calling_aet (our AE title), retrieve ("get" or "move"), move_port (our
    storage SCP, C-MOVE), tls_ca/tls_cert/tls_key, timeout (every connect, read and
    answer); ``settings.extra`` (for tests and benchmarks): ``reuse_associations``
    (default True), ``max_pdu`` (the largest PDU we accept, default 1 MiB)."""

    def __init__(self, url: SourceURL, settings: SourceSettings):
        self.url, self.settings = url, settings
        self.called_aet, self.host, self.port = url.called_aet, url.host, url.port
        self.calling_aet = (settings.calling_aet or "CLPIPE").strip()
        if not 0 < len(self.calling_aet) <= 16 or not self.calling_aet.isascii() or "\\" in self.calling_aet:
            raise ConfigError(f"CallingAET: {self.calling_aet!r} must be 1-16 ASCII characters without a backslash")
        self.retrieve = (settings.retrieve or "get").lower()
        if self.retrieve not in ("get", "move"):
            raise ConfigError(f"RetrieveMethod: {settings.retrieve!r} is neither \"get\" (C-GET) nor \"move\" (C-MOVE)")
        if self.retrieve == "move" and not 0 < int(settings.move_port or 0) < 65536:
            raise ConfigError("RetrieveMethod is \"move\": set MovePort to the TCP port on which the PACS sends the images "
                              f"to AE {self.calling_aet} (the PACS must know that AE title, this machine and that port)")
        self.timeout = float(settings.timeout or 60.0)
        self.reuse = bool(settings.extra.get("reuse_associations", True))
        self.max_pdu = int(settings.extra.get("max_pdu", MAX_PDU))
        self._tls = tls_context(settings)
        # C-FIND, and C-GET with one storage context per SOP class and transfer syntax (so
        # that the PACS can send each instance as it holds it), or C-MOVE
        self._get_contexts: list[tuple[str, list[str]]] = [(QR_FIND, [EXPLICIT_LE, IMPLICIT_LE])]
        if self.retrieve == "move":
            self._get_contexts += [(QR_MOVE, [EXPLICIT_LE, IMPLICIT_LE])]
        else:
            self._get_contexts += [(QR_GET, [EXPLICIT_LE, IMPLICIT_LE])]
            self._get_contexts += [(c, [ts]) for c in IMAGE_STORAGE for ts in (EXPLICIT_LE, IMPLICIT_LE, *COMPRESSED)]
            self._get_contexts += [(c, [ts]) for c in OTHER_STORAGE for ts in (EXPLICIT_LE, IMPLICIT_LE)]
        self._lock = threading.Lock()
        self._idle_channels: list[_Channel] = []
        self._scp = None  # the C-MOVE storage SCP, started on first use
        self._routes: dict[str, _Delivery] = {}  # C-MOVE: series UID -> its delivery
        self._closed = False
        self.associations_opened = 0  # for tests and the benchmark

    def __repr__(self) -> str:
        return f"DimseSource({self.where})"

    @property
    def where(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"

    # -- associations ------------------------------------------------------------------

    def _rejection(self, result: int, source: int, reason: int) -> Exception:
        """The error for an A-ASSOCIATE-RJ (PS3.8 9.3.4), in words."""
        where = f"the PACS {self.where}"
        if source == 1 and reason == 7:
            return PermanentError(f"{where} rejected the association: it does not know the called AE title "
                                  f"{self.called_aet!r}; check the AE title in the SourceURL (dimse://AET@host:port)")
        if source == 1 and reason == 3:
            return PermanentError(f"{where} rejected the association: it does not know our AE title "
                                  f"{self.calling_aet!r}; ask the PACS administrator to register it, or set CallingAET "
                                  "to an AE title the PACS knows")
        words = {(1, 2): "application context not supported", (2, 2): "protocol version not supported",
                 (3, 1): "temporary congestion", (3, 2): "local limit exceeded"}.get((source, reason), "no reason given")
        if result == 2:
            return TransientError(f"{where} rejected the association for now ({words}); it will be tried again")
        return PermanentError(f"{where} rejected the association ({words}); check the AE titles "
                              f"(ours: {self.calling_aet!r}, the PACS's: {self.called_aet!r})")

    def _borrow_channel(self) -> _Channel:
        """An idle C-GET association from the pool (still alive, not idle for long), else a new one."""
        stale, channel = [], None
        with self._lock:
            if self._closed:
                raise PermanentError(f"the connection to {self.where} was closed")
            while self._idle_channels:
                candidate = self._idle_channels.pop()
                if time.monotonic() - candidate.idle_since < IDLE_REUSE and candidate.alive():
                    channel = candidate
                    break
                stale.append(candidate)
        for old in stale:
            old.abort() if old.usable else old.close()
        if channel is None:
            channel = _Channel(self)
            with self._lock:
                self.associations_opened += 1
        return channel

    def _give_back_channel(self, channel: _Channel) -> None:
        with self._lock:
            if channel.usable and self.reuse and not self._closed:
                channel.idle_since = time.monotonic()
                self._idle_channels.append(channel)
                return
        channel.release() if channel.usable else channel.abort()

    def close(self) -> None:
        """Release the pooled associations and stop the C-MOVE storage SCP."""
        with self._lock:
            self._closed = True
            channels, self._idle_channels = self._idle_channels, []
            scp, self._scp = self._scp, None
        for channel in channels:
            channel.release()
        if scp is not None:
            scp.shutdown()

    def __enter__(self) -> "DimseSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- C-FIND ------------------------------------------------------------------------

    def _find(self, channel: _Channel, level: str, keys: dict) -> list:
        """One C-FIND; the identifiers of its matches."""
        from pydicom.dataset import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = level
        if any(isinstance(v, str) and not v.isascii() for v in keys.values()):
            query.SpecificCharacterSet = "ISO_IR 192"
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        matches = channel.find(query)
        code = channel.final.status
        if code != 0x0000:
            error = TransientError if code in (0xA700, 0xA701, 0xFE00) else PermanentError
            raise error(f"C-FIND at {level} level refused by {self.where} ({_status_words(code)}); check that the "
                        f"PACS allows Study Root queries from AE {self.calling_aet!r}")
        return matches

    def series(self, query: DicomQuery) -> Iterator[Series]:
        """Every series matching the query, each once, with its instance count. A listing
        that meets a transient fault (no answer, a broken connection, a busy PACS) is
        tried again on a new association, LISTING_ATTEMPTS times in all."""
        for attempt in range(1, LISTING_ATTEMPTS + 1):
            try:
                found = self._list(query)
                break
            except TransientError as exc:
                if attempt == LISTING_ATTEMPTS:
                    reason = str(exc).replace("; it will be tried again", "")
                    raise TransientError(f"listing the PACS {self.where} failed {attempt} times: {reason}") from None
                time.sleep(min(2.0 ** (attempt - 1), 10.0))
        yield from found

    def _list(self, query: DicomQuery) -> list[Series]:
        channel = self._borrow_channel()
        try:
            studies = self._studies(channel, query)
            return [series for study in studies for series in self._series_of(channel, study, query)]
        finally:
            self._give_back_channel(channel)  # before the engine starts retrieving: it may reuse it

    def _studies(self, channel: _Channel, query: DicomQuery) -> list[dict]:
        first, last = query.date_bounds()
        keys = {
            "StudyInstanceUID": "",
            "PatientID": query.patient_id,
            "PatientName": query.patient_name,
            "StudyDate": f"{first}-{last}" if first != last else first,
            "StudyTime": "",
            "StudyDescription": "",
            "AccessionNumber": query.accession_number,
            "ModalitiesInStudy": query.modality,
        }
        studies: dict[str, dict] = {}
        for identifier in self._find(channel, "STUDY", keys):
            attrs = {k: _text(identifier, k) for k in STUDY_KEYS}
            uid = attrs["StudyInstanceUID"]
            if uid and uid not in studies and _unanswered(query, identifier).study_matches(attrs):
                studies[uid] = attrs
        found = list(studies.values())
        return found[:query.limit] if query.limit and query.limit > 0 else found

    def _series_of(self, channel: _Channel, study: dict, query: DicomQuery) -> list[Series]:
        """A study's series. Modality and SeriesDescription are matched here, not by the
        PACS: servers differ in case sensitivity and in which keys they match at all."""
        keys = {"StudyInstanceUID": study["StudyInstanceUID"], "SeriesInstanceUID": "", "Modality": "",
                "SeriesNumber": "", "SeriesDescription": "", "NumberOfSeriesRelatedInstances": ""}
        found: dict[str, Series] = {}
        for identifier in self._find(channel, "SERIES", keys):
            attrs = dict(study)
            attrs.update({k: _text(identifier, k) for k in SERIES_KEYS})
            attrs["StudyInstanceUID"] = study["StudyInstanceUID"]
            uid = attrs["SeriesInstanceUID"]
            if query.series_description and "SeriesDescription" not in identifier:
                raise PermanentError(f"the PACS {self.where} does not return SeriesDescription in its C-FIND answers, "
                                     "so the SeriesDescription filter cannot be applied; remove that filter (and filter "
                                     "by patient, date, accession number or modality)")
            if not uid or uid in found or not query.series_matches(attrs):
                continue
            count = _text(identifier, "NumberOfSeriesRelatedInstances")
            found[uid] = Series(attrs=attrs, count=int(count) if count.isdigit() else None)
        for series in found.values():
            if series.count is None:  # the PACS does not say: count the instances
                keys = {"StudyInstanceUID": study["StudyInstanceUID"], "SeriesInstanceUID": series.uid, "SOPInstanceUID": ""}
                uids = {_text(i, "SOPInstanceUID") for i in self._find(channel, "IMAGE", keys)}
                series.count = len(uids - {""})
            series.ref = {"StudyInstanceUID": study["StudyInstanceUID"], "SeriesInstanceUID": series.uid}
        return list(found.values())

    # -- C-GET / C-MOVE ----------------------------------------------------------------

    @contextmanager
    def instances(self, entry) -> Iterator[Iterator[tuple[str, bytes]]]:
        """Retrieve one series (a :class:`Series`, or the engine's entry whose ``ref`` is
        one); yields ``(SOPInstanceUID, Part-10 bytes)`` as the instances arrive."""
        series = entry.ref if isinstance(getattr(entry, "ref", None), Series) else entry
        expected = getattr(entry, "count", 0) or series.count or 0
        items = self._get(series, expected) if self.retrieve == "get" else self._move(series, expected)
        try:
            yield items
        finally:
            items.close()  # an abandoned retrieval: its association is aborted, not reused

    def _get(self, series: Series, expected: int) -> Iterator[tuple[str, bytes]]:
        """C-GET on an association of our own, in the engine's thread."""
        channel = self._borrow_channel()
        received = 0
        try:
            for item in channel.get(self._request(series)):
                received += 1
                yield item
        finally:
            self._give_back_channel(channel)
        self._verdict(series, channel.final, received, expected)

    def _move(self, series: Series, expected: int) -> Iterator[tuple[str, bytes]]:
        """C-MOVE: the request from a thread of its own, the instances through our storage
        SCP (routed to this series' delivery by SeriesInstanceUID)."""
        self._start_scp()
        delivery = _Delivery(series.uid)
        with self._lock:
            if series.uid in self._routes:
                raise TransientError(f"series {series.uid} is already being retrieved")
            self._routes[series.uid] = delivery
        driver = channel = None
        try:
            channel = self._borrow_channel()
            driver = threading.Thread(target=self._drive, args=(channel, series, delivery), daemon=True, name="dimse-move")
            driver.start()
            end = yield from self._receive(delivery, driver)
        finally:
            delivery.cancelled.set()  # a C-STORE still waiting for room gives up
            if driver is not None and driver.is_alive():
                # the engine stopped reading before the C-MOVE ended: stop it at the PACS
                # too (A-ABORT ends the move's sub-operations), not left running
                channel.abort()
            with self._lock:
                if self._routes.get(series.uid) is delivery:
                    del self._routes[series.uid]
        if end.error is not None:
            if isinstance(end.error, (TransientError, PermanentError)):
                raise end.error
            raise TransientError(f"C-MOVE of series {series.uid} from {self.where} failed: "
                                 f"{end.error.__class__.__name__}: {end.error}")
        self._verdict(series, end.status, delivery.received, expected)

    def _request(self, series: Series):
        from pydicom.dataset import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = series.attrs.get("StudyInstanceUID", "")
        query.SeriesInstanceUID = series.uid
        return query

    def _drive(self, channel: _Channel, series: Series, delivery: _Delivery) -> None:
        """In a thread of its own: send the C-MOVE and wait for its end, while the C-STOREs
        it causes go to the delivery; then the association back to the pool."""
        final, error = _Final(None), None
        try:
            final = channel.move(self._request(series), self.calling_aet, delivery)
        except Exception as exc:  # noqa: BLE001 - handed on to the engine's thread
            error = exc
        if channel.usable:  # back in the pool first: the engine's next series may take it at once
            self._give_back_channel(channel)
            delivery.finish(_End(final, error))
        else:  # the engine need not wait for the association to be closed
            delivery.finish(_End(final, error))
            self._give_back_channel(channel)

    @staticmethod
    def _receive(delivery: _Delivery, driver: threading.Thread):
        """The engine's side of a delivery: the instances; returns how it ended."""
        while True:
            try:
                item = delivery.items.get(timeout=1.0)
            except queue.Empty:
                if not driver.is_alive() and delivery.items.empty():
                    return _End(_Final(None), RuntimeError("the C-MOVE stopped without an answer"))
                continue
            if isinstance(item, _End):
                return item
            yield item

    def _verdict(self, series: Series, final: _Final, received: int, expected: int) -> None:
        """Nothing when the retrieval ended well and brought every instance; else an error
        saying how it ended and what to check."""
        what = f"C-{self.retrieve.upper()} of series {series.uid} from {self.where}"
        code = final.status
        if code is None:
            raise TransientError(f"{what}: no answer within {self.timeout:.0f} s, or the association was aborted; "
                                 "it will be tried again")
        if code == 0xA801:
            raise PermanentError(f"{what}: the PACS does not know the C-MOVE destination AE {self.calling_aet!r} "
                                 f"({_status_words(code)}): register AE title {self.calling_aet!r} with this machine's "
                                 f"address and port {self.settings.move_port} on the PACS, or use RetrieveMethod \"get\"")
        if code in (0x0122, 0x0124):
            raise PermanentError(f"{what} refused ({_status_words(code)}); check that the PACS allows "
                                 f"C-{self.retrieve.upper()} for AE {self.calling_aet!r}")
        if code in (0x0000, 0xB000) and not final.failed and received >= expected:
            return
        hint = (f"check that the PACS knows AE {self.calling_aet!r} at this machine's address and port "
                f"{self.settings.move_port}, and that a firewall lets it connect there" if self.retrieve == "move" else
                "the PACS may hold a SOP class or transfer syntax clpipe did not offer")
        comment = f" ({final.comment})" if final.comment else ""
        if code in (0x0000, 0xB000) or 0xA700 <= code <= 0xA7FF or code == 0xFE00 or 0xC000 <= code <= 0xCFFF:
            raise TransientError(f"{what} ended with {_status_words(code)}{comment}: {received} of {expected} instances "
                                 f"arrived, {final.failed} sub-operations failed; {hint}")
        raise PermanentError(f"{what} refused ({_status_words(code)}){comment}")

    # -- receiving C-STOREs (C-MOVE) ---------------------------------------------------

    def _start_scp(self) -> None:
        """The storage SCP that receives C-MOVE sub-operations (once per source), on the
        loopback interface when the PACS is on this machine, else on every interface."""
        with self._lock:
            if self._scp is not None:
                return
            if self._closed:
                raise PermanentError(f"the connection to {self.where} was closed")
            bind = "127.0.0.1" if _is_loopback(self.host) else "0.0.0.0"
            self._scp = _StorageSCP(self, bind, int(self.settings.move_port))

    def _store(self, fields: dict[int, bytes], data: list, syntax: str, source_aet: str) -> int:
        """A C-STORE from the PACS (C-MOVE): hand it to the delivery of its series."""
        dataset = b"".join(data)
        try:
            series_uid = _series_uid(dataset, syntax)
        except Exception:  # noqa: BLE001 - an unreadable dataset is refused, not fatal
            return 0xC000
        with self._lock:
            delivery = self._routes.get(series_uid)
        if delivery is None:
            return REFUSED
        uid = _field_text(fields, 0x1000)
        if not delivery.put((uid, part10_header(_field_text(fields, 0x0002), uid, syntax, source_aet) + dataset)):
            return REFUSED
        delivery.received += 1
        return 0x0000


def _series_uid(data: bytes, transfer_syntax: str) -> str:
    """The SeriesInstanceUID of an encoded dataset, reading no further than that element."""
    from pydicom.filereader import read_dataset

    if transfer_syntax == DEFLATED_LE:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, 1 << 20)
    ds = read_dataset(io.BytesIO(data), transfer_syntax == IMPLICIT_LE, True,
                      stop_when=lambda tag, vr, length: tag > 0x0020000E)
    return _text(ds, "SeriesInstanceUID")
