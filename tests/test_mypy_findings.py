"""Bugs the type checker found when it was first run over the code (tests/test_hygiene.py runs it):
each was a crash on a path the other tests went through without looking.

Real parts: the Controller with its SQLite store, a real aiohttp client against a local server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from controller.config import load_config
from controller.loop import Controller
from controller.stores import SQLiteStore
from probes.base import ProbeResult
from probes.http import MAX_REDIRECTS, Step, _exchange


def test_a_prober_error_reaches_the_listeners_with_its_kind(tmp_path: Path) -> None:
    """`_emit(kind, **facts)` was called with `kind=` as a fact too: a TypeError on every prober
    error once anything listened (the drills and the console do)."""
    path = tmp_path / "continuity.yaml"
    path.write_text(
        f"""
services:
  shop: {{tier: critical, rto: 5m, probes: [web]}}
probes:
  web: {{kind: http, url: "http://127.0.0.1:9/", interval: 1s, timeout: 500ms}}
controller: {{data_dir: "{tmp_path / "state"}"}}
""",
        encoding="utf-8",
    )
    cfg = load_config(path)
    c = Controller(cfg, SQLiteStore(cfg.controller.data_dir))
    heard: list[tuple[str, dict[str, Any]]] = []
    c.listeners.append(lambda kind, facts: heard.append((kind, facts)))
    try:
        c.detection.ingest(
            ProbeResult("web", False, 1000.0, 0.0, error="Too many open files", prober_error="emfile")
        )
    finally:
        c.store.close()
    assert heard == [
        ("prober_error", {"probe": "web", "prober_error": "emfile", "message": "Too many open files"})
    ]
    assert c.metrics.registry.get_sample_value("continuity_prober_errors_total", {"kind": "emfile"}) == 1


def test_a_redirect_loop_in_a_transaction_step_is_a_failed_step_not_a_crash() -> None:
    """`_exchange` returned a 2-tuple on too many redirects; its callers unpack three."""

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def main() -> tuple[Any, ...]:
        app = web.Application()
        app.router.add_get("/loop", loop)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session:
                step = Step(name="loop", url=f"http://127.0.0.1:{port}/loop")
                return await _exchange(session, step, {}, 5.0)
        finally:
            await runner.cleanup()

    answer = asyncio.run(main())
    assert len(answer) == 3
    result, observed, prober_error = answer
    assert not result.ok and f"more than {MAX_REDIRECTS} redirects" in result.error
    assert observed is None and prober_error is None
