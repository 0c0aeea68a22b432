"""The associations we request of the PACS (C-FIND, C-GET, C-MOVE): connect (plain TCP
or TLS), negotiate, run one DIMSE operation at a time, release or abort; the TLS context
made from the TLS settings; errors in words, TransientError or PermanentError."""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from ...errors import ConfigError, PermanentError, TransientError
from ..dicom import SourceSettings
from ..part10 import part10_header
from ..tls import TLSFileError, load_context
from .identifiers import Identifier, Unreadable, decode, encode
from .messages import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    C_FIND_RQ,
    C_FIND_RSP,
    C_GET_RQ,
    C_GET_RSP,
    C_MOVE_RQ,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_FIELD,
    ERROR_COMMENT,
    FAILED_SUBOPERATIONS,
    NO_STATUS,
    PENDING,
    STATUS,
    SUCCESS,
    Final,
    field_text,
    field_us,
    request,
)
from .pdu import (
    A_ABORT_PDU,
    A_ASSOCIATE_AC_PDU,
    A_ASSOCIATE_RJ_PDU,
    A_RELEASE_RP,
    A_RELEASE_RP_PDU,
    A_RELEASE_RQ,
    A_RELEASE_RQ_PDU,
    CONTEXT_ACCEPTED,
    MAX_PDU_BYTES,
    RJ_REASONS,
    RJ_SOURCE_USER,
    RJ_TRANSIENT,
    RJ_USER_CALLED_AE,
    RJ_USER_CALLING_AE,
    associate_rq,
    context_id,
    decode_associate,
    rj_fields,
)
from .uids import EXPLICIT_LE, IMPLICIT_LE, QR_FIND, QR_GET, QR_MOVE, QUERY_RETRIEVE
from .wire import Wire

CONNECT_TIMEOUT = 30.0  # the longest wait for a TCP connection, whatever the NetworkTimeout
RELEASE_TIMEOUT = 5.0  # the longest wait for the PACS's answer to our A-RELEASE-RQ


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
    try:
        return load_context(ca, cert, key, server_side=server_side)
    except TLSFileError as exc:
        raise ConfigError(exc.message(ca, cert, key)) from None


class Requestor(Protocol):
    """What an association we request needs to know of our side (the DimseSource)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def timeout(self) -> float: ...
    @property
    def where(self) -> str: ...
    @property
    def called_aet(self) -> str: ...
    @property
    def calling_aet(self) -> str: ...
    @property
    def retrieve(self) -> str: ...
    @property
    def max_pdu(self) -> int: ...
    @property
    def tls(self) -> ssl.SSLContext | None: ...
    @property
    def contexts(self) -> Sequence[tuple[str, Sequence[str]]]: ...


def connect_words(exc: OSError, src: Requestor) -> str:
    """Why a TCP connection to the PACS failed, and what to check."""
    if isinstance(exc, socket.gaierror):
        return f"the host name {src.host!r} is not known; check the SourceURL"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused on port {src.port}; check the host and port in the SourceURL and that the PACS is running"
    if isinstance(exc, TimeoutError):
        return (
            f"no answer on port {src.port} within {min(src.timeout, CONNECT_TIMEOUT):.0f} s; check the host and "
            "port, and that a firewall lets this machine through"
        )
    return f"{exc.strerror or exc}; check the host, the port and the network"


def rejection(src: Requestor, result: int, source: int, reason: int) -> Exception:
    """The error for an A-ASSOCIATE-RJ (PS3.8 9.3.4), in words."""
    where = f"the PACS {src.where}"
    if source == RJ_SOURCE_USER and reason == RJ_USER_CALLED_AE:
        return PermanentError(
            f"{where} rejected the association: it does not know the called AE title "
            f"{src.called_aet!r}; check the AE title in the SourceURL (dimse://AET@host:port)"
        )
    if source == RJ_SOURCE_USER and reason == RJ_USER_CALLING_AE:
        return PermanentError(
            f"{where} rejected the association: it does not know our AE title "
            f"{src.calling_aet!r}; ask the PACS administrator to register it, or set CallingAET "
            "to an AE title the PACS knows"
        )
    words = RJ_REASONS.get((source, reason), "no reason given")
    if result == RJ_TRANSIENT:
        return TransientError(f"{where} rejected the association for now ({words}); it will be tried again")
    return PermanentError(
        f"{where} rejected the association ({words}); check the AE titles (ours: {src.calling_aet!r}, the PACS's: {src.called_aet!r})"
    )


class Channel(Wire):
    """An association we request (C-FIND, C-GET, C-MOVE), over a plain or TLS socket,
    used by one thread at a time. Errors are TransientError/PermanentError in words."""

    def __init__(self, source: Requestor):
        self.source = source
        self.idle_since = time.monotonic()
        self.usable = False  # established, and no operation half done
        self.final = Final(None)
        self._message_id = 0
        super().__init__(self._connect(), f"the PACS {source.where}", source.timeout)
        try:
            self._unblock()
            self._negotiate()
        except BaseException:
            self.close()
            raise
        self.usable = True

    # -- transport ---------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        src = self.source
        try:
            sock = socket.create_connection((src.host, src.port), timeout=min(src.timeout, CONNECT_TIMEOUT))
        except OSError as exc:
            raise TransientError(f"could not connect to the PACS {src.where}: {connect_words(exc, src)}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if src.tls is not None:
            try:
                sock = src.tls.wrap_socket(sock, server_hostname=src.host)
            except ssl.SSLCertVerificationError as exc:
                sock.close()
                raise PermanentError(
                    f"the PACS {src.where}: its TLS certificate is not trusted ({exc.verify_message}); check TLSCAFile"
                ) from None
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise TransientError(
                    f"could not connect to the PACS {src.where}: the TLS handshake failed ({exc}); check "
                    "that the PACS speaks TLS on this port and TLSCAFile/TLSCertFile/TLSKeyFile"
                ) from None
        sock.settimeout(src.timeout)
        return sock

    def _negotiate(self) -> None:
        src = self.source
        requested = {context_id(n): abstract for n, (abstract, _) in enumerate(src.contexts)}
        # for the storage classes we take the SCP role (C-GET's C-STOREs come to us)
        storage = [a for a in dict.fromkeys(requested.values()) if a not in QUERY_RETRIEVE]
        self._send(associate_rq(src.called_aet, src.calling_aet, src.contexts, storage, src.max_pdu))
        kind, pdu = self._read_pdu()
        if kind == A_ASSOCIATE_RJ_PDU and len(pdu) >= 4:  # reserved, result, source, reason
            raise rejection(src, *rj_fields(pdu))
        if kind == A_ABORT_PDU:
            raise TransientError(
                f"the PACS {src.where} aborted the association request; check the AE titles "
                f"(ours: {src.calling_aet!r}, the PACS's: {src.called_aet!r})"
            )
        if kind != A_ASSOCIATE_AC_PDU:
            raise TransientError(f"the PACS {src.where} answered the association request with PDU type {kind}: is this its DICOM port?")
        answer = decode_associate(kind, pdu, self.where)
        for context in answer.contexts:
            if context.result == CONTEXT_ACCEPTED and context.context_id in requested and context.transfer_syntax:
                self.accepted[context.context_id] = (requested[context.context_id], str(context.transfer_syntax[0]))
        self.peer_max = answer.maximum_length_received or MAX_PDU_BYTES
        offered = {abstract for abstract, _ in self.accepted.values()}
        if QR_FIND not in offered:
            self.abort()
            raise PermanentError(f"the PACS {src.where} does not offer Study Root C-FIND to AE {src.calling_aet!r}; allow it there")
        if src.retrieve == "move" and QR_MOVE not in offered:
            self.abort()
            raise PermanentError(
                f"the PACS {src.where} does not offer Study Root C-MOVE to AE {src.calling_aet!r}; "
                'allow it there, or use RetrieveMethod "get"'
            )
        if src.retrieve == "get" and QR_GET not in offered:
            self.abort()
            raise PermanentError(
                f"the PACS {src.where} does not offer Study Root C-GET to AE {src.calling_aet!r}; "
                'allow it there, or use RetrieveMethod "move"'
            )
        if src.retrieve == "get" and not offered - set(QUERY_RETRIEVE):
            self.abort()
            raise PermanentError(f"the PACS {src.where} accepted none of the storage SOP classes for C-GET")

    def release(self) -> None:
        """A-RELEASE (bounded: a PACS that does not answer within 5 s is left). When the
        PACS asks to release at the same moment (a release collision, PS3.8 7.2), we, the
        requestor, answer its request and are done."""
        try:
            self.sock.settimeout(min(self.source.timeout, RELEASE_TIMEOUT))
            self._send(A_RELEASE_RQ)
            while True:
                kind = self._read_pdu()[0]
                if kind in (A_RELEASE_RP_PDU, A_ABORT_PDU):
                    break
                if kind == A_RELEASE_RQ_PDU:  # the PACS's own A-RELEASE-RQ
                    self._send(A_RELEASE_RP)
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

    def _request(self, model: str, command: int, identifier: Identifier, destination: str = "") -> None:
        """Send a C-FIND/C-GET/C-MOVE request: its command set, then the identifier."""
        context, (_, syntax) = next((c, a) for c, a in self.accepted.items() if a[0] == model)
        encoded = encode(identifier, implicit=syntax == IMPLICIT_LE)
        self._message_id = self._message_id % 0xFFFF + 1
        self.usable = False  # until the final response: an abandoned request leaves the association unusable
        self.final = Final(None)
        self._send_message(context, request(model, command, self._message_id, destination), True)
        self._send_message(context, encoded, False)

    def find(self, identifier: Identifier) -> list[Identifier]:
        """A Study Root C-FIND: the identifiers of its matches (keyword -> text)."""
        self._request(QR_FIND, C_FIND_RQ, identifier)
        matches = []
        for context, fields, data in self.messages():
            if field_us(fields, COMMAND_FIELD) != C_FIND_RSP:
                raise TransientError(f"the PACS {self.source.where} sent an unexpected DIMSE message during a C-FIND")
            status = field_us(fields, STATUS, NO_STATUS)
            if status in PENDING:
                if data:
                    implicit = self.accepted.get(context, ("", EXPLICIT_LE))[1] == IMPLICIT_LE
                    try:
                        matches.append(decode(b"".join(data), implicit))
                    except Unreadable as exc:
                        raise TransientError(f"the PACS {self.source.where} sent a C-FIND answer that cannot be read ({exc})") from None
                continue
            self.final = Final(status, 0, field_text(fields, ERROR_COMMENT))
            self.usable = True
            return matches
        raise AssertionError("unreachable: messages() ends only by raising")

    def get(self, identifier: Identifier) -> Iterator[tuple[str, bytes]]:
        """Send a C-GET and yield ``(SOPInstanceUID, Part-10 bytes)`` for each C-STORE it
        causes (answered with success as it arrives); ``self.final`` says how it ended.
        The next message is read only when the engine asks for the next instance."""
        yield from self.send_get(identifier)

    def send_get(self, identifier: Identifier) -> Generator[tuple[str, bytes], None, None]:
        """Send a C-GET now; its instances are read as :meth:`get` reads them, from the
        iterator returned (so that one thread can send several and read each one's
        instances as they arrive: the source's ``instances_many``)."""
        self._request(QR_GET, C_GET_RQ, identifier)
        return self._stores()

    def _stores(self) -> Generator[tuple[str, bytes], None, None]:
        for context, fields, data in self.messages():
            command = field_us(fields, COMMAND_FIELD)
            if command == C_STORE_RQ and data:
                sop_class, uid = field_text(fields, AFFECTED_SOP_CLASS_UID), field_text(fields, AFFECTED_SOP_INSTANCE_UID)
                syntax = self.accepted.get(context, ("", EXPLICIT_LE))[1]
                # answered at once, before the engine writes it: the PACS reads the next
                # instance meanwhile (a C-GET's success only says "received": should the
                # engine fail to write it, the series is retrieved again)
                self._respond(context, fields, C_STORE_RSP, SUCCESS)
                yield uid, b"".join([part10_header(sop_class, uid, syntax, self.source.called_aet), *data])
            elif command == C_GET_RSP:
                status = field_us(fields, STATUS, NO_STATUS)
                if status in PENDING:
                    continue
                self.final = Final(status, field_us(fields, FAILED_SUBOPERATIONS), field_text(fields, ERROR_COMMENT))
                self.usable = True
                return
            else:
                raise TransientError(
                    f"the PACS {self.source.where} sent an unexpected DIMSE message (command 0x{command:04X}) during a C-GET"
                )

    def move(self, identifier: Identifier, destination: str, keep_waiting: Callable[[], bool] | None = None) -> Final:
        """Send a C-MOVE to ``destination`` and wait for its final response (the
        instances go to that AE's storage SCP, not here). Pending responses are optional
        (PS3.4 C.4.2.1.5): while ``keep_waiting()`` says so (the delivery has received an
        instance within the timeout), a silent association is still waited for."""
        self.keep_waiting = keep_waiting
        try:
            self._request(QR_MOVE, C_MOVE_RQ, identifier, destination)
            for _context, fields, _data in self.messages():
                if field_us(fields, COMMAND_FIELD) != C_MOVE_RSP:
                    raise TransientError(f"the PACS {self.source.where} sent an unexpected DIMSE message during a C-MOVE")
                status = field_us(fields, STATUS, NO_STATUS)
                if status in PENDING:
                    continue
                self.final = Final(status, field_us(fields, FAILED_SUBOPERATIONS), field_text(fields, ERROR_COMMENT))
                self.usable = True
                return self.final
            raise AssertionError("unreachable: messages() ends only by raising")
        finally:
            self.keep_waiting = None
