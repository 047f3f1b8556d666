"""A recording, fault-injecting HTTP proxy between boto3 and moto's server.

boto3 is pointed at the proxy with `endpoint_url`; every request is forwarded to moto unchanged
(method, path, query, headers, body) with http.client, and recorded. A test can make the next N
matching requests fail with an AWS-style error (HTTP status + XML error body, the shape both the
query protocol (RDS) and Route 53's REST-XML protocol use) or arrive late (a delay before forwarding).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Recorded:
    method: str
    path: str
    """Path and query, exactly as sent."""
    action: str | None
    """The query protocol's Action= (RDS), from the form body or the query string."""
    params: dict[str, str]
    """All form/query parameters, first value each (DBInstanceIdentifier=...)."""
    body: bytes
    status: int = 0
    """What the client got back (0 until answered)."""
    injected: bool = False


@dataclass
class Fault:
    match: Callable[[Recorded], bool]
    times: int
    status: int = 0
    code: str = ""
    message: str = ""
    sender: bool = True
    delay: float = 0.0
    used: int = 0


def error_body(code: str, message: str, *, sender: bool = True) -> bytes:
    """AWS's XML error shape. RDS reads Error/Code; Route 53 reads the same with a Type."""
    kind = "Sender" if sender else "Receiver"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<ErrorResponse><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    ).encode()


def matcher(
    *, action: str | None = None, method: str | None = None, path_contains: str | None = None
) -> Callable[[Recorded], bool]:
    def match(r: Recorded) -> bool:
        return (
            (action is None or r.action == action)
            and (method is None or r.method == method)
            and (path_contains is None or path_contains in r.path)
        )

    return match


class AwsProxy:
    """`with AwsProxy(moto_url) as proxy:` then use `proxy.url` as boto3's endpoint_url."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="awsproxy", daemon=True)

    # ------------------------------------------------------------ test API

    def fail(
        self,
        match: Callable[[Recorded], bool],
        *,
        times: int,
        status: int,
        code: str,
        message: str = "injected",
        sender: bool = True,
    ) -> Fault:
        fault = Fault(match, times, status=status, code=code, message=message, sender=sender)
        with self._lock:
            self.faults.append(fault)
        return fault

    def throttle(self, match: Callable[[Recorded], bool], times: int) -> Fault:
        return self.fail(match, times=times, status=400, code="Throttling", message="Rate exceeded")

    def delay(self, match: Callable[[Recorded], bool], seconds: float, times: int) -> Fault:
        fault = Fault(match, times, delay=seconds)
        with self._lock:
            self.faults.append(fault)
        return fault

    def calls(self, action: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if action is None or r.action == action]

    def start(self) -> AwsProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> AwsProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the server

    def _take_fault(self, rec: Recorded) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.used < fault.times and fault.match(rec):
                    fault.used += 1
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                query = urlsplit(self.path).query
                params = {k: v[0] for k, v in parse_qs(query).items()}
                ctype = self.headers.get("Content-Type", "")
                if body and "x-www-form-urlencoded" in ctype:
                    params.update({k: v[0] for k, v in parse_qs(body.decode()).items()})
                rec = Recorded(self.command, self.path, params.get("Action"), params, body)
                with proxy._lock:
                    proxy.requests.append(rec)
                fault = proxy._take_fault(rec)
                if fault is not None and fault.delay:
                    time.sleep(fault.delay)
                if fault is not None and fault.status:
                    rec.injected = True
                    self._answer(
                        fault.status,
                        [("Content-Type", "text/xml")],
                        error_body(fault.code, fault.message, sender=fault.sender),
                        rec,
                    )
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                    out = [(k, v) for k, v in out if k.lower() != "content-length"]
                    self._answer(resp.status, out, data, rec)
                finally:
                    conn.close()

            def _answer(
                self, status: int, headers: list[tuple[str, str]], data: bytes, rec: Recorded
            ) -> None:
                rec.status = status
                try:
                    self.send_response(status)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a step timeout); nothing to tell it

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        return Handler
