"""PDUs and DIMSE messages over one socket, either side of an association: reading PDUs
through a buffer, P-DATA-TF fragments joined into messages, the fixed PDUs answered.
Every wait is bounded by the timeout; errors are TransientError in words."""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Callable, Iterator

from ...errors import TransientError
from .messages import (
    COMMAND_DATA_SET_TYPE,
    NO_DATASET,
    field_us,
    parse_command,
    response,
)
from .pdu import (
    A_ABORT,
    A_ABORT_PDU,
    A_RELEASE_RP,
    A_RELEASE_RQ_PDU,
    DEFAULT_MAX_PDU,
    HEADER,
    MAX_PDU_BYTES,
    P_DATA_TF_PDU,
    PDV_COMMAND,
    PDV_HEADER,
    PDV_LAST,
    abort_fields,
    p_data_tf,
)

READ_SIZE = 1 << 18  # the receive buffer's size (grown for a larger PDU): bytes asked of the socket at a time
PDV_LENGTH_FIELD = 4  # the PDV item length counts the bytes after its own four


class Released(TransientError):
    """The peer released the association (normal for the storage SCP's peer)."""


class Wire:
    """PDUs and DIMSE messages over one socket, either side of an association. Every
    wait is bounded by the socket's timeout; errors are TransientError in words."""

    def __init__(self, sock: socket.socket, where: str, timeout: float):
        self.sock, self.where, self.timeout = sock, where, timeout
        self.peer_max = DEFAULT_MAX_PDU
        self.accepted: dict[int, tuple[str, str]] = {}  # context ID -> (abstract syntax, transfer syntax)
        #: received bytes not yet read are ``_buffer[_offset:_end]``; the socket reads into
        #: the buffer itself (recv_into), so no large block is allocated per read
        self._buffer, self._offset, self._end = bytearray(READ_SIZE), 0, 0
        #: asked when a read times out: True to wait another timeout (a C-MOVE whose PACS
        #: sends no Pending responses is alive while its instances keep arriving)
        self.keep_waiting: Callable[[], bool] | None = None
        self._readable: select.poll | None = None  # set by _unblock(): waits polled here
        self._writable: select.poll | None = None

    def _unblock(self) -> None:
        """A plain TCP socket made non-blocking, its waits bounded here: each read and write
        is tried first and the socket polled only when it is not ready, where a socket with
        a timeout polls before every call (a second system call per read and per write,
        each giving up the GIL, which parallel associations in one process contend for).
        A TLS socket keeps its timeout."""
        if isinstance(self.sock, ssl.SSLSocket) or not hasattr(select, "poll"):
            return
        self.sock.setblocking(False)
        self._readable, self._writable = select.poll(), select.poll()
        self._readable.register(self.sock, select.POLLIN)
        self._writable.register(self.sock, select.POLLOUT)

    def _recv_into(self, view: memoryview) -> int:
        """``sock.recv_into``; TimeoutError when nothing arrives within the timeout."""
        if self._readable is None:
            return self.sock.recv_into(view)
        while True:
            try:
                return self.sock.recv_into(view)
            except BlockingIOError:
                if not self._readable.poll(self.timeout * 1000):
                    raise TimeoutError("timed out") from None

    def _recv(self, size: int) -> bytes:
        """Exactly ``size`` bytes, read through a buffer (one recv() often holds a whole
        C-STORE: its command PDU, its data PDU and the next response's header)."""
        buffer = self._buffer
        while self._end - self._offset < size:
            if self._offset:  # what is left to the front (a few bytes, usually none)
                left = self._end - self._offset
                buffer[:left] = buffer[self._offset : self._end]
                self._offset, self._end = 0, left
            if len(buffer) < size:
                buffer.extend(bytes(size - len(buffer)))
            try:
                got = self._recv_into(memoryview(buffer)[self._end :])
            except TimeoutError:  # socket.timeout is TimeoutError
                if self.keep_waiting is not None and self.keep_waiting():
                    continue
                raise TransientError(
                    f"no answer from {self.where} within {self.timeout:.0f} s (NetworkTimeout); it will be tried again"
                ) from None
            except OSError as exc:
                raise TransientError(f"the connection to {self.where} broke ({exc})") from None
            if not got:
                raise TransientError(f"{self.where} closed the connection")
            self._end += got
        start = self._offset
        self._offset += size
        return bytes(memoryview(buffer)[start : self._offset])

    def unread(self) -> bool:
        """Bytes received and not yet read (the next message may be read without waiting
        for the socket: poll() would not say so)."""
        return self._end > self._offset

    def _read_pdu(self) -> tuple[int, bytes]:
        """(PDU type, the bytes after its header) of the next PDU."""
        kind, _reserved, length = HEADER.unpack(self._recv(HEADER.size))
        if length > MAX_PDU_BYTES:
            raise TransientError(f"{self.where} sent a PDU of {length} bytes: not DICOM, or broken")
        return kind, self._recv(length)

    def _send(self, data: bytes) -> None:
        try:
            if self._writable is None:
                self.sock.sendall(data)
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[self.sock.send(view) :]
                except BlockingIOError:
                    if not self._writable.poll(self.timeout * 1000):
                        raise TimeoutError("timed out") from None
        except OSError as exc:
            raise TransientError(f"the connection to {self.where} broke ({exc})") from None

    def _send_message(self, context_id: int, data: bytes, command: bool) -> None:
        """One command set or dataset as P-DATA-TF PDUs no larger than the peer accepts."""
        for encoded in p_data_tf(context_id, data, command, self.peer_max):
            self._send(encoded)

    def _respond(self, context_id: int, fields: dict[int, bytes], command: int, status: int) -> None:
        """A C-STORE/C-ECHO response to a request's command fields."""
        self._send_message(context_id, response(fields, command, status), True)

    def messages(self) -> Iterator[tuple[int, dict[int, bytes], list[bytes]]]:
        """(context ID, command fields, dataset fragments) for each message the peer sends."""
        command: list[bytes] = []
        data: list[bytes] = []
        fields: dict[int, bytes] | None = None
        pdv_header, read_pdv = PDV_HEADER.size, PDV_HEADER.unpack_from  # (locals: the per-instance path)
        while True:
            kind, pdu = self._read_pdu()
            if kind != P_DATA_TF_PDU:
                self._unexpected(kind, pdu)
            i = 0
            while i + pdv_header <= len(pdu):
                length, context_id, control = read_pdv(pdu, i)
                fragment = pdu[i + pdv_header : i + PDV_LENGTH_FIELD + length]
                i += PDV_LENGTH_FIELD + length
                if control & PDV_COMMAND:
                    command.append(fragment)
                    if control & PDV_LAST:
                        fields, command = parse_command(b"".join(command)), []
                        if field_us(fields, COMMAND_DATA_SET_TYPE, NO_DATASET) == NO_DATASET:
                            yield context_id, fields, []
                            fields = None
                else:
                    data.append(fragment)
                    if control & PDV_LAST:
                        if fields is None:
                            raise TransientError(f"{self.where} sent a dataset without a command")
                        yield context_id, fields, data
                        fields, data = None, []

    def _unexpected(self, kind: int, pdu: bytes) -> None:
        """A PDU other than P-DATA-TF in the middle of an operation: always an error
        (an A-RELEASE-RQ is answered first)."""
        if kind == A_ABORT_PDU:
            source, reason = abort_fields(pdu)
            raise TransientError(f"{self.where} aborted the association (source {source}, reason {reason})")
        if kind == A_RELEASE_RQ_PDU:
            self._send(A_RELEASE_RP)
            raise Released(f"{self.where} released the association in the middle of an operation")
        raise TransientError(f"{self.where} sent an unexpected PDU (type {kind})")

    def abort(self) -> None:
        """A-ABORT (if the socket still takes it), then close."""
        try:
            self.sock.sendall(A_ABORT)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
