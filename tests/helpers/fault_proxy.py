"""A small loopback HTTP proxy between s3fs and the moto server that injects faults on demand.

``proxy.inject("503", count=2, method="PUT", path="manifest.json")`` makes the next two matching
requests fail; the kinds are ``"500"``, ``"503"`` (an S3 ``SlowDown``), ``"drop"`` (the connection
is closed without an answer), ``"slow"`` (the answer is delayed) and ``"truncate"`` (the answer's
body is cut in half while its Content-Length promises all of it). Every request is logged as
``(method, path, query, headers)`` in ``proxy.log``, so tests can check the order of operations
and that nothing was ever copied inside the store (no ``x-amz-copy-source``). ``proxy.peak`` holds
the most multipart part uploads (``"part"``) and ranged GETs (``"range"``) that were in flight at
once: what shows that transfers run in parallel.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["FaultProxy"]


@dataclass
class _Fault:
    kind: str
    count: int
    method: str | None
    path: str | None
    delay: float


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.faults: list[_Fault] = []
        self.log: list[tuple[str, str, str, dict]] = []
        self.injected = 0
        self.peak = {"part": 0, "range": 0}
        self._in_flight = {"part": 0, "range": 0}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                path, _, query = self.path.partition("?")
                headers = {k: v for k, v in self.headers.items()}
                kind = "part" if self.command == "PUT" and "partNumber=" in query else None
                if self.command == "GET" and any(k.lower() == "range" for k in headers):
                    kind = "range"
                if kind is not None:
                    with proxy._lock:
                        proxy._in_flight[kind] += 1
                        proxy.peak[kind] = max(proxy.peak[kind], proxy._in_flight[kind])
                try:
                    self._forward(body, path, query, headers)
                finally:
                    if kind is not None:
                        with proxy._lock:
                            proxy._in_flight[kind] -= 1

            def _forward(self, body: bytes, path: str, query: str, headers: dict) -> None:
                fault = proxy._take(self.command, path)
                with proxy._lock:
                    proxy.log.append((self.command, path, query, headers))
                if fault is not None and fault.kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault is not None and fault.kind in ("500", "503"):
                    code = "InternalError" if fault.kind == "500" else "SlowDown"
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected {fault.kind}</Message></Error>"
                    ).encode()
                    self.send_response(int(fault.kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault is not None and fault.kind == "slow":
                    time.sleep(fault.delay)
                send = {k: v for k, v in headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
                send["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=send)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for key, value in resp.getheaders():
                        if key.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                            self.send_header(key, value)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    if fault is not None and fault.kind == "truncate" and len(data) > 1:
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def inject(
        self, kind: str, count: int = 1, *, method: str | None = None, path: str | None = None, delay: float = 0.5
    ) -> None:
        """Fail the next ``count`` requests whose method is ``method`` and whose path contains ``path``."""
        with self._lock:
            self.faults.append(_Fault(kind, count, method, path, delay))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def _take(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.count > 0 and (fault.method in (None, method)) and (fault.path is None or fault.path in path):
                    fault.count -= 1
                    self.injected += 1
                    return fault
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
