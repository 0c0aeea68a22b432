"""The storage SCP that receives a C-MOVE's instances: the PACS opens associations to
it, every presentation context is accepted with the first transfer syntax it proposes,
and each C-STORE is handed to ``on_store`` (which routes it to the delivery of its
series); the delivery carries the instances to the engine's thread through a bounded
queue."""

from __future__ import annotations

import io
import queue
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from ...errors import PermanentError, TransientError
from ..part10 import Unfollowable, dataset_text
from .messages import (
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_FIELD,
    OUT_OF_RESOURCES,
    SUCCESS,
    Final,
    field_us,
    text,
)
from .pdu import (
    A_ASSOCIATE_RQ_PDU,
    MAX_PDU_BYTES,
    RJ_PERMANENT,
    RJ_SOURCE_USER,
    RJ_USER_CALLED_AE,
    associate_ac,
    associate_rj,
    decode_associate,
)
from .uids import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, PYNETDICOM_ROOT
from .wire import Released, Wire

QUEUE_DEPTH = 8  # received instances held for the engine before the sender is made to wait
#: A PACS built on pynetdicom (its implementation class UID root) sends C-MOVE sub-operations
#: with send_c_store(), whose thread can lose a response that arrives too soon after the
#: request (its reactor takes it off the queue: a race in pynetdicom 3.0); the sub-operation
#: then fails after its DIMSE timeout. Measured with pynetdicom's qrscp: 3 of 195 C-MOVEs
#: failed when we answered at once, none with 3 ms. Such peers are answered after this delay.
PYNETDICOM_DELAY = 0.005
REFUSED = OUT_OF_RESOURCES  # C-STORE status for an instance nobody waits for ("out of resources")
ACCEPT_POLL = 0.2  # the accept loop looks at ``closed`` this often
SERIES_INSTANCE_UID = 0x0020000E

#: ``on_store(command fields, dataset fragments, transfer syntax, the PACS's AE title)``:
#: the C-STORE status to answer with
StoreHandler = Callable[[dict[int, bytes], list[bytes], str, str], int]


class End:
    """The last item of a delivery: how the C-MOVE ended."""

    def __init__(self, status: Final, error: Exception | None = None):
        self.status, self.error = status, error


class Delivery:
    """C-MOVE: received instances on their way from the storage SCP's thread to the
    engine's thread: a bounded queue (a fast PACS waits for our disk instead of filling
    memory)."""

    def __init__(self, series_uid: str):
        self.series_uid = series_uid
        self.items: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH)
        self.cancelled = threading.Event()
        self.received = 0
        self.last_arrival = time.monotonic()  # when the C-MOVE last showed life (its start, an instance)

    def put(self, item: Any) -> bool:
        """Hand one item on; False when the engine stopped listening."""
        while not self.cancelled.is_set():
            try:
                self.items.put(item, timeout=0.2)
                self.last_arrival = time.monotonic()
                return True
            except queue.Full:
                continue
        return False

    def finish(self, end: End) -> None:
        try:
            self.items.put_nowait(end)
        except queue.Full:  # the engine is still draining: wait for room unless it stopped
            self.put(end)


def series_uid(data: bytes, transfer_syntax: str) -> str:
    """The SeriesInstanceUID of an encoded dataset, reading no further than that element:
    by the shared Part-10 walker (sources/part10.py), else (a dataset it cannot follow) by
    pydicom."""
    if transfer_syntax == DEFLATED_LE:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, 1 << 20)
    try:
        return dataset_text(data, SERIES_INSTANCE_UID, implicit=transfer_syntax == IMPLICIT_LE)
    except Unfollowable:
        pass
    from pydicom.filereader import read_dataset

    ds = read_dataset(io.BytesIO(data), transfer_syntax == IMPLICIT_LE, True, stop_when=lambda tag, vr, length: tag > SERIES_INSTANCE_UID)
    return text(ds, "SeriesInstanceUID")


class Connection(Wire):
    """An association the PACS requests to our storage SCP, for C-MOVE sub-operations:
    every presentation context is accepted with the first transfer syntax it proposes
    (nothing is decoded, so any will do but the retired big-endian one)."""

    def __init__(self, scp: StorageSCP, sock: socket.socket, peer: tuple[Any, ...]):
        super().__init__(sock, f"the PACS at {peer[0]}", scp.timeout)
        self.scp = scp
        self.calling_aet = ""
        self.respond_delay = 0.0

    def serve(self) -> None:
        try:
            if self.scp.tls is not None:
                self.sock = self.scp.tls.wrap_socket(self.sock, server_side=True)
            self._unblock()
            self._accept()
            for context, fields, data in self.messages():
                command = field_us(fields, COMMAND_FIELD)
                if command == C_STORE_RQ and data:
                    syntax = self.accepted.get(context, ("", EXPLICIT_LE))[1]
                    status = self.scp.on_store(fields, data, syntax, self.calling_aet)
                    if self.respond_delay:
                        time.sleep(self.respond_delay)
                    self._respond(context, fields, C_STORE_RSP, status)
                elif command == C_ECHO_RQ:
                    self._respond(context, fields, C_ECHO_RSP, SUCCESS)
                else:
                    self.abort()
                    return
        except Released:
            pass
        except (TransientError, OSError, ssl.SSLError):
            self.abort()  # the C-MOVE's final status says what went missing
        finally:
            self.close()
            self.scp.forget(self)

    def _accept(self) -> None:
        kind, pdu = self._read_pdu()
        if kind != A_ASSOCIATE_RQ_PDU:
            raise TransientError(f"{self.where} sent PDU type {kind} instead of an association request")
        request = decode_associate(kind, pdu, self.where)
        self.calling_aet = request.calling_ae_title
        if request.called_ae_title != self.scp.aet:
            # only a move to our AE title is ours
            self._send(associate_rj(RJ_PERMANENT, RJ_SOURCE_USER, RJ_USER_CALLED_AE))
            raise Released(f"{self.where} called AE {request.called_ae_title!r}, not ours ({self.scp.aet!r}); refused")
        self.peer_max = request.maximum_length_received or MAX_PDU_BYTES
        if request.implementation_class_uid.startswith(PYNETDICOM_ROOT):
            self.respond_delay = PYNETDICOM_DELAY
        results: list[tuple[int, str, bool]] = []
        for offer in request.contexts:
            number, syntaxes = offer.context_id, offer.transfer_syntax
            chosen = next((ts for ts in syntaxes if ts != EXPLICIT_BE), "")
            if chosen:
                self.accepted[number] = (offer.abstract_syntax, chosen)
            results.append((number, chosen or (syntaxes or [EXPLICIT_LE])[0], bool(chosen)))
        self._send(associate_ac(request, results, self.scp.max_pdu))


class StorageSCP:
    """Where the PACS sends a C-MOVE's instances: a listening socket on ``bind:port``,
    one thread per association, answering only associations to our AE title ``aet``.
    Made once per source; ``shutdown()`` closes it and its associations."""

    def __init__(self, bind: str, port: int, *, aet: str, timeout: float, max_pdu: int, tls: ssl.SSLContext | None, on_store: StoreHandler):
        self.aet, self.timeout, self.max_pdu, self.tls, self.on_store = aet, timeout, max_pdu, tls, on_store
        try:
            self.sock = socket.create_server((bind, port))
        except OSError as exc:
            raise PermanentError(
                f"cannot receive C-MOVE images on {bind}:{port} ({exc.strerror or exc}): is another "
                "clpipe run or DICOM program using MovePort? Choose another port and register it "
                "on the PACS"
            ) from None
        self.sock.settimeout(ACCEPT_POLL)
        self.closed = False
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="dimse-storage-scp")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                sock, peer = self.sock.accept()
            except TimeoutError:  # socket.timeout is TimeoutError
                continue
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout)
            connection = Connection(self, sock, peer)
            with self._lock:
                self._connections.add(connection)
            threading.Thread(target=connection.serve, daemon=True, name="dimse-storage").start()

    def forget(self, connection: Connection) -> None:
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
