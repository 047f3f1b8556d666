"""TCP probes: can we connect, and does the service say what it should?

A port that accepts connections is the weakest sign of life; a banner (`SSH-2.0`, `+PONG`,
`220 ... ESMTP`) is a much better one, because the process behind the socket had to answer. So a
probe can optionally `send` a few bytes and `expect.contains` text in the first bytes read. On
asyncio streams, per DESIGN.md's probe engine figures (no HTTP client needed).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time

from probes.base import Check, ProbeResult, latency_check, prober_error_of, single_step
from probes.models import TcpExpect as TcpExpect  # re-exported: the config models live in probes/models.py
from probes.models import TcpProbe
from probes.resolve import RESOLVE_SHARE, first_address, literal

#: Stop reading after this much: `contains` is about the first bytes, not a download.
READ_LIMIT = 64 * 1024

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0", "\\": "\\"}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[nrt0\\])")


def unescape(text: str) -> str:
    r"""Turn `\n`, `\r`, `\t`, `\0`, `\\` and `\xHH` into the characters they name.

    YAML only interprets escapes in double-quoted strings; an SRE writing `send: PING\r\n` plain or
    single-quoted means the bytes CR LF, so we honour them either way. Non-ASCII text is left as is
    (unlike the `unicode_escape` codec, which would mangle it).
    """

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        return chr(int(code[1:], 16)) if code.startswith("x") else _ESCAPES[code]

    return _ESCAPE.sub(one, text)


def describe_os_error(exc: OSError, host: str, port: int) -> str:
    """Connection errors as actions: refused means nothing listens, unreachable means the network."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {host!r}: {exc.strerror or exc}"
    if not exc.errno and str(exc):  # probes.resolve's errors say what happened themselves
        return str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {host}:{port} (nothing listening on that port?)"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot connect to {host}:{port}: {reason}"


async def close_quietly(writer: asyncio.StreamWriter, within: float = 0.25) -> None:
    """Close a stream without letting a slow or rude peer delay or fail the probe."""
    writer.close()
    try:
        async with asyncio.timeout(within):
            await writer.wait_closed()
    except (TimeoutError, OSError, ConnectionError):
        writer.transport.abort()
    except Exception:  # ssl.SSLError on a peer that drops the close_notify, and the like
        writer.transport.abort()


async def _read_until(reader: asyncio.StreamReader, wanted: str) -> tuple[bytes, bool]:
    """Read until `wanted` shows up, EOF, or READ_LIMIT; return what was read and whether EOF."""
    target = wanted.encode()
    got = b""
    while target not in got and len(got) < READ_LIMIT:
        chunk = await reader.read(READ_LIMIT - len(got))
        if not chunk:
            return got, True
        got += chunk
    return got, False


def _shown(data: bytes, limit: int = 80) -> str:
    text = data.decode("utf-8", errors="replace")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return repr(text)


async def run(name: str, cfg: TcpProbe) -> ProbeResult:
    """One TCP check, bounded by cfg.timeout; never raises.

    `details` carries `connect_seconds` (the handshake alone) so a slow accept queue can be told
    apart from a slow application.
    """
    started_at = time.time()
    t0 = time.perf_counter()
    request = f"TCP {cfg.host}:{cfg.port}"
    details: dict[str, float] = {}
    wanted = unescape(cfg.expect.contains) if cfg.expect.contains is not None else None
    got, eof = b"", False
    stage = "connecting"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(cfg.timeout):
            host = (
                cfg.host
                if literal(cfg.host)
                else await first_address(cfg.host, cfg.port, cfg.timeout * RESOLVE_SHARE)
            )
            reader, writer = await asyncio.open_connection(host, cfg.port, limit=READ_LIMIT)
            details["connect_seconds"] = round(time.perf_counter() - t0, 6)
            if cfg.send is not None:
                stage = "sending"
                writer.write(unescape(cfg.send).encode())
                await writer.drain()
            if wanted is not None:
                stage = "reading"
                got, eof = await _read_until(reader, wanted)
        took = time.perf_counter() - t0
    except TimeoutError:
        if writer is not None:
            writer.transport.abort()  # the deadline is spent: no polite close
        if stage == "reading" and wanted is not None:
            found = f"{_shown(got)} and then silence" if got else "nothing"
            check = Check("answer", False, f"to contain {wanted!r} within {cfg.timeout:g}s", found)
            return single_step(name, started_at, t0, request, (check,), details=details)
        return single_step(
            name, started_at, t0, request, error=f"timed out after {cfg.timeout:g}s {stage}", details=details
        )
    except OSError as exc:
        if writer is not None:
            writer.transport.abort()
        where = "" if stage == "connecting" else f" while {stage}"
        msg = describe_os_error(exc, cfg.host, cfg.port) + where
        return single_step(
            name, started_at, t0, request, error=msg, details=details, prober_error=prober_error_of(exc)
        )
    await close_quietly(writer)  # outside the deadline: a slow close must not fail a good exchange
    checks: list[Check] = []
    if wanted is not None:
        found = _shown(got) if got else "nothing (the server closed the connection)"
        if got and eof and wanted.encode() not in got:
            found += " (then the server closed the connection)"
        checks.append(Check("answer", wanted.encode() in got, f"to contain {wanted!r}", found))
    if cfg.expect.latency_ms is not None:
        checks.append(latency_check(cfg.expect.latency_ms, took))
    return single_step(name, started_at, t0, request, tuple(checks), details=details, latency=took)
