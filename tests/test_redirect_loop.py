"""A journey step sent round more than MAX_REDIRECTS redirects fails as the target's fault with a
sentence saying so; it used to raise ValueError (a 2-tuple where three values are unpacked)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from probes.http import MAX_REDIRECTS, Step, run_journey


class _Loop(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "/x" + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def loop_url() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Loop)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/a"
    srv.shutdown()
    srv.server_close()


def test_a_redirect_loop_fails_the_step_without_raising(loop_url: str) -> None:
    step = Step.model_validate({"name": "home", "url": loop_url})
    result = asyncio.run(run_journey("shop", [step], {}, 10.0))
    assert not result.ok
    assert result.steps[0].error == f"more than {MAX_REDIRECTS} redirects"
    assert not result.details.get("prober_error")
