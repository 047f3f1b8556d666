"""A local PagerDuty Events API v2 receiver that validates payloads as PagerDuty does.

Used by `continuity demo` and the tests, so that what we send is checked against the real wire
format (REFERENCE.md): a bad event gets PagerDuty's 400 with its reasons, not silent acceptance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

SEVERITIES = {"critical", "error", "warning", "info"}
ACTIONS = {"trigger", "acknowledge", "resolve"}


def validate_event(body: Any) -> list[str]:
    errors: list[str] = []
    if not isinstance(body, dict):
        return ["Event object is invalid"]
    key = body.get("routing_key")
    if not isinstance(key, str) or len(key) != 32:
        errors.append("'routing_key' is invalid (expected 32 characters)")
    action = body.get("event_action")
    if action not in ACTIONS:
        errors.append("'event_action' is invalid (expected trigger, acknowledge or resolve)")
    dedup = body.get("dedup_key")
    if dedup is not None and (not isinstance(dedup, str) or len(dedup) > 255):
        errors.append("'dedup_key' is invalid (a string of at most 255 characters)")
    if action in ("acknowledge", "resolve"):
        if not dedup:
            errors.append("'dedup_key' is required for acknowledge and resolve")
        if "payload" in body:
            errors.append("'payload' is only for trigger events")
    if action == "trigger":
        payload = body.get("payload")
        if not isinstance(payload, dict):
            errors.append("'payload' is missing or invalid")
        else:
            summary = payload.get("summary")
            if not isinstance(summary, str) or not summary or len(summary) > 1024:
                errors.append("'payload.summary' is required (at most 1024 characters)")
            if not isinstance(payload.get("source"), str) or not payload.get("source"):
                errors.append("'payload.source' is required")
            if payload.get("severity") not in SEVERITIES:
                errors.append("'payload.severity' is invalid (critical, error, warning or info)")
            if "custom_details" in payload and not isinstance(payload["custom_details"], dict | list | str):
                errors.append("'payload.custom_details' is invalid")
    return errors


def validate_change(body: Any) -> list[str]:
    if not isinstance(body, dict):
        return ["Event object is invalid"]
    errors = []
    if not isinstance(body.get("routing_key"), str) or len(body["routing_key"]) != 32:
        errors.append("'routing_key' is invalid (expected 32 characters)")
    payload = body.get("payload")
    if not isinstance(payload, dict) or not payload.get("summary") or not payload.get("source"):
        errors.append("'payload.summary' and 'payload.source' are required")
    return errors


class PagerDutyReceiver:
    """Records accepted events; `fail_with` makes it answer an error status, to test retries."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.changes: list[dict[str, Any]] = []
        self.rejected: list[tuple[dict[str, Any], list[str]]] = []
        self.fail_with: int | None = None
        self.requests = 0
        self.on_event = on_event

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.post("/v2/enqueue", self.enqueue), web.post("/v2/change/enqueue", self.change)])
        return app

    async def _read(self, request: web.Request) -> Any:
        self.requests += 1
        try:
            return await request.json()
        except ValueError:
            return None

    async def enqueue(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        if self.fail_with is not None:
            return web.json_response(
                {"status": "error", "message": "injected failure"}, status=self.fail_with
            )
        errors = validate_event(body)
        if errors:
            self.rejected.append((body, errors))
            return web.json_response(
                {"status": "invalid event", "message": "Event object is invalid", "errors": errors},
                status=400,
            )
        self.events.append(body)
        if self.on_event:
            self.on_event(body)
        return web.json_response(
            {
                "status": "success",
                "message": "Event processed",
                "dedup_key": body.get("dedup_key") or "generated",
            },
            status=202,
        )

    async def change(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        if self.fail_with is not None:
            return web.json_response({"status": "error"}, status=self.fail_with)
        errors = validate_change(body)
        if errors:
            self.rejected.append((body, errors))
            return web.json_response({"status": "invalid event", "errors": errors}, status=400)
        self.changes.append(body)
        if self.on_event:
            self.on_event({"event_action": "change", **body})
        return web.json_response({"status": "success", "message": "Change event processed"}, status=202)
