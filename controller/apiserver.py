"""Serving the HTTP API so that no client can starve the probes of file descriptors or time.

The controller's API shares one process (and one file-descriptor limit) with the probes. A flood of
idle connections to the API port, under aiohttp alone, held one descriptor each until the limit was
reached: probes then failed with "Too many open files", a false incident and a failover. So:

- the soft RLIMIT_NOFILE is raised to the hard limit at start (where the hard limit allows);
- the API holds at most a quarter of that budget (`controller.api_max_connections`, lowered to fit):
  a connection beyond the cap is answered 503 at once and closed, so it costs a descriptor for
  microseconds, never for the life of the flood;
- a connection that has not sent a whole request head within `controller.api_header_timeout` is
  closed (slowloris); idle keep-alive connections are closed by aiohttp's keepalive timeout.
"""

from __future__ import annotations

import asyncio
import resource
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from controller.metrics import Metrics

KEEPALIVE_TIMEOUT = 15.0
"""Seconds an idle keep-alive API connection is kept (aiohttp's default is an hour)."""
FD_SHARE = 4
"""The API may hold at most 1/FD_SHARE of the descriptor limit; the rest is kept for probes."""
FD_CEILING = 1_048_576
"""The soft limit is never raised beyond this, even when the hard limit is unlimited."""

_BUSY_BODY = b'{"error": "too many connections to the API; probes keep their share"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    + _BUSY_BODY
)


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows; return (before, after, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_CEILING if hard == resource.RLIM_INFINITY else min(hard, FD_CEILING)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    after = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft, after, hard


def connection_cap(configured: int, soft_limit: int) -> int:
    """The API's share of the descriptor budget: never more than configured, nor than 1/FD_SHARE."""
    if soft_limit == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft_limit // FD_SHARE))


@dataclass
class Limits:
    max_connections: int
    header_timeout: float
    metrics: Metrics
    active: int = 0


class _Guard(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol: counts it against the cap and times its first head."""

    def __init__(self, inner: Any, limits: Limits) -> None:
        self.inner: Any = inner
        self.limits = limits
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio's classes
        limits = self.limits
        if limits.active >= limits.max_connections:
            limits.metrics.api_connections_refused.labels("busy").inc()
            self.inner = None
            transport.write(_BUSY)
            transport.close()
            return
        limits.active += 1
        limits.metrics.api_connections.set(limits.active)
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(limits.header_timeout, self._expire)
        self.inner.connection_made(transport)

    def _expire(self) -> None:
        self.timer = None
        self.limits.metrics.api_connections_refused.labels("header_timeout").inc()
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if self.timer is not None:
            window = self.tail + data
            if b"\r\n\r\n" in window:
                self.timer.cancel()
                self.timer = None
                self.tail = b""
            else:
                self.tail = window[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.limits.active -= 1
        self.limits.metrics.api_connections.set(self.limits.active)
        inner, self.inner = self.inner, None
        inner.connection_lost(exc)


async def serve(
    application: web.Application, host: str, port: int, limits: Limits
) -> tuple[web.AppRunner, asyncio.AbstractServer]:
    """Start the API behind the guard; the caller closes the server, then cleans up the runner."""
    runner = web.AppRunner(application, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT)
    await runner.setup()
    factory = runner.server
    assert factory is not None
    try:
        server = await asyncio.get_running_loop().create_server(
            lambda: _Guard(factory(), limits), host, port, reuse_address=True, backlog=1024
        )
    except OSError:
        await runner.cleanup()
        raise
    return runner, server
