"""A fault-injecting HTTP proxy in front of the test S3 server (moto over real HTTP).

Every request is forwarded as it came, unless the proxy's ``fault`` function returns a
fault for it: ``"refuse"`` (close the connection without an answer), ``"503"`` (S3's
SlowDown throttling answer), ``"403"`` (AccessDenied) or ``"cut"`` (the real answer's
headers, then half its body, then a closed connection). The S3 clients under test see
exactly what a flaky network or store would show them.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Literal
from urllib.parse import urlsplit

Fault = Literal["refuse", "503", "403", "cut"]
FaultRule = Callable[[str, str], "Fault | None"]  # (method, path without query) -> fault or None

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
}
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class FaultyS3Proxy:
    """Serves on 127.0.0.1 (:attr:`endpoint`) until :meth:`close`; counts what it injected in :attr:`injected`."""

    def __init__(self, upstream: str, fault: FaultRule | None = None):
        host, port = urlsplit(upstream).netloc.split(":")
        self.upstream = (host, int(port))
        self.fault: FaultRule = fault or (lambda method, path: None)
        self.injected: list[tuple[str, str, str]] = []  # (fault, method, path)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self._body()
                path = urlsplit(self.path).path
                fault = proxy.fault(self.command, path)
                if fault is not None:
                    with proxy._lock:
                        proxy.injected.append((fault, self.command, path))
                if fault == "refuse":
                    self.close_connection = True
                    return
                if fault in _ERRORS:
                    status, code, message = _ERRORS[fault]
                    self._answer(status, [("Content-Type", "application/xml")],
                                 f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                                 f"<Message>{message}</Message></Error>".encode())
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    keep = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS]
                finally:
                    conn.close()
                if fault == "cut" and len(data) > 1:
                    self.send_response(resp.status)
                    for k, v in keep:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                # A HEAD answer has no body but the object's length.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else None
                self._answer(resp.status, keep, b"" if length else data, length)

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes,
                        length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
