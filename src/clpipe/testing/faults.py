"""The injected HTTP faults of the Flywheel test server and of the fault proxy, in one place.

A :class:`Faults` holds the faults set on one server; its handler ``take``s the fault for each
request (by method and URL-decoded path), then applies it: :func:`corrupted` to the body
before the headers go out, :func:`write_body` to send it (whole, or cut off). The kinds are
listed at ``FlywheelTestServer.add_fault``.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

FAULT_KINDS = ("status", "drop", "truncate", "reset", "delay", "corrupt")
LINK_CHUNK = 64 << 10  # bytes sent at once through a capped link


class Link:
    """A simulated wide-area link in front of a test server: ``latency`` seconds slept before
    every answer (a fixed delay per request, whatever its size) and ``bandwidth`` bytes per
    second at most for all the answers' bodies together (0: no cap), as one shared line.
    Both may be changed while the server runs."""

    def __init__(self, latency: float = 0.0, bandwidth: float = 0.0) -> None:
        if latency < 0 or bandwidth < 0:
            raise ValueError("latency and bandwidth must not be negative")
        self.latency, self.bandwidth = latency, bandwidth
        self._free_at = 0.0  # when the shared line has sent what it was given
        self._lock = threading.Lock()

    def wait(self) -> None:
        """The delay of one request (before its answer)."""
        if self.latency > 0:
            time.sleep(self.latency)

    def send(self, wfile, data: bytes) -> None:
        """Write ``data`` to ``wfile``, no faster than ``bandwidth`` (shared by all senders)."""
        if self.bandwidth <= 0:
            wfile.write(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), LINK_CHUNK):
            chunk = view[start : start + LINK_CHUNK]
            with self._lock:
                begin = max(time.monotonic(), self._free_at)
                self._free_at = begin + len(chunk) / self.bandwidth
                done = self._free_at
            pause = done - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            wfile.write(chunk)


@dataclass
class Fault:
    """An injected failure for requests whose path matches ``pattern`` (see ``add_fault``)."""

    pattern: str
    kind: str
    count: int | None = None  # how many matching requests get it; None = all
    status: int = 500
    delay: float = 0.0
    method: str | None = None
    hits: int = 0
    retry_after: str | None = None  # Retry-After header sent with a "status" fault
    span: tuple[int, int] | None = None  # bytes [start, end) a "corrupt" fault flips (default: the middle third)


class Faults:
    """The faults set on one server, in the order added; safe to use from any thread."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(
        self,
        path_pattern: str,
        kind: str,
        count: int | None = None,
        status: int = 500,
        delay: float = 0.0,
        method: str | None = None,
        retry_after: str | None = None,
        span: tuple[int, int] | None = None,
    ) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        re.compile(path_pattern)
        fault = Fault(path_pattern, kind, count, status, delay, method.upper() if method else None, retry_after=retry_after, span=span)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str) -> Fault | None:
        """The first fault matching the request with hits left, counted as hit; else None."""
        with self._lock:
            for f in self._faults:
                if f.count is not None and f.hits >= f.count:
                    continue
                if f.method not in (None, method) or not re.search(f.pattern, path):
                    continue
                f.hits += 1
                return f
        return None


def corrupted(data: bytes, fault: Fault | None) -> bytes:
    """``data`` as a "corrupt" fault sends it: every byte of the middle third (or of the
    fault's span) flipped, same length, other content; else unchanged."""
    if not (fault and fault.kind == "corrupt" and data):
        return data
    if fault.span is not None:
        lo, hi, _ = slice(*fault.span).indices(len(data))
    else:
        lo, hi = len(data) // 3, max(len(data) // 3 + 1, 2 * len(data) // 3)
    return data[:lo] + bytes(b ^ 0xFF for b in data[lo:hi]) + data[hi:]


def write_body(handler: BaseHTTPRequestHandler, data: bytes, fault: Fault | None, link: Link | None = None) -> None:
    """Send the body after the headers: whole, or, for a "truncate"/"reset" fault, half of it
    and then a clean close / a TCP reset; through ``link``'s bandwidth cap when given."""
    send = link.send if link is not None else lambda wfile, chunk: wfile.write(chunk)
    if fault and fault.kind in ("truncate", "reset"):
        send(handler.wfile, data[: len(data) // 2])
        handler.wfile.flush()
        handler.close_connection = True  # the client is left waiting for the rest: EOF
        if fault.kind == "reset":  # RST, not FIN: the client's next read fails with ECONNRESET
            time.sleep(0.05)  # let the headers and the half body be read first
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()
        return
    send(handler.wfile, data)
