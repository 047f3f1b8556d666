"""The notification outbox: Dispatcher + SQLiteStore + the validating PagerDuty receiver, over HTTP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from controller.config import PagerDuty
from controller.demo.marketplace import serve
from controller.demo.pagerduty import PagerDutyReceiver
from controller.notify import pagerduty
from controller.notify.outbox import Channel, Dispatcher, post_json
from controller.stores import OutboxMessage, SQLiteStore

KEY = "0123456789abcdef0123456789abcdef"  # 32 characters, like a PagerDuty integration key


class Clock:
    """A clock the test moves by hand, so backoff never means real waiting."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedReceiver(PagerDutyReceiver):
    """The validating receiver, answering the next requests with scripted statuses first."""

    def __init__(self) -> None:
        super().__init__()
        self.script: list[tuple[int, dict[str, str]]] = []

    async def enqueue(self, request: web.Request) -> web.Response:
        if self.script:
            self.requests += 1
            status, headers = self.script.pop(0)
            return web.json_response(
                {"status": "error", "message": "scripted"}, status=status, headers=headers
            )
        return await super().enqueue(request)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def receiver_on(port: int = 0) -> AsyncIterator[tuple[ScriptedReceiver, int]]:
    rcv = ScriptedReceiver()
    runner, actual = await serve(rcv.app(), "127.0.0.1", port)
    try:
        yield rcv, actual
    finally:
        await runner.cleanup()


def pd_config(port: int) -> PagerDuty:
    return PagerDuty(
        routing_key_env="UNUSED", events_url=f"http://127.0.0.1:{port}/v2/enqueue", source="tests"
    )


def dispatcher(
    store: SQLiteStore,
    port: int,
    clock: Clock,
    key: str = KEY,
    events: list[Any] | None = None,
    quick: int = 1,
) -> Dispatcher:
    """Built the way Controller.__init__ builds it: the routing key is added at send time."""
    pd = pd_config(port)
    channel = Channel(
        "pagerduty",
        lambda p: (pagerduty.url_for(pd, p["kind"]), {"routing_key": key, **p["body"]}),
        timeout=3,
    )

    def on_event(msg: OutboxMessage, outcome: str, text: str) -> None:
        if events is not None:
            events.append((msg.key, outcome, text))

    return Dispatcher(
        store, {"pagerduty": channel}, clock, on_event=on_event, first_retry=5.0, quick_attempts=quick
    )


def trigger(port: int, severity: str = "critical", dedup: str = "continuity/INC-1") -> dict[str, Any]:
    return pagerduty.trigger(
        pd_config(port),
        dedup_key=dedup,
        summary=f"[{severity}] checkout down: checkout-journey: expected status 200, found 503",
        severity=severity,
        service="checkout",
        tier="critical",
        ts=1_800_000_000.25,
        details={"incident_id": "INC-1", "failing_probes": ["checkout-journey"]},
    )


def test_trigger_and_resolve_are_accepted_with_the_real_wire_format(tmp_path: Path):
    async def main() -> None:
        clock = Clock()
        store = SQLiteStore(tmp_path)
        async with receiver_on() as (rcv, port):
            d = dispatcher(store, port, clock)
            for i, sev in enumerate(("critical", "moderate", "low")):
                store.enqueue("pagerduty", f"t{i}", trigger(port, sev, f"continuity/INC-{i}"), None, clock())
            store.enqueue("pagerduty", "r0", pagerduty.resolve("continuity/INC-0"), None, clock())
            change = pagerduty.change(pd_config(port), summary="traffic moved", ts=clock(), details={"x": 1})
            store.enqueue("pagerduty", "c0", change, None, clock())
            assert await d.drain() == 5
            assert rcv.rejected == []
            triggers = [e for e in rcv.events if e["event_action"] == "trigger"]
            assert [t["payload"]["severity"] for t in triggers] == ["critical", "error", "warning"]
            first = triggers[0]
            assert first["routing_key"] == KEY and first["dedup_key"] == "continuity/INC-0"
            assert first["payload"]["source"] == "tests"
            assert first["payload"]["timestamp"] == "2027-01-15T08:00:00.250Z"
            [res] = [e for e in rcv.events if e["event_action"] == "resolve"]
            assert res == {"routing_key": KEY, "dedup_key": "continuity/INC-0", "event_action": "resolve"}
            assert rcv.changes and rcv.changes[0]["payload"]["summary"] == "traffic moved"
            assert store.outbox() == [], "everything delivered"
            # And PagerDuty's own answer to such a body is 202 Accepted.
            body = {"routing_key": KEY, **trigger(port)["body"]}
            resp = await asyncio.to_thread(post_json, pagerduty.url_for(pd_config(port), "event"), body, 3)
            assert resp.status_code == 202 and resp.json()["dedup_key"] == "continuity/INC-1"
        store.close()

    asyncio.run(main())


def test_receiver_down_keeps_the_message_then_delivers_it_once(tmp_path: Path):
    async def main() -> None:
        clock, events = Clock(), []
        store = SQLiteStore(tmp_path)
        port = free_port()
        d = dispatcher(store, port, clock, events=events)
        store.enqueue("pagerduty", "INC-1/trigger", trigger(port), "INC-1", clock())
        assert await d.drain() == 0
        [msg] = store.outbox()
        assert msg.attempts == 1 and not msg.dead and msg.delivered_at is None
        assert "network error" in (msg.last_error or "")
        assert 4.0 <= msg.next_attempt_at - clock() <= 6.0, "first retry ~5s, with jitter"
        assert events[-1][1] == "retrying"
        assert await d.drain() == 0 and store.outbox()[0].attempts == 1, "not due yet: no attempt"
        async with receiver_on(port) as (rcv, _):
            clock.now += 6.1
            assert await d.drain() == 1
            clock.now += 1000
            assert await d.drain() == 0
            assert len(rcv.events) == 1 and rcv.requests == 1
        assert store.outbox() == []
        [done] = store.outbox(include_delivered=True)
        assert done.attempts == 2 and done.last_error is None and done.delivered_at == clock.now - 1000
        store.close()

    asyncio.run(main())


def test_server_error_then_ok_is_delivered_once(tmp_path: Path):
    async def main() -> None:
        clock = Clock()
        store = SQLiteStore(tmp_path)
        async with receiver_on() as (rcv, port):
            d = dispatcher(store, port, clock)
            rcv.script = [(500, {})]
            store.enqueue("pagerduty", "k", trigger(port), None, clock())
            assert await d.drain() == 0
            [msg] = store.outbox()
            assert msg.attempts == 1 and msg.last_error.startswith("HTTP 500")
            clock.now = msg.next_attempt_at
            assert await d.drain() == 1
            clock.now += 3600
            assert await d.drain() == 0
            assert len(rcv.events) == 1 and rcv.requests == 2
        store.close()

    asyncio.run(main())


def test_quick_retry_inside_one_drain(tmp_path: Path):
    async def main() -> None:
        clock = Clock()
        store = SQLiteStore(tmp_path)
        async with receiver_on() as (rcv, port):
            d = dispatcher(store, port, clock, quick=3)
            rcv.script = [(503, {})]
            store.enqueue("pagerduty", "k", trigger(port), None, clock())
            assert await d.drain() == 1
            assert len(rcv.events) == 1 and rcv.requests == 2
        store.close()

    asyncio.run(main())


def test_invalid_event_is_given_up_not_retried(tmp_path: Path):
    async def main() -> None:
        clock, events = Clock(), []
        store = SQLiteStore(tmp_path)
        async with receiver_on() as (rcv, port):
            d = dispatcher(store, port, clock, key="too-short", events=events, quick=3)
            store.enqueue("pagerduty", "k", trigger(port), None, clock())
            assert await d.drain() == 0
            [msg] = store.outbox()
            assert msg.dead and msg.attempts == 1
            assert "HTTP 400" in msg.last_error and "routing_key" in msg.last_error
            assert events == [("k", "refused", msg.last_error)]
            clock.now += 86400
            assert await d.drain() == 0
            assert rcv.requests == 1, "a refused message is never sent again"
            assert len(rcv.rejected) == 1 and rcv.events == []
        store.close()

    asyncio.run(main())


def test_rate_limited_honours_retry_after(tmp_path: Path):
    async def main() -> None:
        clock = Clock()
        store = SQLiteStore(tmp_path)
        async with receiver_on() as (rcv, port):
            d = dispatcher(store, port, clock, quick=3)
            rcv.script = [(429, {"Retry-After": "7"})]
            store.enqueue("pagerduty", "k", trigger(port), None, clock())
            assert await d.drain() == 0
            assert rcv.requests == 1, "a 429 with Retry-After is not quick-retried"
            [msg] = store.outbox()
            assert abs(msg.next_attempt_at - (clock() + 7)) < 1e-6
            assert msg.last_error.startswith("HTTP 429")
            clock.now += 6.9
            assert store.due(clock()) == []
            clock.now += 0.1
            assert await d.drain() == 1 and len(rcv.events) == 1
        store.close()

    asyncio.run(main())


def test_same_key_enqueued_twice_is_one_message(tmp_path: Path):
    store = SQLiteStore(tmp_path)
    assert store.enqueue("pagerduty", "INC-1/pagerduty/trigger", {"kind": "event", "body": {}}, "INC-1", 1.0)
    assert not store.enqueue(
        "pagerduty", "INC-1/pagerduty/trigger", {"kind": "event", "body": {}}, "INC-1", 2.0
    )
    [msg] = store.outbox()
    assert msg.created_at == 1.0
    store.close()


def test_outbox_survives_a_restart(tmp_path: Path):
    async def main() -> None:
        clock = Clock()
        port = free_port()
        store = SQLiteStore(tmp_path)
        store.enqueue("pagerduty", "INC-1/trigger", trigger(port), "INC-1", clock())
        assert await dispatcher(store, port, clock).drain() == 0
        store.close()

        store = SQLiteStore(tmp_path)
        [msg] = store.outbox()
        assert msg.key == "INC-1/trigger" and msg.attempts == 1 and msg.payload == trigger(port)
        clock.now += 60
        assert [m.key for m in store.due(clock())] == ["INC-1/trigger"]
        async with receiver_on(port) as (rcv, _):
            assert await dispatcher(store, port, clock).drain() == 1
            assert [e["dedup_key"] for e in rcv.events] == ["continuity/INC-1"]
        assert store.outbox() == []
        store.close()

    asyncio.run(main())


def test_a_resolve_never_overtakes_its_trigger(tmp_path: Path):
    """The trigger meets a receiver outage and waits out its backoff; the resolve queued meanwhile
    is due first. Sent first, PagerDuty would close nothing and then open an alert for an outage
    that is over (found by the simulation, seeds 161 and 184)."""

    async def main() -> None:
        clock = Clock()
        store = SQLiteStore(tmp_path)
        async with receiver_on() as (rcv, port):
            d = dispatcher(store, port, clock)
            rcv.script = [(503, {})]
            store.enqueue("pagerduty", "INC-1/trigger", trigger(port), "INC-1", clock())
            assert await d.drain() == 0  # the trigger waits ~5 s
            store.enqueue(
                "pagerduty", "INC-1/resolve", pagerduty.resolve("continuity/INC-1"), "INC-1", clock()
            )
            other = trigger(port, dedup="continuity/INC-2")
            store.enqueue("pagerduty", "INC-2/trigger", other, "INC-2", clock())
            assert await d.drain() == 1  # another incident's page is not held back
            assert [e["dedup_key"] for e in rcv.events] == ["continuity/INC-2"]
            clock.now += 60
            assert await d.drain() == 2
            mine = [e["event_action"] for e in rcv.events if e["dedup_key"] == "continuity/INC-1"]
            assert mine == ["trigger", "resolve"]
        store.close()

    asyncio.run(main())


class RecordFails(SQLiteStore):
    """A real store whose write of a delivery fails while `failing` (a full disk after the send)."""

    failing = False

    def delivered(self, msg_id: int, now: float) -> None:
        if self.failing:
            raise OSError(28, "No space left on device")
        super().delivered(msg_id, now)


def test_a_message_is_not_sent_again_when_only_its_record_failed(tmp_path: Path):
    """Slack has no dedup key: a message the receiver took must not be sent again because the store
    could not record it (the simulation saw one Slack message delivered 17 times, seed 143)."""

    async def main() -> None:
        clock = Clock()
        store = RecordFails(tmp_path)
        async with receiver_on() as (rcv, port):
            d = dispatcher(store, port, clock)
            store.enqueue("pagerduty", "INC-1/trigger", trigger(port), "INC-1", clock())
            store.failing = True
            for _ in range(3):
                try:
                    await d.drain()
                except OSError:
                    pass
                clock.now += 10
            assert len(rcv.events) == 1
            store.failing = False
            assert await d.drain() == 0  # nothing left to send: only the record was missing
            assert len(rcv.events) == 1
            assert [m.key for m in store.outbox()] == []
        store.close()

    asyncio.run(main())


class RecordHeld(SQLiteStore):
    """A real store whose write of a delivery hangs while `held` is clear (a hung API server)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import threading

        self.held = threading.Event()
        self.held.set()

    def delivered(self, msg_id: int, now: float) -> None:
        self.held.wait(30)
        super().delivered(msg_id, now)


def test_a_held_delivery_record_holds_no_other_message_and_none_is_sent_twice(tmp_path: Path):
    """The trigger is sent and the store hangs on writing that it was: the resolve of the same
    incident and another incident's page still go out at once (in order), and once the store
    answers, the records land and nothing is sent again."""

    async def main() -> None:
        clock = Clock()
        store = RecordHeld(tmp_path)
        async with receiver_on() as (rcv, port):
            d = dispatcher(store, port, clock)
            d.record_wait = 0.05
            store.held.clear()
            store.enqueue("pagerduty", "INC-1/trigger", trigger(port), "INC-1", clock())
            # (A drain that waited on the held record would time out here.)
            assert await asyncio.wait_for(d.drain(), 10) == 1
            store.enqueue(
                "pagerduty", "INC-1/resolve", pagerduty.resolve("continuity/INC-1"), "INC-1", clock()
            )
            store.enqueue(
                "pagerduty", "INC-2/trigger", trigger(port, dedup="continuity/INC-2"), "INC-2", clock()
            )
            assert await asyncio.wait_for(d.drain(), 10) == 2  # not held behind the trigger's record
            sent = [(e["dedup_key"], e["event_action"]) for e in rcv.events]
            assert sent == [
                ("continuity/INC-1", "trigger"),
                ("continuity/INC-1", "resolve"),
                ("continuity/INC-2", "trigger"),
            ]
            assert await d.drain() == 0  # still unrecorded, never resent
            store.held.set()
            await d.settle()
            assert await d.drain() == 0
            assert len(rcv.events) == 3
            assert store.outbox() == []  # every delivery recorded
        store.close()

    asyncio.run(main())
