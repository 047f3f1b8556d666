"""The fast path for plain uptime probes: one fresh HTTP/1.1 connection on asyncio streams.

Why it exists: at 20,000 probes per controller, aiohttp's per-connection cost (its connector,
happy-eyeballs socket set-up, session and cookie machinery) is most of the CPU a probe takes
(about 310 us per fresh connection under uvloop, see DESIGN.md "Probe engine"). A plain `kind: http`
probe needs none of that: connect, send one request, parse one response, close. Parsing is done by
httptools (Node's llhttp), a well-kept parser, never by hand.

It only takes what it can do exactly like the aiohttp path: http:// URLs with no templating and
no request for compressed content. A redirect falls back to `run_journey` (aiohttp follows
redirects), so the result has the same shape and the same checks either way.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

from probes.base import Observed, ProbeResult, StepResult, evaluate, prober_error_of
from probes.http import MAX_BODY, MAX_HEADERS, HttpProbe, run_journey
from probes.resolve import RESOLVE_SHARE, first_address, literal

#: Default cap on how much of a body is kept: enough for any health document, small enough that
#: 20,000 probes against a misbehaving target cannot eat the controller's memory.
DEFAULT_MAX_BODY = MAX_BODY
MAX_HEAD = 64 * 1024
"""Bytes of status line and headers read at most before the head must be complete: httptools keeps
a header being parsed in memory, so an endless header would otherwise grow without bound."""

_READ_SIZE = 65536
"""Slack on MAX_HEAD for the chunk that carried the end of the head (and the body's start)."""
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "continuity-probe/0.1"


@dataclass(frozen=True)
class Plan:
    """Everything about a probe's request that does not change between runs, computed once."""

    host: str
    port: int
    request_line: str  # "GET http://host/path", as the aiohttp path names the step's request
    payload: bytes  # the whole request, head and body
    head_only: bool  # a HEAD response has no body whatever its Content-Length says
    literal: bool = False  # the host is an IP address: no resolver step, so no resolver deadline


def _has_template(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, dict):
        return any(_has_template(k) or _has_template(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_template(v) for v in value)
    return False


def eligible(cfg: Any) -> bool:
    """True when the fast path gives exactly what `run_journey` would for this probe.

    Anything else (https, templates, a hand-set Accept-Encoding that could bring a compressed body
    aiohttp would decode differently, a URL that does not parse) stays on aiohttp.
    """
    if not isinstance(cfg, HttpProbe) or not cfg.url.lower().startswith("http://"):
        return False
    if any(_has_template(v) for v in (cfg.url, cfg.headers, cfg.body, cfg.json_body)):
        return False
    if any(k.lower() == "accept-encoding" for k in cfg.headers):
        return False
    try:
        parts = urlsplit(cfg.url)
        _ = parts.port
    except ValueError:
        return False
    return bool(parts.hostname) and not parts.username and not parts.password


def build_plan(cfg: HttpProbe) -> Plan:
    """Compile the request bytes once; a probe that runs every 30 s should not re-encode them."""
    parts = urlsplit(cfg.url)
    host = parts.hostname or ""
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    method = cfg.method.upper()
    host_header = f"[{host}]" if ":" in host else host
    if port != 80:
        host_header += f":{port}"
    body: bytes | None = None
    content_type: str | None = None
    if cfg.body is not None:
        body, content_type = cfg.body.encode(), "text/plain; charset=utf-8"
    elif cfg.json_body is not None:
        body, content_type = json.dumps(cfg.json_body).encode(), "application/json"
    headers: dict[str, str] = {
        "Host": host_header,
        "User-Agent": _USER_AGENT,
        "Accept": "*/*",
        "Connection": "close",  # one request per connection, as blackbox does
    }
    if content_type is not None:
        headers["Content-Type"] = content_type
    if body is not None or method in ("POST", "PUT", "PATCH"):
        headers["Content-Length"] = str(len(body or b""))
    lower = {k.lower(): k for k in headers}
    for name, value in cfg.headers.items():  # the probe's own headers win, case-insensitively
        if name.lower() in lower:
            del headers[lower[name.lower()]]
        headers[name] = value
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    payload = head.encode("utf-8") + (body or b"")
    return Plan(host, port, f"{method} {cfg.url}", payload, method == "HEAD", literal(host))


class _Response(asyncio.Protocol):
    """One exchange on one fresh connection: the transport's callbacks feed httptools directly.

    Why a Protocol and not asyncio streams: a StreamReader/StreamWriter pair, a future per
    `read()` and a task wake-up per chunk are most of the Python work of a ~100 us probe. Here the
    answer is parsed as it arrives, inside the transport's callback, and the probe's task wakes
    once, when `done` is settled. At most `cap` bytes of body are kept; the connection is closed
    as soon as the outcome is known (complete, capped, or broken).
    """

    __slots__ = (
        "body",
        "cap",
        "complete",
        "count",
        "done",
        "expired",
        "head",
        "head_only",
        "headers",
        "headers_done",
        "parser",
        "payload",
        "size",
        "status",
        "task",
        "transport",
        "truncated",
    )

    def __init__(self, cap: int, payload: bytes, head_only: bool, done: asyncio.Future[bool]) -> None:
        self.cap = cap
        self.payload = payload
        self.head_only = head_only
        self.done = done  # result: whether the body was cut at the cap
        self.head = 0  # bytes received before the head was complete
        self.expired = False  # the probe's deadline passed (see `expire`)
        self.task: asyncio.Task[Any] | None = None  # the probe's task, cancelled by `expire` mid-connect
        self.transport: asyncio.BaseTransport | None = None
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.headers: dict[str, str] = {}
        self.count = 0
        self.body: list[bytes] = []
        self.size = 0
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.truncated = False

    # ---- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        # Last one wins, as `dict(resp.headers)` does on the aiohttp path.
        self.count += 1
        self.headers[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")

    def on_headers_complete(self) -> None:
        assert self.parser is not None  # only the parser calls this, and only while it is kept
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        room = self.cap - self.size
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        if data:
            self.body.append(data)
            self.size += len(data)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim response (100 Continue): the real one follows
            self._reset()
        else:
            self.complete = True

    # ---- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.payload)  # type: ignore[attr-defined]  # a TCP transport writes

    def data_received(self, data: bytes) -> None:
        if self.done.done() or self.parser is None:
            return  # decided already (or cancelled): the rest is not read into anything
        if not self.headers_done:
            self.head += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            return self._settle(False)
        except httptools.HttpParserError as exc:
            return self._settle(_BadResponse(f"invalid HTTP response: {exc}"))
        if not self.headers_done and self.head > MAX_HEAD + _READ_SIZE:
            return self._settle(_BadResponse(f"response headers larger than {MAX_HEAD // 1024} KiB"))
        if self.count > MAX_HEADERS:
            return self._settle(_BadResponse(f"more than {MAX_HEADERS} response headers"))
        if self.complete or (self.head_only and self.headers_done):
            return self._settle(False)
        if self.truncated:
            return self._settle(True)  # stop reading: the rest of a huge body is not kept
        return None

    def eof_received(self) -> bool:
        self._closed()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._settle(exc)  # reset, or any error the transport met
        else:
            self._closed()

    def expire(self) -> None:
        """The probe's deadline passed: once connected, settle with a timeout here and now (the
        probe's task wakes once, as for an answer); while connecting, cancel the probe's task, which
        `_exchange` turns into the same TimeoutError."""
        self.expired = True
        if self.transport is not None:
            self._settle(TimeoutError())
        elif self.task is not None:
            self.task.cancel()

    def _closed(self) -> None:
        """The server closed its side: a whole answer, or one cut short."""
        if self.done.done():
            return
        if not self.headers_done:
            return self._settle(
                _BadResponse("the server closed the connection before the response headers were complete")
            )
        has_length = any(k.lower() in ("content-length", "transfer-encoding") for k in self.headers)
        if has_length and not self.head_only:
            return self._settle(_BadResponse("the server closed the connection before the body was complete"))
        return self._settle(False)  # a body delimited by the connection closing

    def _settle(self, outcome: bool | BaseException) -> None:
        if not self.done.done():
            if isinstance(outcome, BaseException):
                self.done.set_exception(outcome)
            else:
                self.done.set_result(outcome)
        if self.transport is not None:
            self.transport.close()
        # The parser holds this object's bound callbacks and this object the parser: a cycle only
        # the garbage collector could free. Measured (20,000 probes at 30 s), that garbage alone
        # made gc about a sixth of the prober's CPU; cut here, reference counting frees both.
        self.parser = None


def _decode(body: bytes, encoding: str, cap: int) -> bytes:
    """Undo gzip/deflate like aiohttp does, without letting a zip bomb past the cap."""
    enc = encoding.strip().lower()
    try:
        if enc in ("gzip", "x-gzip"):
            return zlib.decompressobj(31).decompress(body, cap)
        if enc == "deflate":
            try:
                return zlib.decompressobj(15).decompress(body, cap)
            except zlib.error:
                return zlib.decompressobj(-15).decompress(body, cap)
    except zlib.error:
        return body
    return body


def _os_error(exc: OSError) -> str:
    """'Connection refused' rather than asyncio's 'Connect call failed (...)', which hides why."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return str(exc) or type(exc).__name__
    return os.strerror(exc.errno)


class _BadResponse(Exception):
    """The server answered, but not with a whole HTTP response."""


async def _exchange(plan: Plan, cap: int, timeout: float) -> tuple[_Response, bool]:
    """Connect, send, read until the response is complete (or the cap); return it and truncation.

    A host name is resolved by `probes.resolve` within part of the budget (never the shared default
    executor): a stalled resolver is our error, and cannot hold other probes up. The caller bounds
    that case with `asyncio.timeout`. An IP address needs no resolver, and then the exchange keeps
    its own deadline: one timer handle per probe instead of a Timeout context, which was 5% of a
    probe's CPU in the profile."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()
    resp = _Response(cap, plan.payload, plan.head_only, done)
    timer: asyncio.TimerHandle | None = None
    task = asyncio.current_task()
    cancelling = 0
    if plan.literal and task is not None:
        host = plan.host
        resp.task, cancelling = task, task.cancelling()
        timer = loop.call_later(timeout, resp.expire)
    else:
        host = await first_address(plan.host, plan.port, timeout * RESOLVE_SHARE)
    try:
        await loop.create_connection(lambda: resp, host, plan.port)
        truncated = await done
    except asyncio.CancelledError:
        # Our own deadline cancelled the connect (as asyncio.timeout does, a cancellation that came
        # from elsewhere as well still propagates).
        if resp.expired and task is not None and task.uncancel() <= cancelling:
            raise TimeoutError from None
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if not done.done():
            done.cancel()  # timed out or cancelled: nothing will wait for the outcome
        resp._settle(False)  # closes the connection, drops the parser; a settled outcome is kept
    return resp, truncated


async def run_fast(
    name: str, cfg: HttpProbe, plan: Plan | None = None, max_body: int = DEFAULT_MAX_BODY
) -> ProbeResult:
    """Run one plain HTTP probe; same ProbeResult shape and Checks as `run_journey`.

    Never raises for a target's misbehaviour: refused, reset, hung or garbled answers are failed
    steps with a sentence saying which. The whole run is bounded by `cfg.timeout`.
    """
    plan = plan or build_plan(cfg)
    started_at = time.time()
    t0 = time.perf_counter()
    request = plan.request_line
    error = ""
    resp: _Response | None = None
    truncated = False
    prober_error: str | None = None
    try:
        if plan.literal:  # bounded by the exchange's own timer (see `_exchange`)
            resp, truncated = await _exchange(plan, max_body, cfg.timeout)
        else:
            async with asyncio.timeout(cfg.timeout):
                resp, truncated = await _exchange(plan, max_body, cfg.timeout)
    except TimeoutError:
        error = f"timed out: the probe's {cfg.timeout:g}s deadline passed"
    except _BadResponse as exc:
        error = f"bad response: {exc}"
    except OSError as exc:  # refused, reset, unreachable, name not resolved; or our fd limit/resolver
        error = f"connection failed: cannot connect to {plan.host}:{plan.port}: {_os_error(exc)}"
        prober_error = prober_error_of(exc)
    took = time.perf_counter() - t0
    if resp is None:
        step = StepResult(name, False, took, error=error, request=request)
        return ProbeResult(
            name, False, started_at, took, (step,), error="journey incomplete", prober_error=prober_error
        )
    if resp.status in _REDIRECTS and "location" in {k.lower() for k in resp.headers}:
        # aiohttp follows redirects (and may land on https): let it, within what is left of the deadline.
        left = max(cfg.timeout - took, 0.001)
        result = await run_journey(name, cfg.journey(name), cfg.vars, left)
        return ProbeResult(
            name,
            result.ok,
            started_at,
            time.perf_counter() - t0,
            result.steps,
            result.error,
            result.vantage,
            details=result.details,
            prober_error=result.prober_error,
        )
    body = b"".join(resp.body)
    encoding = next((v for k, v in resp.headers.items() if k.lower() == "content-encoding"), "")
    if encoding:
        body = _decode(body, encoding, max_body)
    obs = Observed(resp.status, resp.headers, body, took)
    checks = evaluate(cfg.expect, obs)
    ok = all(c.ok for c in checks)
    step = StepResult(name, ok, took, checks, request=request, status=resp.status)
    details = {"body_truncated_at": max_body} if truncated else {}
    return ProbeResult(
        name, ok, started_at, took, (step,), error="" if ok else "journey incomplete", details=details
    )
