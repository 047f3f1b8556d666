"""Notification channels end to end: builders -> outbox (SQLiteStore) -> Dispatcher -> validating receivers.

Each receiver checks the real wire format (controller/notify/receivers.py, tests/fakes/smtp.py), so
a payload that Slack, Teams, Statuspage or an SMTP server would refuse fails here. The dispatcher's
clock is a fake: retry delays and Retry-After are checked exactly, without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from controller.config import Email, Notifiers, PagerDuty, Slack, Statuspage, Teams, Webhook
from controller.demo.pagerduty import PagerDutyReceiver
from controller.notify import email as mail
from controller.notify import pagerduty, slack, statuspage, teams, webhook
from controller.notify.outbox import Channel, Dispatcher, Permanent, Transient
from controller.notify.receivers import (
    SlackReceiver,
    StatuspageReceiver,
    TeamsReceiver,
    WebhookReceiver,
    serve,
    validate_slack,
    validate_statuspage,
)
from controller.stores import SQLiteStore
from tests.fakes.smtp import Recorder, self_signed, smtp_server

INCIDENT: dict[str, Any] = {
    "id": "INC-20261124-abc123",
    "service": "checkout",
    "severity": "critical",
    "status": "open",
    "title": "Checkout is failing",
    "started_at": 1_732_420_000.0,
    "public_status": "investigating",
    "message": "Payments fail for <some> customers & we are failing over",
    "eta": 1_732_421_800.0,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def dispatcher(store: SQLiteStore, clock: FakeClock, *channels: Channel) -> Dispatcher:
    return Dispatcher(store, {c.name: c for c in channels}, clock, quick_attempts=1)


def stored_text(store: SQLiteStore) -> str:
    return json.dumps([m.payload for m in store.outbox(include_delivered=True)])


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(tmp_path)
    yield s
    s.close()


# ------------------------------------------------------------------------------------ Slack


def test_slack_block_kit_accepted_for_each_event_and_no_secret_stored(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = SlackReceiver(token="T1/B2/secret-token")
    clock = FakeClock()

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            monkeypatch.setenv("SLACK_URL", f"{base}/services/T1/B2/secret-token")
            d = dispatcher(store, clock, slack.channel(Slack(webhook_url_env="SLACK_URL")))
            for event in ("opened", "update", "resolved"):
                store.enqueue(
                    "slack",
                    f"{INCIDENT['id']}/{event}/slack",
                    slack.message(INCIDENT, event),
                    INCIDENT["id"],
                    clock(),
                )
            assert await d.drain() == 3

    run(scenario())
    assert receiver.rejected == []
    assert len(receiver.accepted) == 3
    opened, _, resolved = receiver.accepted
    header = opened["blocks"][0]["text"]["text"]
    assert header.startswith(":red_circle:") and "checkout" in header
    assert resolved["blocks"][0]["text"]["text"].startswith(":large_green_circle:")
    section = opened["blocks"][1]
    assert "&lt;some&gt;" in section["text"]["text"] and "&amp;" in section["text"]["text"]
    assert [f["text"].split("\n")[0] for f in section["fields"]] == [
        "*Severity*",
        "*Status*",
        "*Service*",
        "*Started*",
    ]
    assert "Next update" in opened["blocks"][2]["elements"][0]["text"]
    assert "Next update" not in resolved["blocks"][2]["elements"][0]["text"]
    assert "secret-token" not in stored_text(store)


def test_slack_builder_respects_limits_the_receiver_enforces() -> None:
    huge = {**INCIDENT, "title": "x" * 500, "message": "y" * 5000, "service": "s" * 3000}
    code, errors = validate_slack(slack.message(huge, "opened"))
    assert (code, errors) == (None, [])
    bad = slack.message(INCIDENT, "opened")
    bad["blocks"][0]["text"]["text"] = "h" * 151
    assert validate_slack(bad)[0] == "invalid_blocks"
    bad = slack.message(INCIDENT, "opened")
    bad["blocks"][1]["fields"] *= 3  # 12 fields
    assert validate_slack(bad)[0] == "invalid_blocks"
    assert validate_slack({"blocks": []})[0] == "no_text"


def test_slack_refusals_are_dead_not_retried(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = SlackReceiver()
    clock = FakeClock()
    events: list[tuple[str, str]] = []

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            monkeypatch.setenv("GOOD", f"{base}/services/{receiver.token}")
            monkeypatch.setenv("WRONG", f"{base}/services/T9/B9/nope")
            good = slack.channel(Slack(webhook_url_env="GOOD"))
            wrong = slack.channel(Slack(webhook_url_env="WRONG"), name="slack-wrong")
            d = dispatcher(store, clock, good, wrong)
            d.on_event = lambda msg, kind, text: events.append((kind, text))
            invalid = slack.message(INCIDENT, "opened")
            invalid["blocks"][0]["text"]["type"] = "mrkdwn"  # headers are plain_text only
            store.enqueue("slack", "k1", invalid, None, clock())
            store.enqueue("slack", "k2", {"blocks": []}, None, clock())
            store.enqueue("slack-wrong", "k3", slack.message(INCIDENT, "opened"), None, clock())
            assert await d.drain() == 0
            clock.advance(3600)
            assert await d.drain() == 0

    run(scenario())
    dead = {m.key: m for m in store.outbox()}
    assert all(m.dead and m.attempts == 1 for m in dead.values())
    assert "invalid_blocks" in dead["k1"].last_error
    assert "no_text" in dead["k2"].last_error
    assert "404" in dead["k3"].last_error and "no_service" in dead["k3"].last_error
    assert receiver.requests == 3 and [k for k, _ in events] == ["refused"] * 3


def test_slack_429_retry_after_is_honoured_and_pauses_the_channel(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = SlackReceiver()
    receiver.fail_with, receiver.retry_after = 429, 30
    clock = FakeClock()

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            monkeypatch.setenv("SLACK_URL", f"{base}/services/{receiver.token}")
            d = dispatcher(store, clock, slack.channel(Slack(webhook_url_env="SLACK_URL")))
            store.enqueue("slack", "a", slack.message(INCIDENT, "opened"), None, clock())
            store.enqueue("slack", "b", slack.message(INCIDENT, "update"), None, clock())
            assert await d.drain() == 0
            assert receiver.requests == 1  # the second message waits for the pause too
            first = store.outbox()[0]
            assert first.next_attempt_at == clock() + 30 and "429" in first.last_error
            receiver.fail_with = None
            clock.advance(29)
            assert await d.drain() == 0 and receiver.requests == 1
            clock.advance(1)
            assert await d.drain() == 2

    run(scenario())
    assert len(receiver.accepted) == 2 and store.outbox() == []


# ------------------------------------------------------------------------------------ Teams


def test_teams_adaptive_card_accepted_and_bad_envelope_refused(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = TeamsReceiver()
    clock = FakeClock()

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            monkeypatch.setenv("TEAMS_URL", f"{base}/workflows/abc")
            d = dispatcher(store, clock, teams.channel(Teams(webhook_url_env="TEAMS_URL")))
            store.enqueue("teams", "ok", teams.message(INCIDENT, "opened"), None, clock())
            bad = teams.message(INCIDENT, "update")
            bad["attachments"][0]["contentType"] = "application/json"
            store.enqueue("teams", "bad-type", bad, None, clock())
            unknown = teams.message(INCIDENT, "update")
            unknown["attachments"][0]["content"]["body"].append({"type": "Marquee", "text": "hi"})
            store.enqueue("teams", "bad-element", unknown, None, clock())
            assert await d.drain() == 1

    run(scenario())
    (card,) = receiver.accepted
    content = card["attachments"][0]["content"]
    assert content["version"] == "1.4" and content["$schema"].startswith("http://adaptivecards.io/")
    facts = {f["title"]: f["value"] for f in content["body"][2]["facts"]}
    assert facts["Severity"] == "critical" and facts["Incident"] == INCIDENT["id"]
    dead = {m.key: m.last_error for m in store.outbox()}
    assert "contentType" in dead["bad-type"] and "Marquee" in dead["bad-element"]


# ------------------------------------------------------------------------------------ Webhook


def test_webhook_signed_and_verified_by_the_receiver(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    receiver = WebhookReceiver("s3cret")
    clock = FakeClock()

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            cfg = Webhook(url=f"{base}/hook", secret_env="HOOK_SECRET")
            d = dispatcher(store, clock, webhook.channel(cfg))
            store.enqueue(
                "webhook",
                "INC-1/opened/webhook",
                webhook.event(INCIDENT, "opened", 1_732_420_100),
                None,
                clock(),
            )
            assert await d.drain() == 1

    run(scenario())
    (got,) = receiver.accepted
    assert got["event"] == "incident.opened" and got["key"] == "INC-1/opened/webhook"
    assert (
        got["body"]["incident"]["id"] == INCIDENT["id"]
        and got["body"]["occurred_at"] == "2024-11-24T03:48:20Z"
    )
    assert "s3cret" not in stored_text(store)
    # a wrong secret is refused (401 -> dead, not retried)
    receiver2 = WebhookReceiver("other-secret")

    async def wrong() -> None:
        async with serve(receiver2.app()) as base:
            d = dispatcher(
                store, clock, webhook.channel(Webhook(url=f"{base}/hook", secret_env="HOOK_SECRET"))
            )
            store.enqueue("webhook", "k2", webhook.event(INCIDENT, "update", 0), None, clock())
            assert await d.drain() == 0

    run(wrong())
    assert receiver2.accepted == [] and store.outbox()[0].dead and "401" in store.outbox()[0].last_error


def test_verify_rejects_tampering_stale_and_future_timestamps() -> None:
    body = json.dumps(webhook.event(INCIDENT, "opened", 0)).encode()
    now = 1_800_000_000
    ts = str(now)
    sig = webhook.sign("k", ts, body)
    assert webhook.verify("k", ts, body, sig, now=now)
    assert webhook.verify("k", ts, body, sig, now=now + 299)
    assert not webhook.verify("k", ts, body.replace(b"critical", b"low"), sig, now=now)  # tampered body
    assert not webhook.verify("k", str(now + 1), body, sig, now=now)  # timestamp is signed too
    assert not webhook.verify("k", ts, body, sig, now=now + 301)  # stale: a replay
    assert not webhook.verify("k", ts, body, sig, now=now - 301)  # from the future
    assert not webhook.verify("other", ts, body, sig, now=now)
    assert not webhook.verify("k", "yesterday", body, sig, now=now)
    assert not webhook.verify("k", ts, body, "", now=now)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_receiver_down_then_up_delivers_exactly_once(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "k")
    receiver = WebhookReceiver("k")
    clock = FakeClock()
    port = _free_port()
    cfg = Webhook(url=f"http://127.0.0.1:{port}/hook", secret_env="HOOK_SECRET", timeout="2s")

    async def scenario() -> None:
        d = dispatcher(store, clock, webhook.channel(cfg))
        store.enqueue("webhook", "once", webhook.event(INCIDENT, "opened", 0), None, clock())
        assert await d.drain() == 0  # nobody listening
        (msg,) = store.outbox()
        assert not msg.dead and msg.attempts == 1 and "network error" in msg.last_error
        assert 4.0 <= msg.next_attempt_at - clock() <= 6.0  # first_retry 5 s, +-20% jitter
        runner = web.AppRunner(receiver.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            assert await d.drain() == 0  # not due yet
            clock.advance(10)
            assert await d.drain() == 1
            clock.advance(3600)
            assert await d.drain() == 0
        finally:
            await runner.cleanup()

    run(scenario())
    assert len(receiver.accepted) == 1 and receiver.requests == 1 and receiver.duplicates == 0
    (msg,) = store.outbox(include_delivered=True)
    assert msg.delivered_at is not None and msg.attempts == 2


# ------------------------------------------------------------------------------------ pacing


def test_token_bucket_paces_a_channel_and_drops_nothing(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "k")
    receiver = WebhookReceiver("k")
    clock = FakeClock()

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            ch = webhook.channel(Webhook(url=f"{base}/hook", secret_env="HOOK_SECRET", rate_per_minute=60))
            ch.burst = 2
            d = dispatcher(store, clock, ch)
            for i in range(5):
                store.enqueue("webhook", f"m{i}", webhook.event(INCIDENT, "update", i), None, clock())
            assert await d.drain() == 2  # the burst
            assert await d.drain() == 0  # no time passed, no token
            clock.advance(1)
            assert await d.drain() == 1  # one a second
            clock.advance(10)
            assert await d.drain() == 2  # refilled to the burst, no more

    run(scenario())
    assert [a["key"] for a in receiver.accepted] == [f"m{i}" for i in range(5)]
    assert all(m.attempts == 1 and not m.dead for m in store.outbox(include_delivered=True))


# ------------------------------------------------------------------------------------ Statuspage

SP_KEY = "sp-api-key-123"


def _statuspage(base: str) -> Statuspage:
    return Statuspage(
        page_id="pg1", api_key_env="SP_KEY", base_url=f"{base}/v1", components={"checkout": "cmp1"}
    )


def test_statuspage_update_waits_for_create_then_both_in_order(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SP_KEY", SP_KEY)
    clock = FakeClock()
    receiver = StatuspageReceiver("pg1", SP_KEY, clock=clock)

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            cfg = _statuspage(base)
            d = dispatcher(store, clock, statuspage.channel(cfg, store))
            store.enqueue("statuspage", "c", statuspage.create(cfg, INCIDENT), INCIDENT["id"], clock())
            identified = {
                **INCIDENT,
                "public_status": "identified",
                "severity": "moderate",
                "message": "Found it",
            }
            store.enqueue("statuspage", "u", statuspage.update(cfg, identified), INCIDENT["id"], clock())
            receiver.fail_with = 503
            assert await d.drain() == 0
            errors = {m.key: m.last_error for m in store.outbox()}
            # The dispatcher keeps one incident's messages in order: the update waits behind the
            # create without even being tried (the channel's own "create not delivered yet" guard
            # stays as a second line of defence).
            assert "503" in errors["c"] and errors["u"] is None
            assert receiver.requests == 1  # the update did not go out
            receiver.fail_with = None
            clock.advance(60)
            assert await d.drain() == 2
            resolved = {**INCIDENT, "status": "resolved", "message": "Recovered"}
            store.enqueue(
                "statuspage", "r", statuspage.update(cfg, resolved, "resolved"), INCIDENT["id"], clock()
            )
            assert await d.drain() == 1

    run(scenario())
    assert [(m, i) for m, i, _ in receiver.log] == [
        ("POST", "sp0001"),
        ("PATCH", "sp0001"),
        ("PATCH", "sp0001"),
    ]
    created, updated, resolved_body = (body for _, _, body in receiver.log)
    assert created["impact_override"] == "critical" and created["components"] == {"cmp1": "major_outage"}
    assert created["component_ids"] == ["cmp1"] and created["name"] == INCIDENT["title"]
    assert updated["status"] == "identified" and updated["components"] == {"cmp1": "degraded_performance"}
    assert resolved_body["status"] == "resolved" and resolved_body["components"] == {"cmp1": "operational"}
    assert store.get_ref("statuspage", INCIDENT["id"]) == "sp0001"
    assert len(receiver.incidents) == 1 and SP_KEY not in stored_text(store)


def test_statuspage_refused_create_refuses_updates_and_bad_key_is_dead(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    receiver = StatuspageReceiver("pg1", SP_KEY, clock=clock)

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            monkeypatch.setenv("SP_KEY", "wrong")
            cfg = _statuspage(base)
            d = dispatcher(store, clock, statuspage.channel(cfg, store))
            store.enqueue("statuspage", "c", statuspage.create(cfg, INCIDENT), INCIDENT["id"], clock())
            store.enqueue("statuspage", "u", statuspage.update(cfg, INCIDENT), INCIDENT["id"], clock())
            assert await d.drain() == 0

    run(scenario())
    errors = {m.key: (m.dead, m.last_error) for m in store.outbox()}
    assert errors["c"][0] and "401" in errors["c"][1]
    assert errors["u"][0] and "refused" in errors["u"][1]
    assert receiver.incidents == {}


class _RefFails(SQLiteStore):
    """A real SQLite store whose first `set_ref` fails, as a full disk or a sick API server would."""

    failures = 1

    def set_ref(self, channel: str, incident_id: str, ref: str) -> None:
        if self.failures and channel == "statuspage":  # the id's record, not the attempt's mark
            self.failures -= 1
            raise OSError("disk full")
        super().set_ref(channel, incident_id, ref)


def test_statuspage_create_is_not_sent_twice_when_the_store_cannot_record_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SP_KEY", SP_KEY)
    clock = FakeClock()
    receiver = StatuspageReceiver("pg1", SP_KEY, clock=clock)
    store = _RefFails(tmp_path / "refs.db")

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            cfg = _statuspage(base)
            d = dispatcher(store, clock, statuspage.channel(cfg, store))
            store.enqueue("statuspage", "c", statuspage.create(cfg, INCIDENT), INCIDENT["id"], clock())
            store.enqueue("statuspage", "u", statuspage.update(cfg, INCIDENT), INCIDENT["id"], clock())
            for _ in range(3):
                await d.drain()
                clock.advance(60)

    run(scenario())
    assert store.failures == 0  # the fault did happen
    assert [method for method, _, _ in receiver.log] == ["POST", "PATCH"]  # one create, then its update
    (theirs,) = receiver.incidents
    assert store.get_ref("statuspage", INCIDENT["id"]) == theirs
    assert all(m.delivered_at is not None for m in store.outbox(include_delivered=True))


class _RecordsLost(SQLiteStore):
    """A real SQLite store that cannot record deliveries: the process dies before it writes them."""

    def delivered(self, msg_id: int, now: float) -> None:
        raise OSError("the process died before the delivery record")


def test_statuspage_attempt_whose_record_was_lost_is_checked_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create and an update go out, then the process dies before recording either: the next
    process finds its predecessor's attempt marks, asks Statuspage, and sends neither again."""
    monkeypatch.setenv("SP_KEY", SP_KEY)
    clock = FakeClock()
    receiver = StatuspageReceiver("pg1", SP_KEY, clock=clock)
    path = tmp_path / "lost.db"
    first = _RecordsLost(path)
    identified = {**INCIDENT, "public_status": "identified", "message": "Found it"}

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            cfg = _statuspage(base)
            d = dispatcher(first, clock, statuspage.channel(cfg, first))
            d.record_wait = 0.05
            first.enqueue("statuspage", "c", statuspage.create(cfg, INCIDENT), INCIDENT["id"], clock())
            await d.drain()
            # Statuspage knows the incident; the store never learnt that the create was delivered.
            first.enqueue("statuspage", "u", statuspage.update(cfg, identified), INCIDENT["id"], clock())
            await d.drain()
            assert [m for m, _, _ in receiver.log] == ["POST", "PATCH"]
            assert {m.key for m in first.outbox()} == {"c", "u"}  # both still pending in the store
            # The next process: fresh memory, the same store, the marks its predecessor left.
            store = SQLiteStore(path)
            d2 = dispatcher(store, clock, statuspage.channel(cfg, store))
            clock.advance(60)
            assert await d2.drain() == 2
            assert store.outbox() == []
            # A later update is new: it is sent without asking first.
            store.enqueue("statuspage", "u2", statuspage.update(cfg, INCIDENT), INCIDENT["id"], clock())
            assert await d2.drain() == 1

    run(scenario())
    assert [m for m, _, _ in receiver.log] == ["POST", "PATCH", "PATCH"]
    (theirs,) = receiver.incidents
    assert [u["body"] for u in receiver.updates[theirs]][1] == "Found it"


def test_statuspage_receiver_rate_limit_and_validation(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SP_KEY", SP_KEY)
    clock = FakeClock()
    receiver = StatuspageReceiver("pg1", SP_KEY, clock=clock, per_minute=2)

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            cfg = _statuspage(base)
            d = dispatcher(store, clock, statuspage.channel(cfg, store))
            for n in range(3):
                inc = {**INCIDENT, "id": f"INC-{n}"}
                store.enqueue("statuspage", f"c{n}", statuspage.create(cfg, inc), inc["id"], clock())
            bad = statuspage.create(cfg, {**INCIDENT, "id": "INC-bad"})
            bad["body"]["incident"]["impact_override"] = "catastrophic"
            store.enqueue("statuspage", "bad", bad, "INC-bad", clock())
            assert await d.drain() == 2
            limited = store.outbox()[0]
            assert limited.key == "c2" and "429" in limited.last_error
            assert limited.next_attempt_at == clock() + 61  # Retry-After from the receiver's window
            clock.advance(61)
            assert await d.drain() == 1

    run(scenario())
    assert len(receiver.incidents) == 3
    (bad,) = store.outbox()
    assert bad.dead and "impact_override" in bad.last_error


def test_statuspage_mapping() -> None:
    assert statuspage.impact("critical") == ("critical", "major_outage")
    assert statuspage.impact("critical", "degraded") == ("major", "partial_outage")
    assert statuspage.impact("moderate", "down") == ("major", "partial_outage")
    assert statuspage.impact("moderate") == ("minor", "degraded_performance")
    assert statuspage.impact("low", "down") == ("minor", "degraded_performance")
    cfg = Statuspage(page_id="p", api_key_env="K")
    body = statuspage.create(cfg, {**INCIDENT, "service": "unmapped"})["body"]["incident"]
    assert "components" not in body and "component_ids" not in body
    # Two incidents with the same words are two creates Statuspage (and the simulation's
    # exactly-once check) can tell apart: our id rides in the incident's metadata.
    again = statuspage.create(cfg, {**INCIDENT, "id": "INC-2", "service": "unmapped"})["body"]["incident"]
    assert body["metadata"] == {"continuity": {"incident_id": INCIDENT["id"]}}
    assert again["metadata"] == {"continuity": {"incident_id": "INC-2"}} and again != body
    assert not validate_statuspage({"incident": body}, creating=True)
    with pytest.raises(ValueError):
        statuspage.update(cfg, INCIDENT, "opened")


# ------------------------------------------------------------------------------------ email


def _email_cfg(port: int, cert: Path, **extra: Any) -> Email:
    return Email.model_validate(
        {
            "host": "127.0.0.1",
            "port": port,
            "from": "status@shop.example",
            "ca_file": str(cert),
            "to": {"internal": ["oncall@shop.example", "sre@shop.example"], "customers": ["c@x.example"]},
            **extra,
        }
    )


def test_email_over_starttls_with_login_and_stable_message_id(
    store: SQLiteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    recorder = Recorder(users={"bot": "pw-123"})
    monkeypatch.setenv("SMTP_USER", "bot")
    monkeypatch.setenv("SMTP_PASS", "pw-123")
    clock = FakeClock()

    async def scenario() -> None:
        async with smtp_server(recorder, cert, key) as port:
            cfg = _email_cfg(port, cert, username_env="SMTP_USER", password_env="SMTP_PASS")
            d = dispatcher(store, clock, mail.channel(cfg))
            store.enqueue(
                "email", "INC-1/opened/internal", mail.message(INCIDENT, "opened", "internal"), None, clock()
            )
            assert await d.drain() == 1

    run(scenario())
    (got,) = recorder.messages
    assert got["tls"] and got["login"] == "bot"
    assert got["rcpt_tos"] == ["oncall@shop.example", "sre@shop.example"]
    assert got["mail_from"] == "status@shop.example"
    msg = got["message"]
    assert msg["Message-ID"] == mail.message_id("INC-1/opened/internal", "status@shop.example")
    assert msg["Subject"].startswith("[CRITICAL] Incident: checkout")
    assert msg.get_content_type() == "multipart/alternative"
    html = msg.get_body(("html",)).get_content()
    assert "&lt;some&gt; customers &amp;" in html and "<some>" not in html
    assert "<some>" in msg.get_body(("plain",)).get_content()
    assert "pw-123" not in stored_text(store)


def test_email_smtp_replies_map_to_retry_or_dead(
    store: SQLiteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    recorder = Recorder()
    clock = FakeClock()

    async def scenario() -> None:
        async with smtp_server(recorder, cert, key) as port:
            d = dispatcher(store, clock, mail.channel(_email_cfg(port, cert)))
            recorder.reply = "451 4.3.0 try again later"
            store.enqueue("email", "a", mail.message(INCIDENT, "opened", "customers"), None, clock())
            assert await d.drain() == 0
            (msg,) = store.outbox()
            assert not msg.dead and "451" in msg.last_error
            recorder.reply = "554 5.7.1 rejected"
            clock.advance(60)
            assert await d.drain() == 0
            (msg,) = store.outbox()
            assert msg.dead and "554" in msg.last_error
            recorder.reply = None
            store.enqueue("email", "b", mail.message(INCIDENT, "resolved", "executives"), None, clock())
            assert await d.drain() == 0  # nobody configured for executives

    run(scenario())
    assert recorder.messages == []
    assert "no recipients" in {m.key: m for m in store.outbox()}["b"].last_error
    for code, kind in (
        (421, Transient),
        (450, Transient),
        (452, Transient),
        (499, Transient),
        (550, Permanent),
    ):
        assert isinstance(mail._classify(code, "x"), kind)


def test_email_refuses_a_server_without_starttls(store: SQLiteStore, tmp_path: Path) -> None:
    """A server that does not offer STARTTLS gets nothing, not a message in clear."""
    cert, _ = self_signed(tmp_path)
    got: list[bytes] = []

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 plain ESMTP\r\n")
        while line := await reader.readline():
            got.append(line)
            cmd = line[:4].upper()
            writer.write(b"250 plain\r\n" if cmd in (b"EHLO", b"HELO") else b"221 bye\r\n")
            await writer.drain()
            if cmd == b"QUIT":
                break
        writer.close()

    clock = FakeClock()

    async def scenario() -> None:
        server = await asyncio.start_server(plain, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            d = dispatcher(store, clock, mail.channel(_email_cfg(port, cert)))
            store.enqueue("email", "a", mail.message(INCIDENT, "opened", "internal"), None, clock())
            assert await d.drain() == 0

    run(scenario())
    (msg,) = store.outbox()
    assert msg.dead and "STARTTLS" in msg.last_error
    assert not any(line.upper().startswith((b"MAIL", b"DATA", b"AUTH")) for line in got)


# ------------------------------------------------------------------------------------ config, PagerDuty


def test_notifier_config_is_strict_and_keeps_secrets_out() -> None:
    n = Notifiers.model_validate(
        {
            "slack": {"webhook_url_env": "S"},
            "teams": {"webhook_url_env": "T"},
            "webhook": {"url": "https://hooks.example/x", "secret_env": "W"},
            "email": {"host": "smtp.example", "from": "a@b.example", "to": {"internal": ["x@y.example"]}},
            "statuspage": {"page_id": "p", "api_key_env": "K", "components": {"checkout": "c1"}},
        }
    )
    assert n.email is not None and n.email.port == 587 and n.email.starttls
    assert n.statuspage is not None and n.statuspage.rate_per_minute == 60
    for bad in (
        {"slack": {"webhook_url": "https://hooks.slack.com/services/x"}},  # a secret inline: unknown key
        {"email": {"host": "h", "from": "a@b.c", "username_env": "U"}},  # password missing
        {
            "email": {
                "host": "h",
                "from": "a@b.c",
                "username_env": "U",
                "password_env": "P",
                "starttls": False,
            }
        },
        {"email": {"host": "h", "from": "a@b.c", "to": {"board": []}}},
        {"webhook": {"url": "ftp://x", "secret_env": "W"}},
    ):
        with pytest.raises(ValidationError):
            Notifiers.model_validate(bad)


def test_pagerduty_request_channel_unchanged_and_paced(store: SQLiteStore) -> None:
    receiver = PagerDutyReceiver()
    clock = FakeClock()
    cfg = PagerDuty(routing_key_env="PD")

    async def scenario() -> None:
        async with serve(receiver.app()) as base:
            url = f"{base}/v2/enqueue"
            ch = Channel(
                "pagerduty",
                lambda p: (url, {"routing_key": "k" * 32, **p["body"]}),
                rate_per_minute=cfg.rate_per_minute,
            )
            d = dispatcher(store, clock, ch)
            for i in range(15):
                payload = pagerduty.trigger(
                    cfg,
                    dedup_key=f"d{i}",
                    summary="s",
                    severity="critical",
                    service="x",
                    tier="critical",
                    ts=0,
                    details={},
                )
                store.enqueue("pagerduty", f"k{i}", payload, None, clock())
            assert await d.drain() == 12  # burst: a tenth of 120 a minute
            clock.advance(1.5)
            assert await d.drain() == 3

    run(scenario())
    assert len(receiver.events) == 15 and receiver.rejected == []


def test_channel_needs_exactly_one_way_to_send() -> None:
    with pytest.raises(ValueError):
        Channel("x")
    send: Callable[[dict[str, Any], str], None] = lambda p, k: None  # noqa: E731
    with pytest.raises(ValueError):
        Channel("x", lambda p: ("u", {}), send=send)


def test_async_sender_runs_on_the_loop(store: SQLiteStore) -> None:
    seen: list[str] = []

    async def send(payload: dict[str, Any], key: str) -> None:
        seen.append(key)
        if key == "t":
            raise Transient("later", retry_after=7)

    clock = FakeClock()

    async def scenario() -> None:
        d = dispatcher(store, clock, Channel("a", send=send))
        store.enqueue("a", "ok", {}, None, clock())
        store.enqueue("a", "t", {}, None, clock())
        assert await d.drain() == 1

    run(scenario())
    assert seen == ["ok", "t"] and store.outbox()[0].next_attempt_at == clock() + 7
