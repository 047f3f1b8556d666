"""Local receivers that validate the real wire formats: Slack, Teams, signed webhooks, Statuspage.

Like `controller/demo/pagerduty.py`, they answer as the real services do (status codes and bodies),
so that what Continuity sends is checked, not just accepted. Each records what it accepted and
rejected; `fail_with` (an HTTP status) and `retry_after` inject failures for tests and the demo.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from controller.notify import teams as teams_fmt
from controller.notify.webhook import EVENT, IDEMPOTENCY, SIGNATURE, TIMESTAMP, verify


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run an aiohttp app on 127.0.0.1 on a free port; yield its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class _Receiver:
    def __init__(self) -> None:
        self.accepted: list[Any] = []
        self.rejected: list[tuple[Any, list[str]]] = []
        self.requests = 0
        self.fail_with: int | None = None
        self.retry_after: int | None = None
        """With fail_with=429: the Retry-After (seconds) to answer."""

    def _injected(self, body: str) -> web.Response | None:
        if self.fail_with is None:
            return None
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return web.Response(status=self.fail_with, text=body, headers=headers)


# ---------------------------------------------------------------------------------------- Slack

TEXT_TYPES = {"plain_text", "mrkdwn"}
BLOCK_KEYS = {
    "header": {"type", "text", "block_id"},
    "section": {"type", "text", "fields", "accessory", "block_id"},
    "context": {"type", "elements", "block_id"},
    "divider": {"type", "block_id"},
    "actions": {"type", "elements", "block_id"},
}
BUTTON_KEYS = {"type", "text", "action_id", "value", "style", "url", "confirm", "accessibility_label"}
CONFIRM_KEYS = {"title", "text", "confirm", "deny", "style"}


def _button(el: Any, where: str) -> list[str]:
    """Slack's button element: plain_text text of at most 75, action_id at most 255 (unique in the
    block), value at most 2,000, style primary or danger, an optional confirm dialog."""
    if not isinstance(el, dict) or el.get("type") != "button":
        return [f"{where}: only button elements are checked here, found {el!r:.60}"]
    errors = []
    if set(el) - BUTTON_KEYS:
        errors.append(f"{where}: unknown keys {sorted(set(el) - BUTTON_KEYS)}")
    errors += _text_object(el.get("text"), f"{where}.text", 75, {"plain_text"})
    if not isinstance(el.get("action_id"), str) or not 0 < len(el["action_id"]) <= 255:
        errors.append(f"{where}.action_id: 1 to 255 characters")
    if "value" in el and (not isinstance(el["value"], str) or len(el["value"]) > 2000):
        errors.append(f"{where}.value: at most 2000 characters")
    if "style" in el and el["style"] not in ("primary", "danger"):
        errors.append(f"{where}.style: primary or danger")
    if "confirm" in el:
        c = el["confirm"]
        if (
            not isinstance(c, dict)
            or set(c) - CONFIRM_KEYS
            or not {"title", "text", "confirm", "deny"} <= set(c)
        ):
            errors.append(f"{where}.confirm: needs title, text, confirm and deny")
        else:
            errors += _text_object(c["title"], f"{where}.confirm.title", 100, {"plain_text"})
            errors += _text_object(c["text"], f"{where}.confirm.text", 300)
            errors += _text_object(c["confirm"], f"{where}.confirm.confirm", 30, {"plain_text"})
            errors += _text_object(c["deny"], f"{where}.confirm.deny", 30, {"plain_text"})
    return errors


def _text_object(obj: Any, where: str, limit: int, types: set[str] = TEXT_TYPES) -> list[str]:
    if not isinstance(obj, dict) or obj.get("type") not in types:
        return [f"{where}: must be a text object of type {sorted(types)}"]
    errors = []
    if set(obj) - {"type", "text", "emoji", "verbatim"}:
        errors.append(f"{where}: unknown keys {sorted(set(obj) - {'type', 'text', 'emoji', 'verbatim'})}")
    if "emoji" in obj and obj["type"] != "plain_text":
        errors.append(f"{where}: emoji is only for plain_text")
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        errors.append(f"{where}.text: must be a non-empty string")
    elif len(text) > limit:
        errors.append(f"{where}.text: must be at most {limit} characters, found {len(text)}")
    return errors


def validate_slack(body: Any) -> tuple[str | None, list[str]]:
    """(Slack's error code or None, reasons)."""
    if not isinstance(body, dict):
        return "invalid_payload", ["body must be a JSON object"]
    if not isinstance(body.get("text"), str) or not body["text"].strip():
        return "no_text", ["text is required (the notification fallback)"]
    blocks = body.get("blocks", [])
    errors: list[str] = []
    if not isinstance(blocks, list) or len(blocks) > 50:
        return "invalid_blocks", ["blocks must be a list of at most 50"]
    for i, block in enumerate(blocks):
        where = f"blocks[{i}]"
        if not isinstance(block, dict) or block.get("type") not in BLOCK_KEYS:
            errors.append(f"{where}: unknown block type")
            continue
        kind = block["type"]
        if set(block) - BLOCK_KEYS[kind]:
            errors.append(f"{where}: unknown keys {sorted(set(block) - BLOCK_KEYS[kind])}")
        if "block_id" in block and (not isinstance(block["block_id"], str) or len(block["block_id"]) > 255):
            errors.append(f"{where}.block_id: at most 255 characters")
        if kind == "header":
            errors += _text_object(block.get("text"), f"{where}.text", 150, {"plain_text"})
        elif kind == "section":
            if "text" not in block and "fields" not in block:
                errors.append(f"{where}: needs text or fields")
            if "text" in block:
                errors += _text_object(block["text"], f"{where}.text", 3000)
            if "fields" in block:
                fields = block["fields"]
                if not isinstance(fields, list) or not 1 <= len(fields) <= 10:
                    errors.append(f"{where}.fields: 1 to 10 text objects")
                else:
                    for j, field in enumerate(fields):
                        errors += _text_object(field, f"{where}.fields[{j}]", 2000)
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= 25:
                errors.append(f"{where}.elements: 1 to 25 elements")
            else:
                ids = [el.get("action_id") for el in elements if isinstance(el, dict)]
                if len(ids) != len(set(ids)):
                    errors.append(f"{where}.elements: action_id must be unique in the block")
                for j, el in enumerate(elements):
                    errors += _button(el, f"{where}.elements[{j}]")
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= 10:
                errors.append(f"{where}.elements: 1 to 10 elements")
            else:
                for j, el in enumerate(elements):
                    errors += _text_object(el, f"{where}.elements[{j}]", 3000)
    return ("invalid_blocks" if errors else None), errors


class SlackReceiver(_Receiver):
    """POST /services/<token>: answers 200 "ok", 400 invalid_blocks/no_text, 404 no_service, 429."""

    def __init__(self, token: str = "T000/B000/XXXX") -> None:
        super().__init__()
        self.token = token

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.post("/services/{token:.+}", self.post)])
        return app

    async def post(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.match_info["token"] != self.token:
            return web.Response(status=404, text="no_service")
        injected = self._injected("rate_limited" if self.fail_with == 429 else "injected")
        if injected:
            return injected
        try:
            body = await request.json()
        except ValueError:
            body = None
        code, errors = validate_slack(body)
        if code:
            self.rejected.append((body, errors))
            return web.Response(status=400, text=code)
        self.accepted.append(body)
        return web.Response(text="ok")


# ---------------------------------------------------------------------------------------- Teams

CARD_ELEMENTS = {
    "TextBlock",
    "FactSet",
    "ColumnSet",
    "Container",
    "Image",
    "ActionSet",
    "RichTextBlock",
    "Table",
}


def validate_teams(body: Any) -> list[str]:
    if not isinstance(body, dict) or body.get("type") != "message":
        return ["type must be 'message'"]
    attachments = body.get("attachments")
    if not isinstance(attachments, list) or not attachments:
        return ["attachments must be a non-empty list"]
    errors: list[str] = []
    for i, att in enumerate(attachments):
        where = f"attachments[{i}]"
        if not isinstance(att, dict) or att.get("contentType") != teams_fmt.CONTENT_TYPE:
            errors.append(f"{where}.contentType must be {teams_fmt.CONTENT_TYPE}")
            continue
        card = att.get("content")
        if not isinstance(card, dict) or card.get("type") != "AdaptiveCard":
            errors.append(f"{where}.content.type must be AdaptiveCard")
            continue
        if not isinstance(card.get("version"), str):
            errors.append(f"{where}.content.version is required")
        elements = card.get("body")
        if not isinstance(elements, list) or not elements:
            errors.append(f"{where}.content.body must be a non-empty list")
            continue
        for j, el in enumerate(elements):
            ew = f"{where}.content.body[{j}]"
            if not isinstance(el, dict) or el.get("type") not in CARD_ELEMENTS:
                errors.append(
                    f"{ew}: unknown element type {el.get('type') if isinstance(el, dict) else el!r}"
                )
            elif el["type"] == "TextBlock" and not isinstance(el.get("text"), str):
                errors.append(f"{ew}.text must be a string")
            elif el["type"] == "FactSet":
                facts = el.get("facts")
                if not isinstance(facts, list) or not all(
                    isinstance(f, dict)
                    and isinstance(f.get("title"), str)
                    and isinstance(f.get("value"), str)
                    for f in facts
                ):
                    errors.append(f"{ew}.facts must be a list of {{title, value}} strings")
    return errors


class TeamsReceiver(_Receiver):
    """POST /workflows/<id>: 202 on a valid Adaptive Card message, 400 with the reasons otherwise."""

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.post("/workflows/{flow}", self.post)])
        return app

    async def post(self, request: web.Request) -> web.Response:
        self.requests += 1
        injected = self._injected("injected")
        if injected:
            return injected
        try:
            body = await request.json()
        except ValueError:
            body = None
        errors = validate_teams(body)
        if errors:
            self.rejected.append((body, errors))
            return web.json_response(
                {"error": {"code": "BadRequest", "message": "; ".join(errors)}}, status=400
            )
        self.accepted.append(body)
        return web.Response(status=202)


# ---------------------------------------------------------------------------------------- Webhook


class WebhookReceiver(_Receiver):
    """POST /hook: verifies the signature (401 if wrong or stale), drops duplicate Idempotency-Keys."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.secret = secret
        self.clock = clock
        self.seen: set[str] = set()
        self.duplicates = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.post("/hook", self.post)])
        return app

    async def post(self, request: web.Request) -> web.Response:
        self.requests += 1
        injected = self._injected("injected")
        if injected:
            return injected
        raw = await request.read()
        ok = verify(
            self.secret,
            request.headers.get(TIMESTAMP, ""),
            raw,
            request.headers.get(SIGNATURE, ""),
            now=self.clock(),
        )
        if not ok:
            self.rejected.append((raw, ["bad or stale signature"]))
            return web.json_response({"error": "invalid signature"}, status=401)
        key = request.headers.get(IDEMPOTENCY, "")
        if not key:
            return web.json_response({"error": "Idempotency-Key required"}, status=400)
        if key in self.seen:
            self.duplicates += 1
            return web.json_response({"status": "duplicate"})
        self.seen.add(key)
        self.accepted.append({"event": request.headers.get(EVENT), "key": key, "body": await request.json()})
        return web.json_response({"status": "ok"})


# ---------------------------------------------------------------------------------------- Statuspage

INCIDENT_STATUSES = {"investigating", "identified", "monitoring", "resolved"}
IMPACTS = {"none", "minor", "major", "critical"}
COMPONENT_STATUSES = {
    "operational",
    "degraded_performance",
    "partial_outage",
    "major_outage",
    "under_maintenance",
}
INCIDENT_KEYS = {
    "name",
    "status",
    "body",
    "impact_override",
    "component_ids",
    "components",
    "deliver_notifications",
    "metadata",
}


def validate_statuspage(body: Any, creating: bool) -> list[str]:
    if not isinstance(body, dict) or not isinstance(body.get("incident"), dict) or set(body) != {"incident"}:
        return ['body must be {"incident": {...}}']
    inc = body["incident"]
    errors: list[str] = []
    if set(inc) - INCIDENT_KEYS:
        errors.append(f"unknown incident keys {sorted(set(inc) - INCIDENT_KEYS)}")
    if creating and (not isinstance(inc.get("name"), str) or not inc["name"]):
        errors.append("incident.name is required")
    if "status" in inc and inc["status"] not in INCIDENT_STATUSES:
        errors.append(f"incident.status must be one of {sorted(INCIDENT_STATUSES)}")
    if "impact_override" in inc and inc["impact_override"] not in IMPACTS:
        errors.append(f"incident.impact_override must be one of {sorted(IMPACTS)}")
    if "body" in inc and not isinstance(inc["body"], str):
        errors.append("incident.body must be a string")
    ids = inc.get("component_ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        errors.append("incident.component_ids must be a list of strings")
    meta = inc.get("metadata", {})
    if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
        errors.append('incident.metadata must map a namespace to an object ({"jira": {"issue_id": ...}})')
    comps = inc.get("components", {})
    if not isinstance(comps, dict) or not all(v in COMPONENT_STATUSES for v in comps.values()):
        errors.append(f"incident.components values must be one of {sorted(COMPONENT_STATUSES)}")
    return errors


class StatuspageReceiver(_Receiver):
    """/v1/pages/{page_id}/incidents[/{id}]: OAuth key, shape and enums checked; 60 requests a minute."""

    def __init__(
        self, page_id: str, api_key: str, clock: Callable[[], float] = time.monotonic, per_minute: int = 60
    ) -> None:
        super().__init__()
        self.page_id = page_id
        self.api_key = api_key
        self.clock = clock
        self.per_minute = per_minute
        self.window: deque[float] = deque()
        self.incidents: dict[str, dict[str, Any]] = {}
        self.updates: dict[str, list[dict[str, Any]]] = {}
        """Each incident's updates as GET shows them: newest first, body and status."""
        self.log: list[tuple[str, str, dict[str, Any]]] = []
        """(method, incident id, incident body) in the order accepted."""
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/pages/{page}/incidents", self.create),
                web.get("/v1/pages/{page}/incidents/unresolved", self.unresolved),
                web.get("/v1/pages/{page}/incidents/{incident}", self.get),
                web.patch("/v1/pages/{page}/incidents/{incident}", self.update),
            ]
        )
        return app

    def _gate(self, request: web.Request, incident: bool = False) -> web.Response | None:
        """Statuspage's refusals, in its order: rate limit, key, page, then (for a path naming one)
        the incident."""
        self.requests += 1
        now = self.clock()
        while self.window and self.window[0] <= now - 60:
            self.window.popleft()
        if len(self.window) >= self.per_minute:
            wait = int(self.window[0] + 60 - now) + 1
            return web.json_response(
                {"error": "Rate limit exceeded"}, status=429, headers={"Retry-After": str(wait)}
            )
        self.window.append(now)
        injected = self._injected('{"error": "injected"}')
        if injected:
            return injected
        if request.headers.get("Authorization") != f"OAuth {self.api_key}":
            return web.json_response({"error": "Could not authenticate"}, status=401)
        if request.match_info["page"] != self.page_id:
            return web.json_response({"error": "Page not found"}, status=404)
        if incident and request.match_info["incident"] not in self.incidents:
            return web.json_response({"error": "Incident not found"}, status=404)
        return None

    async def _body(self, request: web.Request, creating: bool) -> tuple[Any, web.Response | None]:
        try:
            body = await request.json()
        except ValueError:
            return None, web.json_response({"error": "invalid JSON"}, status=400)
        errors = validate_statuspage(body, creating)
        if errors:
            self.rejected.append((body, errors))
            return body, web.json_response({"error": errors}, status=422)
        return body, None

    async def create(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused:
            return refused
        body, refused = await self._body(request, creating=True)
        if refused:
            return refused
        inc = dict(body["incident"])
        inc["id"] = f"sp{next(self._ids):04d}"
        inc.setdefault("status", "investigating")
        self.incidents[inc["id"]] = inc
        self._updated(inc["id"], body["incident"])
        self.log.append(("POST", inc["id"], body["incident"]))
        return web.json_response(self._shown(inc["id"]), status=201)

    def _updated(self, iid: str, change: dict[str, Any]) -> None:
        """A create or PATCH with a body is an incident update subscribers see (newest first)."""
        if "body" in change:
            status = change.get("status", self.incidents[iid].get("status"))
            self.updates.setdefault(iid, []).insert(0, {"body": change["body"], "status": status})

    def _shown(self, iid: str) -> dict[str, Any]:
        return {**self.incidents[iid], "incident_updates": list(self.updates.get(iid, []))}

    async def get(self, request: web.Request) -> web.Response:
        refused = self._gate(request, incident=True)
        if refused:
            return refused
        return web.json_response(self._shown(request.match_info["incident"]))

    async def unresolved(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused:
            return refused
        return web.json_response(
            [self._shown(i) for i, inc in self.incidents.items() if inc.get("status") != "resolved"]
        )

    async def update(self, request: web.Request) -> web.Response:
        refused = self._gate(request, incident=True)
        if refused:
            return refused
        iid = request.match_info["incident"]
        body, refused = await self._body(request, creating=False)
        if refused:
            return refused
        self.incidents[iid].update(body["incident"])
        self._updated(iid, body["incident"])
        self.log.append(("PATCH", iid, body["incident"]))
        return web.json_response(self._shown(iid))
