"""A fault-injecting HTTP proxy on 127.0.0.1, in front of one HTTP server on loopback.

For testing clients of servers that cannot be told to fail (Orthanc's DICOMweb): requests
are passed on unchanged, and answered unchanged, unless a fault matches the request's path;
the fault kinds and their meaning are those of the Flywheel test server
(:data:`clpipe.testing.faults.FAULT_KINDS`, see ``FlywheelTestServer.add_fault``):
"status" (an error reply, optionally with ``Retry-After``), "drop" (close without a reply),
"truncate" / "reset" (half the body, then a clean close / a TCP reset), "delay" (sleep, then
answer), "corrupt" (flip the middle third of the body: same length, other bytes).

The upstream answer is read whole and sent on with a ``Content-Length`` (a chunked answer
is de-chunked): meant for test data sets, not for large transfers.

    with FaultProxy("http://127.0.0.1:8042") as proxy:
        proxy.add_fault(r"/series/[^/]+$", "status", count=2, status=503, retry_after="1")
        ...  # point the client at proxy.base_url

A slow network: ``latency`` (seconds slept before every answer) and ``bandwidth`` (bytes/s at
most for all answers' bodies together; 0: no cap), the :class:`~clpipe.testing.faults.Link`
of the Flywheel test server; ``proxy.link`` changes them while it runs. From a shell:

    python -m clpipe.testing.faultproxy --upstream http://127.0.0.1:8042 --port 8043 --latency-ms 40 --bandwidth-mbps 100
"""

from __future__ import annotations

import argparse
import http.client
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from .faults import Fault, Faults, Link, corrupted, write_body

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# headers that belong to one connection, not to the message (RFC 9110 7.6.1), plus the
# length, which is set again for the body as sent
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "content-length", "host"}


class FaultProxy:
    """Listen on ``host:port`` (0: a free port) and forward to ``upstream`` (an
    ``http://`` URL on loopback). ``requests`` records ``{method, path, status, fault}``."""

    def __init__(
        self, upstream: str, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0, latency: float = 0.0, bandwidth: float = 0.0
    ):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK or host not in LOOPBACK:
            raise ValueError(f"FaultProxy forwards on loopback only, over http: {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.host, self.port, self.timeout = host, port, timeout
        self.requests: list[dict] = []
        self.link = Link(latency, bandwidth)
        self._faults = Faults()
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        if self._httpd is None:
            httpd = _Server((self.host, self.port), _Handler)
            httpd.proxy = self  # type: ignore[attr-defined]
            self._httpd, self.port = httpd, httpd.server_address[1]
            self._thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name=f"faultproxy-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- faults ---------------------------------------------------------------------------
    def add_fault(
        self,
        path_pattern: str,
        kind: str,
        count: int | None = None,
        status: int = 500,
        delay: float = 0.0,
        method: str | None = None,
        retry_after: str | None = None,
    ) -> Fault:
        """As ``FlywheelTestServer.add_fault``: requests whose URL-decoded path matches the
        regex ``path_pattern`` get the fault (the first ``count`` of them; None = all)."""
        return self._faults.add(path_pattern, kind, count, status, delay, method, retry_after)

    def clear_faults(self) -> None:
        self._faults.clear()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a client that went away: no traceback on stderr
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _dispatch(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        path = unquote(urlsplit(self.path).path)
        fault = proxy._faults.take(self.command, path)

        def record(status: int) -> None:  # before the answer goes out: a client that has it sees the record
            with proxy._lock:
                proxy.requests.append({"method": self.command, "path": path, "status": status, "fault": fault.kind if fault else None})

        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            proxy.link.wait()
            if fault and fault.delay:
                time.sleep(fault.delay)
            if fault and fault.kind == "drop":
                record(0)
                self.close_connection = True
                return
            if fault and fault.kind == "status":
                record(fault.status)
                extra = [("Retry-After", fault.retry_after)] if fault.retry_after else []
                self._reply(fault.status, [("Content-Type", "text/plain"), *extra], b"injected fault\n", None)
                return
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.timeout)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP]
            finally:
                conn.close()
            record(response.status)
            self._reply(response.status, kept, data, fault)
        except OSError:
            self.close_connection = True  # the client or the upstream went away

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes, fault: Fault | None) -> None:
        data = corrupted(data, fault)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        write_body(self, data, fault, self.server.proxy.link)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clpipe.testing.faultproxy",
        description="Forward 127.0.0.1:PORT to an HTTP server on loopback, slowed like a WAN, until SIGTERM/SIGINT.",
    )
    parser.add_argument("--upstream", required=True, help="the server to forward to, e.g. http://127.0.0.1:8042")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0 = any free port, printed)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="a fixed delay before every answer, in ms")
    parser.add_argument("--bandwidth-mbps", type=float, default=0.0, help="cap all answers together at this many megabits/s (0: no cap)")
    args = parser.parse_args(argv)
    if args.latency_ms < 0 or args.bandwidth_mbps < 0:
        parser.error("--latency-ms and --bandwidth-mbps must not be negative")
    try:
        proxy = FaultProxy(args.upstream, port=args.port, latency=args.latency_ms / 1000, bandwidth=args.bandwidth_mbps * 1e6 / 8)
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with proxy:
        print(f"forwarding {proxy.base_url} -> {args.upstream}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
