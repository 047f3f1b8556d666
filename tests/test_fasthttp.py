"""The fast HTTP path against real local servers, and its parity with the aiohttp path.

An aiohttp app serves the well-formed answers; a raw asyncio server serves the misbehaving ones
(hangs, half a header block, an endless body) that a real HTTP server library would not send.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from probes import runner
from probes.base import ProbeResult
from probes.fasthttp import build_plan, eligible, run_fast
from probes.http import HttpProbe, run_journey


@dataclass
class Targets:
    app: str  # http://127.0.0.1:PORT of the aiohttp app
    raw: str  # http://127.0.0.1:PORT of the raw server; the path picks the misbehaviour
    connections: list[str]  # request heads the raw server received


async def _app_routes() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"al", b"l is ", b"well"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="maintenance")

    async def status_json(request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "UP", "checks": [{"db": "ok"}]}, headers={"X-Region": "eu-west-1"}
        )

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text="slow")

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "method": request.method,
                "body": await request.text(),
                "ctype": request.headers.get("Content-Type"),
                "token": request.headers.get("X-Token"),
            }
        )

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app = web.Application()
    app.add_routes(
        [
            web.get("/ok", ok),
            web.get("/chunked", chunked),
            web.get("/503", unavailable),
            web.get("/json", status_json),
            web.get("/slow", slow),
            web.route("*", "/echo", echo),
            web.get("/moved", moved),
        ]
    )
    return app


@asynccontextmanager
async def targets() -> AsyncIterator[Targets]:
    runner_ = web.AppRunner(await _app_routes(), access_log=None)
    await runner_.setup()
    site = web.TCPSite(runner_, "127.0.0.1", 0)
    await site.start()
    app_port = runner_.addresses[0][1]
    heads: list[str] = []

    async def raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            heads.append(head)
            path = head.split(" ", 2)[1]
            if path == "/hang":
                await asyncio.sleep(30)
            elif path == "/half-headers":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl")
                await writer.drain()
            elif path == "/endless":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                chunk = b"x" * 65536
                for _ in range(4096):  # 256 MiB at most; the prober should stop long before
                    writer.write(chunk)
                    await writer.drain()
            elif path == "/short-body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
                await writer.drain()
            elif path == "/garbage":
                writer.write(b"SMTP ready\r\n\r\n")
                await writer.drain()
            elif path == "/eof-body":
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(raw, "127.0.0.1", 0)
    raw_port = server.sockets[0].getsockname()[1]
    try:
        yield Targets(f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{raw_port}", heads)
    finally:
        server.close()
        await runner_.cleanup()


def probe(url: str, **kw: Any) -> HttpProbe:
    return HttpProbe(kind="http", url=url, **kw)


def run(scenario: Callable[[Targets], Awaitable[None]]) -> None:
    async def main() -> None:
        async with targets() as t:
            await scenario(t)

    asyncio.run(main())


def checks(result: ProbeResult) -> list[tuple[str, bool, str, str]]:
    """Check tuples without latency values, which differ between any two runs."""
    return [
        (c.name, c.ok, c.expected, "" if c.name == "latency_ms" else c.found)
        for s in result.steps
        for c in s.checks
    ]


def test_200_with_content_length_has_the_aiohttp_shape() -> None:
    async def scenario(t: Targets) -> None:
        cfg = probe(f"{t.app}/ok", expect={"status": 200, "body_contains": "ok"})
        r = await run_fast("api", cfg)
        assert r.ok and r.error == ""
        assert len(r.steps) == 1
        step = r.steps[0]
        assert (step.name, step.request, step.status) == ("api", f"GET {t.app}/ok", 200)
        assert [c.name for c in step.checks] == ["status", "body"]
        assert r.to_dict()["steps"][0]["request"] == f"GET {t.app}/ok"

    run(scenario)


def test_chunked_body_is_reassembled() -> None:
    async def scenario(t: Targets) -> None:
        r = await run_fast("c", probe(f"{t.app}/chunked", expect={"body_contains": "all is well"}))
        assert r.ok, r.reason

    run(scenario)


def test_503_fails_naming_the_status() -> None:
    async def scenario(t: Targets) -> None:
        r = await run_fast("s", probe(f"{t.app}/503"))
        assert not r.ok
        assert r.steps[0].status == 503
        assert "expected status 200, found 503" in r.reason

    run(scenario)


def test_json_field_and_header_expectations() -> None:
    async def scenario(t: Targets) -> None:
        good = probe(
            f"{t.app}/json",
            expect={"json": {"status": "UP", "checks.0.db": "ok"}, "headers": {"x-region": "eu-west"}},
        )
        assert (await run_fast("j", good)).ok
        bad = probe(f"{t.app}/json", expect={"json": {"status": "DOWN", "missing": 1}})
        r = await run_fast("j", bad)
        assert not r.ok
        assert "expected json status DOWN, found UP" in r.reason
        assert "expected json missing 1, found no such field" in r.reason

    run(scenario)


def test_body_contains_failure_shows_the_body() -> None:
    async def scenario(t: Targets) -> None:
        r = await run_fast("b", probe(f"{t.app}/ok", expect={"body_contains": "healthy"}))
        assert not r.ok
        assert "expected body to contain 'healthy', found ok" in r.reason

    run(scenario)


def test_latency_bound() -> None:
    async def scenario(t: Targets) -> None:
        r = await run_fast("l", probe(f"{t.app}/slow", expect={"latency_ms": {"lt": 100}}))
        assert not r.ok
        assert r.steps[0].latency >= 0.3
        assert "expected latency_ms < 100" in r.reason
        assert (await run_fast("l", probe(f"{t.app}/ok", expect={"latency_ms": {"lt": 2000}}))).ok

    run(scenario)


def test_hanging_server_times_out_within_the_deadline() -> None:
    async def scenario(t: Targets) -> None:
        t0 = time.perf_counter()
        r = await run_fast("h", probe(f"{t.raw}/hang", timeout="500ms"))
        took = time.perf_counter() - t0
        assert not r.ok
        assert 0.5 <= took < 0.9
        assert "timed out: the probe's 0.5s deadline passed" in r.reason
        assert r.steps[0].request == f"GET {t.raw}/hang"

    run(scenario)


@contextmanager
def _unanswered_connects() -> Iterator[int]:
    """A port whose listen queue is full and never accepted from: the kernel drops further SYNs,
    so a connect to it hangs, as one to a black-holed address does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.1)  # let the handshakes that can complete, complete
        yield port
    finally:
        for c in fillers:
            c.close()
        listener.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_connect_that_never_completes_times_out_within_the_deadline(loop: str) -> None:
    """The exchange keeps its own deadline for an IP address; it must also cover the connect."""
    import uvloop

    runner_ = asyncio.run if loop == "asyncio" else uvloop.run
    with _unanswered_connects() as port:
        t0 = time.perf_counter()
        r = runner_(run_fast("c", probe(f"http://127.0.0.1:{port}/", timeout="400ms")))
        took = time.perf_counter() - t0
    assert not r.ok and r.prober_error is None
    assert "timed out: the probe's 0.4s deadline passed" in r.reason
    assert 0.4 <= took < 5  # bounded by the deadline, not by the kernel's SYN retries (minutes)


def test_cancelling_a_probe_mid_connect_is_a_cancellation_not_a_timeout() -> None:
    """The scheduler cancels runs when it stops: that must propagate, never become a failed result."""

    async def main() -> str:
        with _unanswered_connects() as port:
            task = asyncio.create_task(run_fast("c", probe(f"http://127.0.0.1:{port}/", timeout="5s")))
            await asyncio.sleep(0.1)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
            return "finished"

    assert asyncio.run(main()) == "cancelled"


def test_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()

    async def scenario(t: Targets) -> None:
        r = await run_fast("r", probe(f"http://127.0.0.1:{port}/"))
        assert not r.ok
        assert f"connection failed: cannot connect to 127.0.0.1:{port}" in r.reason
        assert "refused" in r.reason.lower()

    run(scenario)


def test_server_closing_mid_headers_is_a_clear_failure() -> None:
    async def scenario(t: Targets) -> None:
        r = await run_fast("m", probe(f"{t.raw}/half-headers", timeout="2s"))
        assert not r.ok
        assert "closed the connection before the response headers were complete" in r.reason
        short = await run_fast("m", probe(f"{t.raw}/short-body", timeout="2s"))
        assert "closed the connection before the body was complete" in short.reason
        garbage = await run_fast("m", probe(f"{t.raw}/garbage", timeout="2s"))
        assert "bad response: invalid HTTP response" in garbage.reason

    run(scenario)


def test_body_delimited_by_close() -> None:
    async def scenario(t: Targets) -> None:
        r = await run_fast("e", probe(f"{t.raw}/eof-body", expect={"body_contains": "until close"}))
        assert r.ok, r.reason

    run(scenario)


def test_oversize_body_is_capped_and_reading_stops() -> None:
    async def scenario(t: Targets) -> None:
        t0 = time.perf_counter()
        cfg = probe(f"{t.raw}/endless", timeout="5s", expect={"body_contains": "xxx"})
        r = await run_fast("big", cfg, max_body=256 * 1024)
        assert r.ok, r.reason
        assert r.details == {"body_truncated_at": 256 * 1024}
        assert time.perf_counter() - t0 < 2  # it stopped; it did not drain 256 MiB

    run(scenario)


def test_request_carries_method_headers_and_body() -> None:
    async def scenario(t: Targets) -> None:
        cfg = probe(
            f"{t.app}/echo",
            method="POST",
            headers={"X-Token": "abc"},
            json={"sku": 1},
            expect={
                "json": {"method": "POST", "body": '{"sku": 1}', "ctype": "application/json", "token": "abc"}
            },
        )
        r = await run_fast("p", cfg)
        assert r.ok, r.reason
        head = build_plan(probe(f"{t.raw}/x?q=1", headers={"host": "shop.example"})).payload.decode()
        assert head.startswith("GET /x?q=1 HTTP/1.1\r\n")
        assert "host: shop.example\r\n" in head and "Host:" not in head

    run(scenario)


def test_redirect_falls_back_to_aiohttp_and_follows() -> None:
    async def scenario(t: Targets) -> None:
        r = await run_fast("r", probe(f"{t.app}/moved", expect={"body_contains": "ok"}))
        assert r.ok, r.reason
        assert r.steps[0].status == 200

    run(scenario)


def test_only_plain_http_without_templates_is_eligible() -> None:
    assert eligible(probe("http://127.0.0.1:8080/health"))
    assert not eligible(probe("https://127.0.0.1:8443/health"))
    assert not eligible(probe("http://{{ host }}/health", vars={"host": "a"}))
    assert not eligible(probe("http://a/health", headers={"X": "{{ token }}"}))
    assert not eligible(probe("http://a/health", headers={"Accept-Encoding": "gzip"}))
    assert not eligible(probe("http://a:notaport/health"))


@pytest.mark.parametrize(
    ("path", "expect"),
    [
        ("/ok", {"status": 200, "body_contains": "ok", "latency_ms": {"lt": 5000}}),
        ("/chunked", {"body_contains": "well", "body_not_contains": "ill"}),
        ("/503", {"status": [200, 204], "body_contains": "fine"}),
        ("/json", {"json": {"status": "UP", "checks.0.db": "down"}, "headers": {"X-Region": "eu"}}),
        ("/ok", {"json": {"status": "UP"}}),
    ],
)
def test_parity_with_run_journey(path: str, expect: dict[str, Any]) -> None:
    async def scenario(t: Targets) -> None:
        cfg = probe(f"{t.app}{path}", expect=expect)
        fast = await run_fast("p", cfg)
        slow = await run_journey("p", cfg.journey("p"), cfg.vars, cfg.timeout)
        assert fast.ok == slow.ok
        assert checks(fast) == checks(slow)
        assert [(s.name, s.ok, s.request, s.status, s.error) for s in fast.steps] == [
            (s.name, s.ok, s.request, s.status, s.error) for s in slow.steps
        ]
        assert fast.error == slow.error

    run(scenario)


def test_runner_takes_the_fast_path_only_when_eligible(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fast, real_journey = runner.run_fast, runner.run_journey

    async def spy_fast(*a: Any, **kw: Any) -> ProbeResult:
        calls.append("fast")
        return await real_fast(*a, **kw)

    async def spy_journey(*a: Any, **kw: Any) -> ProbeResult:
        calls.append("aiohttp")
        return await real_journey(*a, **kw)

    monkeypatch.setattr(runner, "run_fast", spy_fast)
    monkeypatch.setattr(runner, "run_journey", spy_journey)

    async def scenario(t: Targets) -> None:
        assert (await runner.run_probe("a", probe(f"{t.app}/ok"))).ok
        templated = probe("http://{{ h }}/ok", vars={"h": t.app.removeprefix("http://")})
        assert (await runner.run_probe("b", templated)).ok

    run(scenario)
    assert calls == ["fast", "aiohttp"]
