"""Approvals from Slack and two-way PagerDuty, against the controller's real HTTP server.

A local sender speaks Slack's interactivity wire format (form-encoded `payload=` JSON, the v0
signature headers) and PagerDuty's v3 webhooks (`X-PagerDuty-Signature: v1=...`), signing
correctly, wrongly, and late; the approval request itself is checked by the validating Slack
receiver, buttons included.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web

from controller.api import app
from controller.interactions import pagerduty_signature, slack_signature, verify_pagerduty, verify_slack
from controller.notify.receivers import serve, validate_slack
from tests.comms_env import cycle
from tests.console_env import feed, world

SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
PD_SECRET = "pd-webhook-signing-secret"


class ResponseUrl:
    """Slack's response_url: records the message updates it is sent."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        async def post(request: web.Request) -> web.Response:
            self.posts.append(await request.json())
            return web.Response(text="ok")

        a = web.Application()
        a.router.add_post("/actions/{rest:.*}", post)
        return a


def click(run_id: str, action: str, response_url: str, user: str = "U42") -> bytes:
    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": "alice.s", "name": "alice.s", "team_id": "T1"},
        "api_app_id": "A1",
        "container": {"type": "message", "message_ts": "1700000000.000100"},
        "trigger_id": "1.2.3",
        "response_url": response_url,
        "message": {"text": "Approval needed", "blocks": [{"type": "actions", "elements": []}]},
        "actions": [
            {
                "type": "button",
                "action_id": action,
                "block_id": f"approval:{run_id}",
                "value": run_id,
                "action_ts": "1700000001.000200",
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()


async def send_slack(
    base: str, body: bytes, *, secret: str = SLACK_SECRET, ts: float | None = None, headers: bool = True
) -> tuple[int, str]:
    stamp = str(int(time.time() if ts is None else ts))
    h = {"Content-Type": "application/x-www-form-urlencoded"}
    if headers:
        h |= {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": slack_signature(secret, stamp, body)}
    async with aiohttp.ClientSession() as s, s.post(f"{base}/slack/interactions", data=body, headers=h) as r:
        return r.status, await r.text()


SLACK_EXTRA = """
inbound:
  slack_signing_secret_env: CONSOLE_SLACK_SECRET
  slack_response_url_prefix: "http://127.0.0.1:"
  slack_users: {U42: alice}
"""


def test_slack_signature_rules_are_slacks() -> None:
    # Slack's documented example: secret, timestamp and body give this exact signature.
    body = (
        b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
        b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&"
        b"response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
        b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    sig = slack_signature(SLACK_SECRET, "1531420618", body)
    assert sig == "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    assert verify_slack(SLACK_SECRET, "1531420618", sig, body, now=1531420618 + 299) is None
    assert "replay" in (verify_slack(SLACK_SECRET, "1531420618", sig, body, now=1531420618 + 301) or "")
    assert (
        verify_slack(SLACK_SECRET, "1531420618", sig, body + b"x", now=1531420618)
        == "signature does not match"
    )
    assert verify_pagerduty(PD_SECRET, f"v1=00ff,{pagerduty_signature(PD_SECRET, b'{}')}", b"{}") is None
    assert verify_pagerduty(PD_SECRET, "v1=00ff", b"{}") == "no signature matches"


def test_approve_from_slack_signed_right_wrong_and_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSOLE_SLACK_SECRET", SLACK_SECRET)

    async def main() -> None:
        replies = ResponseUrl()
        async with world(tmp_path, monkeypatch, SLACK_EXTRA) as w, serve(app(w.ctrl)) as base:
            async with serve(replies.app()) as slack_api:
                await cycle(w.ctrl)  # the tick hook posts the approval request with its buttons
                asks = [m for m in w.slack.accepted if m["text"].startswith("Approval needed")]
                assert len(asks) == 1, [m["text"] for m in w.slack.accepted]
                ask = asks[0]
                assert validate_slack(ask) == (None, [])
                [actions] = [b for b in ask["blocks"] if b["type"] == "actions"]
                buttons = {e["action_id"]: e for e in actions["elements"]}
                assert buttons["continuity.approve"]["value"] == w.run.id
                assert buttons["continuity.approve"]["style"] == "primary"
                assert buttons["continuity.reject"]["style"] == "danger"
                assert "drain-primary" in ask["blocks"][1]["text"]["text"]  # the plan, with its guard
                assert "guard: probes UP: checkout-secondary" in ask["blocks"][1]["text"]["text"]
                await cycle(w.ctrl)
                assert len([m for m in w.slack.accepted if m["text"].startswith("Approval needed")]) == 1

                flag = f"approval:{w.run.id}"
                url = f"{slack_api}/actions/T1/1/abc"
                body = click(w.run.id, "continuity.approve", url)
                for kwargs, why in (
                    ({"secret": "not-the-secret"}, "signature does not match"),
                    ({"ts": time.time() - 301}, "refused as a replay"),
                    ({"ts": time.time() + 400}, "refused as a replay"),
                    ({"headers": False}, "missing X-Slack-Request-Timestamp"),
                ):
                    status, text = await send_slack(base, body, **kwargs)
                    assert status == 401 and why in text, (kwargs, status, text)
                    assert w.ctrl.store.get_flag(flag) is None
                # A body changed after signing is refused too.
                stamp = str(int(time.time()))
                async with aiohttp.ClientSession() as s:
                    r = await s.post(
                        f"{base}/slack/interactions",
                        data=click(w.run.id, "continuity.reject", url),
                        headers={
                            "X-Slack-Request-Timestamp": stamp,
                            "X-Slack-Signature": slack_signature(SLACK_SECRET, stamp, body),
                            "Content-Type": "application/x-www-form-urlencoded",
                        },
                    )
                    assert r.status == 401
                assert w.ctrl.store.get_flag(flag) is None

                # Signed right and on time (4 minutes old is still inside the window).
                status, _ = await send_slack(base, body, ts=time.time() - 240)
                assert status == 200
                assert w.ctrl.store.get_flag(flag) == "approved by alice via Slack (U42)"
                await cycle(w.ctrl)
                await cycle(w.ctrl)
                assert w.ctrl.store.get_run(w.run.id).state == "succeeded"  # type: ignore[union-attr]
                timeline = [e.message for e in w.ctrl.store.timeline(w.incident.id)]
                # The failover state's transition carries the answer and who gave it.
                said = f"run {w.run.id} approved by alice via Slack (U42); starting it"
                assert any(said in m for m in timeline), timeline
                # A second click (Reject) changes nothing and says why.
                status, _ = await send_slack(base, click(w.run.id, "continuity.reject", url))
                assert status == 200
                assert w.ctrl.store.get_flag(flag) == "approved by alice via Slack (U42)"
                for _ in range(50):
                    if len(replies.posts) >= 2:
                        break
                    await asyncio.sleep(0.05)
                assert replies.posts[0]["replace_original"] is True
                assert "approved by alice via Slack" in replies.posts[0]["text"]
                assert not [b for b in replies.posts[0]["blocks"] if b["type"] == "actions"]  # buttons gone
                assert (
                    "already answered" in replies.posts[1]["text"]
                    or "not awaiting" in replies.posts[1]["text"]
                )

    asyncio.run(main())


def test_slack_interactions_are_off_unless_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with world(tmp_path, monkeypatch) as w, serve(app(w.ctrl)) as base:
            status, _ = await send_slack(base, click(w.run.id, "continuity.approve", "http://x/"))
            assert status == 404
            await cycle(w.ctrl)
            assert not [m for m in w.slack.accepted if m["text"].startswith("Approval needed")]
        monkeypatch.delenv("CONSOLE_SLACK_SECRET", raising=False)
        async with world(tmp_path / "b", monkeypatch, SLACK_EXTRA) as w, serve(app(w.ctrl)) as base:
            status, text = await send_slack(base, click(w.run.id, "continuity.approve", "http://x/"))
            assert status == 503 and "CONSOLE_SLACK_SECRET is unset" in text
            assert w.ctrl.store.get_flag(f"approval:{w.run.id}") is None

    asyncio.run(main())


# ---------------------------------------------------------------- PagerDuty

PD_EXTRA = "inbound: {pagerduty_signing_secret_env: CONSOLE_PD_SECRET}\n"


def pd_event(kind: str, incident_key: str, agent: str = "Jane Oncall", event_id: str | None = None) -> bytes:
    return json.dumps(
        {
            "event": {
                "id": event_id or str(uuid.uuid4()),
                "event_type": kind,
                "resource_type": "incident",
                "occurred_at": "2026-09-21T14:20:00.000Z",
                "agent": {"id": "PLH1HKV", "summary": agent, "type": "user_reference"},
                "client": {"name": "PagerDuty"},
                "data": {
                    "id": "PGR0VU2",
                    "type": "incident",
                    "status": kind.rsplit(".", 1)[1],
                    "incident_key": incident_key,
                    "title": "checkout down",
                },
            }
        }
    ).encode()


async def send_pd(base: str, body: bytes, signature: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-PagerDuty-Signature"] = signature
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}/pagerduty/webhook", data=body, headers=headers) as r,
    ):
        return r.status, await r.json()


def test_pagerduty_acknowledge_and_resolve_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSOLE_PD_SECRET", PD_SECRET)

    async def main() -> None:
        async with world(tmp_path, monkeypatch, PD_EXTRA) as w, serve(app(w.ctrl)) as base:
            store, key = w.ctrl.store, w.incident.dedup_key
            ack = pd_event("incident.acknowledged", key, event_id="ev-ack-1")
            # Unsigned, wrongly signed: refused, nothing recorded.
            assert (await send_pd(base, ack, None))[0] == 401
            assert (await send_pd(base, ack, "v1=" + "0" * 64))[0] == 401
            assert (await send_pd(base, ack, pagerduty_signature("old-secret", ack)))[0] == 401
            assert not store.flags("comms:request:")
            # During a secret rotation two signatures come; one matching is enough.
            sig = f"{pagerduty_signature('old-secret', ack)}, {pagerduty_signature(PD_SECRET, ack)}"
            status, body = await send_pd(base, ack, sig)
            assert status == 200 and "acknowledged by Jane Oncall via PagerDuty" in body["result"]
            # PagerDuty retries: the same event is handled once.
            status, body = await send_pd(base, ack, sig)
            assert status == 200 and body["result"].startswith("duplicate")
            assert len(store.flags("comms:request:")) == 1
            await cycle(w.ctrl)
            inc = store.get_incident(w.incident.id)
            assert inc is not None and inc.data["comms"]["acked_by"] == "Jane Oncall via PagerDuty"

            # Resolved in PagerDuty while checkout still fails: stays open, and the timeline says why.
            res = pd_event("incident.resolved", key)
            status, body = await send_pd(base, res, pagerduty_signature(PD_SECRET, res))
            assert status == 200 and body["result"].startswith("not resolved: the probes disagree")
            await cycle(w.ctrl)
            assert store.get_incident(w.incident.id).status == "open"  # type: ignore[union-attr]
            said = [e.message for e in store.timeline(w.incident.id) if "resolved in PagerDuty" in e.message]
            assert said == [
                "resolved in PagerDuty by Jane Oncall, but our probes disagree (checkout is down: "
                "checkout-api: HTTP 503): the incident stays open here"
            ]

            # Once the probes pass, a resolve there resolves here, through the CLI's request.
            feed(w.ctrl, "checkout-api", True, w.clock, n=1)
            res2 = pd_event("incident.resolved", key)
            status, body = await send_pd(base, res2, pagerduty_signature(PD_SECRET, res2))
            assert status == 200 and "will be resolved" in body["result"], body
            [(_, request)] = [
                (n, json.loads(v)) for n, v in store.flags("comms:request:").items() if '"resolve"' in v
            ]
            assert request["by"] == "Jane Oncall via PagerDuty"
            await cycle(w.ctrl)
            assert store.get_incident(w.incident.id).status == "resolved"  # type: ignore[union-attr]

            # Events about incidents that are not ours, or other event types, are ignored.
            other = pd_event("incident.acknowledged", "someone-else/123")
            status, body = await send_pd(base, other, pagerduty_signature(PD_SECRET, other))
            assert status == 200 and body["result"].startswith("ignored")
            bad = b"{not json"
            assert (await send_pd(base, bad, pagerduty_signature(PD_SECRET, bad)))[0] == 400

    asyncio.run(main())
