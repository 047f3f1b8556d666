"""HTTP probes and transaction journeys against real local aiohttp servers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from controller.config import Config
from probes.base import ProbeResult
from probes.http import HttpProbe, TransactionProbe
from probes.runner import run_probe

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(routes: list[web.RouteDef]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def probe_against(routes: list[web.RouteDef], make_cfg: Callable[[str], Any], name: str = "p") -> ProbeResult:
    """Start a server in this test's event loop, run the probe once, stop the server."""

    async def main() -> ProbeResult:
        runner, base = await _serve(routes)
        try:
            return await run_probe(name, make_cfg(base))
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def http(**fields: Any) -> HttpProbe:
    return HttpProbe.model_validate({"kind": "http", "timeout": "2s", **fields})


def journey(steps: list[dict[str, Any]], **fields: Any) -> TransactionProbe:
    return TransactionProbe.model_validate({"kind": "transaction", "timeout": "3s", "steps": steps, **fields})


async def ok_json(request: web.Request) -> web.Response:
    return web.json_response({"status": "UP", "items": [{"sku": "mug-001"}]})


def test_http_probe_passes_built_through_config() -> None:
    def cfg(base: str) -> Any:
        doc = {
            "services": {"shop": {"tier": "critical", "rto": "5m", "probes": ["home"]}},
            "probes": {
                "home": {
                    "kind": "http",
                    "url": f"{base}/health",
                    "timeout": "2s",
                    "expect": {"status": 200, "latency_ms": {"lt": 1000}, "json": {"items.0.sku": "mug-001"}},
                }
            },
        }
        return Config.model_validate(doc).probes["home"]

    result = probe_against([web.get("/health", ok_json)], cfg, name="home")
    assert result.ok, result.reason
    assert result.reason == ""
    assert [c.name for c in result.steps[0].checks] == ["status", "latency_ms", "json items.0.sku"]
    assert result.steps[0].status == 200


def test_wrong_status_names_expected_and_found() -> None:
    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down for maintenance")

    url = ""

    def cfg(base: str) -> HttpProbe:
        nonlocal url
        url = f"{base}/x"
        return http(url=url)

    result = probe_against([web.get("/x", unavailable)], cfg)
    assert not result.ok
    assert result.reason == f"request (GET {url}): expected status 200, found 503"


def test_slow_response_beyond_latency_bound() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text="ok")

    result = probe_against(
        [web.get("/slow", slow)], lambda b: http(url=f"{b}/slow", expect={"latency_ms": {"lt": 100}})
    )
    assert not result.ok
    assert "expected latency_ms < 100, found " in result.reason
    failed = [c for c in result.steps[0].checks if not c.ok]
    assert [c.name for c in failed] == ["latency_ms"]
    assert int(failed[0].found) >= 300


def test_hanging_target_times_out_quickly() -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        return web.Response(text="never")

    t0 = time.perf_counter()
    result = probe_against([web.get("/hang", hang)], lambda b: http(url=f"{b}/hang", timeout="500ms"))
    took = time.perf_counter() - t0
    assert not result.ok
    assert "timed out" in result.reason
    assert result.latency < 1.5
    assert took < 3.0  # including server shutdown


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = asyncio.run(run_probe("p", http(url=f"http://127.0.0.1:{port}/")))
    assert not result.ok
    assert "connection failed" in result.reason
    assert f"127.0.0.1:{port}" in result.reason


def test_wrong_json_field_value() -> None:
    result = probe_against(
        [web.get("/h", ok_json)], lambda b: http(url=f"{b}/h", expect={"json": {"status": "DOWN"}})
    )
    assert not result.ok
    assert result.reason.endswith(": expected json status DOWN, found UP")


def test_non_json_body_where_json_expected() -> None:
    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>", content_type="text/html")

    result = probe_against(
        [web.get("/h", html)], lambda b: http(url=f"{b}/h", expect={"json": {"status": "UP"}})
    )
    assert not result.ok
    assert result.reason.endswith(": expected body JSON, found non-JSON body '<html>oops</html>'")


def test_body_contains() -> None:
    routes = [web.get("/h", ok_json)]
    good = probe_against(routes, lambda b: http(url=f"{b}/h", expect={"body_contains": "mug-001"}))
    assert good.ok, good.reason
    bad = probe_against(routes, lambda b: http(url=f"{b}/h", expect={"body_contains": "teapot"}))
    assert not bad.ok
    assert "expected body to contain 'teapot', found " in bad.reason


def test_header_expectation() -> None:
    async def regional(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Region": "eu-west-1"})

    routes = [web.get("/h", regional)]
    good = probe_against(routes, lambda b: http(url=f"{b}/h", expect={"headers": {"x-region": "eu-west"}}))
    assert good.ok, good.reason
    bad = probe_against(routes, lambda b: http(url=f"{b}/h", expect={"headers": {"X-Region": "eu-central"}}))
    assert not bad.ok
    assert bad.reason.endswith(": expected header X-Region to contain 'eu-central', found 'eu-west-1'")


def test_transaction_middle_step_fails_and_later_steps_do_not_run() -> None:
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=500 if request.path == "/b" else 200, text="x")

    routes = [web.get(p, record) for p in ("/a", "/b", "/c")]
    url_b = ""

    def cfg(base: str) -> TransactionProbe:
        nonlocal url_b
        url_b = f"{base}/b"
        return journey([{"name": n, "url": f"{base}/{n}"} for n in ("a", "b", "c")])

    result = probe_against(routes, cfg)
    assert not result.ok
    assert result.reason == f"step 'b' (GET {url_b}): expected status 200, found 500"
    assert [s.name for s in result.steps] == ["a", "b"]
    assert hits == ["/a", "/b"]


def test_extracted_cart_id_used_in_url_and_json_body() -> None:
    seen: dict[str, Any] = {}

    async def new_cart(request: web.Request) -> web.Response:
        return web.json_response({"cart": {"id": "c-42"}}, status=201)

    async def add_item(request: web.Request) -> web.Response:
        seen["cart_in_path"] = request.match_info["cart"]
        seen["body"] = await request.json()
        return web.json_response({"ok": True})

    routes = [web.post("/cart", new_cart), web.post("/cart/{cart}/items", add_item)]

    def cfg(base: str) -> TransactionProbe:
        return journey(
            [
                {
                    "name": "create",
                    "method": "POST",
                    "url": "{{ base }}/cart",
                    "expect": {"status": 201},
                    "extract": {"cart_id": {"json": "cart.id"}},
                },
                {
                    "name": "add",
                    "method": "POST",
                    "url": "{{ base }}/cart/{{ cart_id }}/items",
                    "json": {"cart": "{{ cart_id }}", "sku": "{{ sku }}", "qty": 2},
                    "expect": {"json": {"ok": True}},
                },
            ],
            vars={"base": base, "sku": "mug-001"},
        )

    result = probe_against(routes, cfg)
    assert result.ok, result.reason
    assert seen == {"cart_in_path": "c-42", "body": {"cart": "c-42", "sku": "mug-001", "qty": 2}}


def test_cookies_from_step_one_are_sent_in_step_two() -> None:
    async def login(request: web.Request) -> web.Response:
        resp = web.Response(text="welcome")
        resp.set_cookie("session", "s3cr3t")
        return resp

    async def me(request: web.Request) -> web.Response:
        if request.cookies.get("session") != "s3cr3t":
            return web.Response(status=401, text="who are you?")
        return web.Response(text="hello")

    routes = [web.post("/login", login), web.get("/me", me)]
    steps = lambda b: [  # noqa: E731
        {"name": "login", "method": "POST", "url": f"{b}/login"},
        {"name": "me", "url": f"{b}/me", "expect": {"body_contains": "hello"}},
    ]
    result = probe_against(routes, lambda b: journey(steps(b)))
    assert result.ok, result.reason
    # Without the login step the server refuses, so the cookie is what made it pass.
    alone = probe_against(routes, lambda b: journey(steps(b)[1:]))
    assert not alone.ok
    assert "expected status 200, found 401" in alone.reason


def test_extraction_by_header_and_by_regex() -> None:
    seen: dict[str, str] = {}

    async def order(request: web.Request) -> web.Response:
        return web.Response(text="Thanks! order number: 12345.", headers={"X-Token": "t-9"})

    async def status(request: web.Request) -> web.Response:
        seen["order"] = request.match_info["order"]
        seen["token"] = request.headers.get("Authorization", "")
        return web.Response(text="shipped")

    routes = [web.post("/order", order), web.get("/orders/{order}", status)]

    def cfg(base: str) -> TransactionProbe:
        return journey(
            [
                {
                    "name": "order",
                    "method": "POST",
                    "url": f"{base}/order",
                    "extract": {"token": {"header": "x-token"}, "number": {"regex": r"order number: (\d+)"}},
                },
                {
                    "name": "status",
                    "url": f"{base}/orders/{{{{ number }}}}",
                    "headers": {"Authorization": "Bearer {{ token }}"},
                    "expect": {"body_contains": "shipped"},
                },
            ]
        )

    result = probe_against(routes, cfg)
    assert result.ok, result.reason
    assert seen == {"order": "12345", "token": "Bearer t-9"}


def test_extracting_a_missing_field_fails_clearly() -> None:
    async def new_cart(request: web.Request) -> web.Response:
        return web.json_response({"cart": {"id": "c-1"}})

    hits: list[str] = []

    async def later(request: web.Request) -> web.Response:
        hits.append("later")
        return web.Response(text="x")

    routes = [web.post("/cart", new_cart), web.get("/later", later)]
    result = probe_against(
        routes,
        lambda b: journey(
            [
                {
                    "name": "create",
                    "method": "POST",
                    "url": f"{b}/cart",
                    "extract": {"c": {"json": "cart.nope"}},
                },
                {"name": "later", "url": f"{b}/later"},
            ]
        ),
    )
    assert not result.ok
    assert result.reason.startswith("step 'create' (POST ")
    assert result.reason.endswith(": cannot extract json cart.nope: no such field")
    assert hits == []


def test_undefined_template_variable_fails_clearly() -> None:
    result = probe_against(
        [web.get("/h", ok_json)],
        lambda b: journey(
            [{"name": "first", "url": f"{b}/h"}, {"name": "second", "url": f"{b}/h/{{{{ nope }}}}"}]
        ),
    )
    assert not result.ok
    assert [s.name for s in result.steps] == ["first", "second"]
    assert result.reason == "step 'second': template error: 'nope' is undefined"
