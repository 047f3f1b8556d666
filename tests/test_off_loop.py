"""No store call on the event loop: proved structurally, not by timing.

The controller runs against a real SQLite store wrapped so that every method checks the thread it is
called on: a call from a thread that is running an event loop is recorded and refused. Then an
incident opens and pages, its run waits for approval, and every door a human or a partner uses is
exercised against the real HTTP server: the read-only API, the status page, the console (pages,
the event stream, a button), the incident and run commands, a signed Slack approval and a signed
PagerDuty webhook. The communicator applies what they asked in the following ticks (acknowledge,
update, the approved run, resolve), and a replica becoming leader re-reads what the last one left.
Not one store call may have run on the loop; and the guard is shown to refuse one that does.

The one deliberate exception is the controller's construction (it reads the runs, incidents and
pushed signals once, before any probe, task or request exists that a slow read could hold up): the
guard is armed right after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.api import app
from controller.config import load_config
from controller.demo.pagerduty import PagerDutyReceiver
from controller.interactions import pagerduty_signature, slack_signature
from controller.loop import Controller
from controller.notify.receivers import SlackReceiver, serve
from controller.stores import SQLiteStore
from tests.comms_env import PD_KEY, FakeClock, cycle
from tests.console_env import TOKEN, config_text, feed

SLACK_SECRET = "off-loop-slack-signing-secret-0000"
PD_SECRET = "off-loop-pagerduty-signing-secret"
INBOUND = """
inbound:
  slack_signing_secret_env: OFFLOOP_SLACK_SECRET
  slack_response_url_prefix: "http://127.0.0.1:"
  slack_users: {U42: alice}
  pagerduty_signing_secret_env: OFFLOOP_PD_SECRET
"""


class OffLoopStore:
    """A real store whose every method refuses to run on a thread that is running an event loop.

    Not a mock: each call goes to the wrapped SQLiteStore and returns what it returns. Armed, a call
    made on the loop's thread is recorded (with where it came from) and raises, so that a handler
    that swallows errors still leaves its trace in `on_loop`."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.armed = False
        self.on_loop: list[str] = []
        self.off_loop = 0
        self.methods: set[str] = set()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.armed:
                try:
                    asyncio.get_running_loop()
                except RuntimeError:  # a worker thread: no loop runs here
                    with self._lock:
                        self.off_loop += 1
                        self.methods.add(name)
                else:
                    where = "".join(traceback.format_stack(limit=8)[:-1])
                    self.on_loop.append(f"store.{name} called on the event loop thread:\n{where}")
                    raise AssertionError(f"store.{name} called on the event loop thread")
            return attr(*args, **kwargs)

        return call


def click(run_id: str) -> bytes:
    """Slack's block_actions payload for the Approve button, form-encoded as Slack sends it."""
    from urllib.parse import urlencode

    payload = {
        "type": "block_actions",
        "user": {"id": "U42", "username": "alice.s", "name": "alice.s"},
        "response_url": "http://127.0.0.1:9/actions/T1/1/abc",
        "message": {"text": "Approval needed", "blocks": []},
        "actions": [{"type": "button", "action_id": "continuity.approve", "value": run_id}],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()


def pd_event(kind: str, incident_key: str) -> bytes:
    return json.dumps(
        {
            "event": {
                "id": str(uuid.uuid4()),
                "event_type": kind,
                "agent": {"summary": "Jane Oncall"},
                "data": {"id": "PGR0VU2", "incident_key": incident_key},
            }
        }
    ).encode()


def test_no_store_call_runs_on_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSOLE_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("OFFLOOP_SLACK_SECRET", SLACK_SECRET)
    monkeypatch.setenv("OFFLOOP_PD_SECRET", PD_SECRET)
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    async def main() -> None:
        pd, slack = PagerDutyReceiver(), SlackReceiver()
        async with contextlib.AsyncExitStack() as stack:
            pd_url = await stack.enter_async_context(serve(pd.app()))
            slack_url = await stack.enter_async_context(serve(slack.app()))
            monkeypatch.setenv("CONSOLE_SLACK_URL", f"{slack_url}/services/T000/B000/XXXX")
            (tmp_path / "continuity.yaml").write_text(config_text(tmp_path, pd_url, INBOUND))
            cfg = load_config(tmp_path / "continuity.yaml")
            clock = FakeClock()
            guard = OffLoopStore(SQLiteStore(cfg.controller.data_dir))
            ctrl = Controller(cfg, guard, clock=clock, env=lambda _: PD_KEY)  # type: ignore[arg-type]
            stack.callback(guard.inner.close)
            guard.armed = True

            # The guard can fail: a call made here, on the loop, is refused and recorded.
            with pytest.raises(AssertionError, match="on the event loop"):
                ctrl.astore.store.list_incidents()
            assert len(guard.on_loop) == 1
            guard.on_loop.clear()

            base = await stack.enter_async_context(serve(app(ctrl)))  # mounts the Slack tick hook too

            # Checkout goes down: an incident opens and pages, its manual failover awaits approval,
            # the communicator announces it and the approval request goes to Slack with buttons.
            for probe in ("catalog-api", "search-api", "checkout-secondary"):
                feed(ctrl, probe, True, clock, n=1)
            feed(ctrl, "checkout-api", False, clock)
            await cycle(ctrl)
            await cycle(ctrl)
            [inc] = guard.inner.list_incidents(status="open")
            [run] = [r for r in guard.inner.runs() if r.state == "awaiting_approval"]
            assert any(m["text"].startswith("Approval needed") for m in slack.accepted)

            s = await stack.enter_async_context(
                aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            )

            async def get(path: str) -> str:
                async with s.get(f"{base}{path}") as r:
                    assert r.status == 200, (path, r.status, await r.text())
                    return await r.text()

            async def post(path: str, want: int = 200, **kwargs: Any) -> str:
                async with s.post(f"{base}{path}", allow_redirects=False, **kwargs) as r:
                    assert r.status == want, (path, r.status, await r.text())
                    return await r.text()

            # Read-only views and the public status page.
            for path in (
                "/readyz",
                "/incidents",
                f"/incidents/{inc.id}",
                "/services",
                "/runs",
                f"/runs/{run.id}",
                "/status",
                "/status.json",
                "/status.atom",
            ):
                await get(path)
            assert json.loads(await get(f"/incidents/{inc.id}"))["timeline"], "the timeline is read"

            # The console: log in, the overview, the incident page, its event stream, a button.
            await post("/console/login", 303, data={"name": "alice", "token": TOKEN})
            overview = await get("/console")
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', overview)
            assert csrf, overview[:300]
            await get(f"/console/incidents/{inc.id}")
            async with s.get(f"{base}/console/incidents/{inc.id}/events") as stream:
                first = await asyncio.wait_for(stream.content.readuntil(b"event: entry"), 10)
                assert b"event: entry" in first
            await post("/console/pause", 303, data={"csrf": csrf.group(1), "reason": "checking"})
            await post("/resume", headers=bearer)

            # The incident commands and a run command through the API (409: nothing is frozen).
            await post(f"/incidents/{inc.id}/ack", headers=bearer, json={"by": "bob"})
            await post(
                f"/incidents/{inc.id}/update",
                headers=bearer,
                json={"by": "bob", "status": "identified", "message": "moving checkout"},
            )
            await post("/services/checkout/ack", 409, headers=bearer)

            # A signed Slack approval, a signed PagerDuty "resolved" our probes disagree with.
            body, stamp = click(run.id), str(int(time.time()))
            await post(
                "/slack/interactions",
                data=body,
                headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "X-Slack-Request-Timestamp": stamp,
                    "X-Slack-Signature": slack_signature(SLACK_SECRET, stamp, body),
                },
            )
            pd_body = pd_event("incident.resolved", inc.dedup_key)
            answer = await post(
                "/pagerduty/webhook",
                data=pd_body,
                headers={"X-PagerDuty-Signature": pagerduty_signature(PD_SECRET, pd_body)},
            )
            assert "probes disagree" in answer

            # The next ticks apply it all: acknowledged, updated, the approved run executed.
            await cycle(ctrl)
            await cycle(ctrl)
            assert guard.inner.get_run(run.id).state == "succeeded"  # type: ignore[union-attr]
            comms = guard.inner.get_incident(inc.id).data["comms"]  # type: ignore[union-attr]
            assert comms["acked_by"] == "bob"
            assert any(u["by"] == "bob" and "moving checkout" in u["text"] for u in comms["updates"])

            # Back up; a human resolves it; the resolution goes out.
            feed(ctrl, "checkout-api", True, clock)
            await post(f"/incidents/{inc.id}/resolve", headers=bearer, json={"by": "bob", "message": "ok"})
            await cycle(ctrl)
            await cycle(ctrl)
            assert guard.inner.get_incident(inc.id).status == "resolved"  # type: ignore[union-attr]
            assert any(e["event_action"] == "resolve" for e in pd.events)

            # A replica that becomes leader re-reads the runs, incidents and signals off the loop.
            await ctrl.cycle._became_leader()
            await ctrl.astore.close()

        assert guard.on_loop == [], "\n\n".join(guard.on_loop)
        # ... and the store was used, off the loop, by every part exercised above.
        needed: Callable[[str], bool] = guard.methods.__contains__
        for method in ("list_incidents", "get_incident", "update_incident", "append_many", "enqueue"):
            assert needed(method), (method, sorted(guard.methods))
        for method in ("runs", "steps", "get_run", "set_flag", "flags", "timeline", "failover_states"):
            assert needed(method), (method, sorted(guard.methods))
        assert guard.off_loop > 100, guard.off_loop

    asyncio.run(main())
