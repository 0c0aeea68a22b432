"""clpipe.testing.faultproxy: the fault-injecting HTTP proxy bench/reliability.py puts in
front of Orthanc. Here in front of a tiny loopback server, so nothing else is needed."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from clpipe.testing.faultproxy import FaultProxy

BODY = bytes(range(256)) * 40  # 10,240 bytes


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass

    def do_GET(self):
        if self.path.startswith("/chunked"):  # answered in chunks: the proxy sends it with a length
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(BODY), 4096):
                piece = BODY[start : start + 4096]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_response(200 if self.path != "/missing" else 404)
        self.send_header("Content-Type", "application/dicom")
        self.send_header("X-Upstream", self.path)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


@pytest.fixture
def proxy():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    upstream.daemon_threads = True
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as px:
            yield px
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_passes_requests_and_answers_unchanged(proxy):
    with httpx.Client(base_url=proxy.base_url, timeout=10) as client:
        r = client.get("/studies/1/series/2")
        assert r.status_code == 200 and r.content == BODY
        assert r.headers["x-upstream"] == "/studies/1/series/2" and r.headers["content-type"] == "application/dicom"
        assert client.get("/missing").status_code == 404
        chunked = client.get("/chunked")
        assert chunked.content == BODY and chunked.headers["content-length"] == str(len(BODY))
    assert [(q["path"], q["status"], q["fault"]) for q in proxy.requests] == [
        ("/studies/1/series/2", 200, None),
        ("/missing", 404, None),
        ("/chunked", 200, None),
    ]


def test_status_fault_with_retry_after_hits_count_matching_requests(proxy):
    fault = proxy.add_fault(r"/series/[^/]+$", "status", count=2, status=503, retry_after="1")
    with httpx.Client(base_url=proxy.base_url, timeout=10) as client:
        assert client.get("/studies").content == BODY  # does not match
        for _ in range(2):
            r = client.get("/studies/1/series/2")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert client.get("/studies/1/series/2").content == BODY  # count used up
    assert fault.hits == 2


def test_corrupt_keeps_the_length_and_changes_the_bytes(proxy):
    proxy.add_fault(r"/x$", "corrupt", count=1)
    with httpx.Client(base_url=proxy.base_url, timeout=10) as client:
        r = client.get("/x")
    assert len(r.content) == len(BODY) and r.content != BODY
    assert r.content[: len(BODY) // 3] == BODY[: len(BODY) // 3]


@pytest.mark.parametrize(
    "kind,error", [("truncate", httpx.RemoteProtocolError), ("reset", httpx.ReadError), ("drop", httpx.RemoteProtocolError)]
)
def test_broken_connections(proxy, kind, error):
    proxy.add_fault(r"/x$", kind, count=1)
    with httpx.Client(base_url=proxy.base_url, timeout=10) as client:
        received = bytearray()
        with pytest.raises(error), client.stream("GET", "/x") as r:
            for chunk in r.iter_raw():
                received += chunk
        assert len(received) < len(BODY) and BODY.startswith(bytes(received))
        assert client.get("/x").content == BODY  # the next request is answered normally


def test_forwards_on_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://192.0.2.1:8042")
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("https://127.0.0.1:8042")
