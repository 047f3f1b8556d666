"""Two-way integrations: responders act where they already are.

- **Slack**: an approval request is posted to Slack with Approve and Reject buttons (Block Kit
  `actions`); Slack posts the click to `POST /slack/interactions`, which verifies Slack's v0
  signature (HMAC-SHA256 with the app's signing secret over `v0:{timestamp}:{raw body}`, at most
  5 minutes old, compared in constant time) BEFORE reading the body, then answers the run exactly as
  `continuity approve|reject` would, recording who clicked.
- **PagerDuty**: a v3 webhook subscription posts to `POST /pagerduty/webhook`, verified by
  `X-PagerDuty-Signature` (`v1=<hex>` of HMAC-SHA256 over the raw body; several during a secret
  rotation, any match). `incident.acknowledged` acknowledges the incident here;
  `incident.resolved` resolves it here only if the probes agree, and otherwise says so on the
  timeline. Events are handled once (PagerDuty retries; the event id is remembered).

Nothing here acts directly: each door writes the same durable request as the CLI, which the
controller applies in its next cycle. Both doors are off unless their signing secret is configured
(`inbound.*_signing_secret_env`), and refuse everything when the variable is unset.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import aiohttp
import structlog
from aiohttp import web

from controller import commands
from controller.commands import CommandError
from controller.comms import commands as comms_commands
from controller.detect import ServiceState
from controller.notify.slack import escape

if TYPE_CHECKING:
    from controller.loop import Controller

log = structlog.get_logger("continuity.interactions")

REPLAY_WINDOW = 300.0
"""Slack's advice: refuse a request whose timestamp is more than five minutes from now."""
APPROVE, REJECT = "continuity.approve", "continuity.reject"


# ---------------------------------------------------------------- signatures (pure)


def slack_signature(secret: str, timestamp: str, body: bytes) -> str:
    base = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def verify_slack(
    secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float
) -> str | None:
    """None when the request is Slack's; else why not. Checked before the body is parsed."""
    if not timestamp or not signature:
        return "missing X-Slack-Request-Timestamp or X-Slack-Signature"
    try:
        ts = int(timestamp)
    except ValueError:
        return "X-Slack-Request-Timestamp is not a Unix time"
    if abs(now - ts) > REPLAY_WINDOW:
        skew = int(now - ts)
        return f"request timestamp is {skew}s from now (more than {int(REPLAY_WINDOW)}s): refused as a replay"
    if not hmac.compare_digest(signature.encode(), slack_signature(secret, timestamp, body).encode()):
        return "signature does not match"
    return None


def pagerduty_signature(secret: str, body: bytes) -> str:
    return "v1=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_pagerduty(secret: str, header: str | None, body: bytes) -> str | None:
    """None when any `v1=` signature in the header matches (several during a secret rotation)."""
    if not header:
        return "missing X-PagerDuty-Signature"
    want = pagerduty_signature(secret, body).encode()
    matched = False
    for part in header.split(","):
        matched |= hmac.compare_digest(part.strip().encode(), want)  # check every one: no early exit
    return None if matched else "no signature matches"


# ---------------------------------------------------------------- the Slack approval message (pure)


def approval_message(
    run_id: str, playbook: str, incident: dict[str, Any] | None, plan: str
) -> dict[str, Any]:
    """Block Kit: what will run, and two buttons whose value is the run id."""
    where = f"{incident['service']} ({incident['id']})" if incident else "a manual run"
    text = f"Approval needed: {playbook} for {where}"
    plan_text = plan if len(plan) <= 2800 else plan[:2799] + "…"
    return {
        "text": text,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": text[:150], "emoji": True}},
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": f"Run `{escape(run_id)}` waits for a human. The plan:\n```{escape(plan_text)}```",
                },
            },
            {
                "type": "actions",
                "block_id": f"approval:{run_id}"[:255],
                "elements": [
                    {
                        "type": "button",
                        "action_id": APPROVE,
                        "text": {"type": "plain_text", "text": "Approve"},
                        "style": "primary",
                        "value": run_id,
                        "confirm": {
                            "title": {"type": "plain_text", "text": "Start the failover?"},
                            "text": {
                                "type": "mrkdwn",
                                "text": f"{escape(playbook)} starts in the next cycle.",
                            },
                            "confirm": {"type": "plain_text", "text": "Approve"},
                            "deny": {"type": "plain_text", "text": "Cancel"},
                        },
                    },
                    {
                        "type": "button",
                        "action_id": REJECT,
                        "text": {"type": "plain_text", "text": "Reject"},
                        "style": "danger",
                        "value": run_id,
                    },
                ],
            },
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"or `continuity approve {escape(run_id)}` / `reject {escape(run_id)}`",
                    }
                ],
            },
        ],
    }


def answered_message(original: dict[str, Any] | None, text: str) -> dict[str, Any]:
    """The approval message with its buttons replaced by who answered (for `response_url`)."""
    blocks = [b for b in (original or {}).get("blocks", []) if b.get("type") != "actions"]
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": escape(text)}]})
    return {"replace_original": True, "text": text, "blocks": blocks}


# ---------------------------------------------------------------- PagerDuty decisions (pure)


def probes_agree(controller: Controller, service: str) -> tuple[bool, str]:
    """Does our own view say the service is up? Unknown is not up."""
    health = controller.detection.health().get(service)
    if health is None:
        return False, f"{service} has no health yet"
    if health.state is not ServiceState.UP:
        return False, health.summary()
    if health.unsettled:
        return False, f"{', '.join(health.unsettled)} still failing or unconfirmed"
    return True, f"{service} is up: all probes pass"


# ---------------------------------------------------------------- wiring


def install(app: web.Application, controller: Controller) -> None:
    """Mount the inbound doors and the tick hook that posts approval requests with buttons."""
    settings = controller.config.inbound
    store = controller.store

    def secret(env: str | None) -> str:
        return os.environ.get(env, "") if env else ""

    def queue_approval_requests(now: float) -> bool:
        """Blocking (on the STORE pool): queue a message per awaiting run; True when one was queued."""
        from playbooks.engine import render_plan

        queued = False
        for run in store.runs():
            if run.state != "awaiting_approval" or run.playbook not in controller.config.playbooks:
                continue
            inc = store.get_incident(run.incident_id) if run.incident_id else None
            plan = render_plan(run.playbook, controller.config.playbooks[run.playbook])
            payload = approval_message(run.id, run.playbook, inc.to_dict() if inc else None, plan)
            key = f"{run.incident_id or 'manual'}/slack/approval/{run.id}"
            if store.enqueue("slack", key, payload, run.incident_id, now):
                if run.incident_id:
                    store.append(
                        run.incident_id, now, "notification", f"slack approval request for {run.id} queued"
                    )
                queued = True
        return queued

    async def post_approval_requests(now: float) -> None:
        """Each awaiting run gets one Slack message with buttons (the outbox key makes it once, also
        across restarts); only when the interactions endpoint can verify the answer. The store's
        calls run on the STORE pool, never on the loop."""
        if not settings.slack_signing_secret_env or "slack" not in controller.dispatcher.channels:
            return
        try:
            if await controller.astore.call(queue_approval_requests, now):
                controller.dispatcher.wake.set()
        except Exception:  # a sick store: the next tick asks again (keys make it once)
            log.exception("could not queue Slack approval requests")

    controller.tick_hooks.append(post_approval_requests)

    async def slack_interactions(request: web.Request) -> web.Response:
        if not settings.slack_signing_secret_env:
            return web.json_response({"error": "Slack interactions are not enabled"}, status=404)
        key = secret(settings.slack_signing_secret_env)
        if not key:
            return web.json_response({"error": f"{settings.slack_signing_secret_env} is unset"}, status=503)
        raw = await request.read()
        problem = verify_slack(
            key,
            request.headers.get("X-Slack-Request-Timestamp"),
            request.headers.get("X-Slack-Signature"),
            raw,
            time.time(),
        )
        if problem is not None:
            log.warning("slack interaction refused", reason=problem, peer=request.remote)
            return web.json_response({"error": problem}, status=401)
        try:
            payload = json.loads(parse_qs(raw.decode())["payload"][0])
            action = payload["actions"][0]
            action_id, run_id = str(action["action_id"]), str(action["value"])
            user = payload.get("user") or {}
        except (KeyError, IndexError, ValueError, TypeError):
            return web.json_response({"error": "expected a block_actions payload"}, status=400)
        if action_id not in (APPROVE, REJECT):
            return web.Response(status=200)
        uid = str(user.get("id", ""))
        name = settings.slack_users.get(uid) or str(
            user.get("username") or user.get("name") or uid or "someone"
        )
        who = f"{name} via Slack ({uid})" if uid else f"{name} via Slack"
        try:
            if action_id == APPROVE:
                text = await controller.astore.call(commands.approve, store, run_id, who)
            else:
                text = await controller.astore.call(commands.reject, store, run_id, who, "rejected in Slack")
            controller.kick()
        except CommandError as exc:
            text = str(exc)
        log.info("slack interaction", action=action_id, run=run_id, by=who, result=text)
        url = str(payload.get("response_url") or "")
        if url and url.startswith(settings.slack_response_url_prefix):
            task = asyncio.create_task(_respond(url, answered_message(payload.get("message"), text)))
            _background.add(task)
            task.add_done_callback(_background.discard)
        return web.Response(status=200)

    async def pagerduty_webhook(request: web.Request) -> web.Response:
        if not settings.pagerduty_signing_secret_env:
            return web.json_response({"error": "PagerDuty webhooks are not enabled"}, status=404)
        key = secret(settings.pagerduty_signing_secret_env)
        if not key:
            return web.json_response(
                {"error": f"{settings.pagerduty_signing_secret_env} is unset"}, status=503
            )
        raw = await request.read()
        problem = verify_pagerduty(key, request.headers.get("X-PagerDuty-Signature"), raw)
        if problem is not None:
            log.warning("pagerduty webhook refused", reason=problem, peer=request.remote)
            return web.json_response({"error": problem}, status=401)
        try:
            event = json.loads(raw)["event"]
            event_id, kind, data = str(event["id"]), str(event["event_type"]), event.get("data") or {}
        except (KeyError, ValueError, TypeError):
            return web.json_response(
                {"error": "expected a v3 webhook payload: {event: {id, event_type, data}}"}, status=400
            )
        seen = f"pagerduty:event:{event_id}"
        if await controller.astore.get_flag(seen) is not None:
            return web.json_response({"result": "duplicate: already handled"})
        result = await _pagerduty_event(controller, kind, data, event.get("agent") or {})
        await controller.astore.set_flag(seen, str(time.time()))
        return web.json_response({"result": result})

    app.add_routes(
        [
            web.post("/slack/interactions", slack_interactions),
            web.post("/pagerduty/webhook", pagerduty_webhook),
        ]
    )


_background: set[asyncio.Task[None]] = set()


async def _respond(url: str, body: dict[str, Any]) -> None:
    """Update the Slack message through its response_url; a failure only loses the cosmetic update."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.post(url, json=body) as resp:
                await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("slack response_url update failed", error=str(exc))


async def _pagerduty_event(
    controller: Controller, kind: str, data: dict[str, Any], agent: dict[str, Any]
) -> str:
    """Acknowledge or resolve our incident as PagerDuty says (a resolve only if our probes agree).
    Store calls are awaited on the STORE pool; the commands only queue a request for the
    communicator's next cycle."""
    if kind not in ("incident.acknowledged", "incident.resolved"):
        return f"ignored: {kind}"
    key = str(data.get("incident_key") or "")
    store = controller.store
    opened = await controller.astore.list_incidents(status="open", limit=10_000)
    inc = next((i for i in opened if i.dedup_key == key), None)
    if inc is None:
        return "ignored: no open incident of ours with that incident_key"
    who = f"{agent.get('summary') or 'someone'} via PagerDuty"
    now = controller.clock()
    if kind == "incident.acknowledged":
        text = await controller.astore.call(comms_commands.ack, store, inc.id, who)
        controller.kick()
        return text
    agree, why = probes_agree(controller, inc.service)
    if agree:
        text = await controller.astore.call(
            comms_commands.resolve,
            store,
            inc.id,
            who,
            f"resolved in PagerDuty by {who.removesuffix(' via PagerDuty')}",
        )
        controller.kick()
        return text
    store.append(
        inc.id,
        now,
        "comms",
        f"resolved in PagerDuty by {who.removesuffix(' via PagerDuty')}, but our probes disagree ({why}): "
        "the incident stays open here",
        {"by": who, "source": "pagerduty", "pagerduty_incident": data.get("id")},
    )
    return f"not resolved: the probes disagree ({why})"


__all__: list[str] = [
    "approval_message",
    "install",
    "pagerduty_signature",
    "slack_signature",
    "verify_pagerduty",
    "verify_slack",
]
