"""Atlassian Statuspage REST API v1: create an incident on open, PATCH it on updates and resolution.

Statuspage names the incident itself (the create returns its id), and the outbox sends later, so:
the create and update payloads store OUR incident id; the create's sender remembers Statuspage's id
in the store (`channel_refs`); an update's sender looks it up, and if the create has not been
delivered yet the update waits (Transient "create not delivered yet") — it never creates a second
incident. If the create was refused (4xx), updates are refused too rather than waiting forever.
If the store cannot record the id after Statuspage's 201 (a full disk, a sick API server), the
channel keeps it in memory, answers Transient, and the retry records it without a second POST.

Statuspage has no idempotency key, so an attempt whose outcome is unknown is checked, never blindly
repeated: before each POST or PATCH the channel records which message it is about to send
(`<name>:attempt`). Finding that mark for the same message again means an earlier attempt may have
landed (a timeout after the request went out, or a crash or leader change between the send and its
delivery record). Then it asks Statuspage first: a create is adopted if an unresolved incident
carries our id in its `metadata`; an update is taken as delivered if the incident's newest update
already says the same (body and status). Only the retry of an attempt pays that GET.

Severity and health -> Statuspage (documented in README "Notifications"):

    ours                         impact_override   component status
    critical, down               critical          major_outage
    critical, degraded           major             partial_outage
    moderate, down               major             partial_outage
    moderate, degraded           minor             degraded_performance
    low (either)                 minor             degraded_performance
    resolved                     (unchanged)       operational

`health` defaults to down for critical and degraded otherwise.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from controller.config import Statuspage
from controller.notify.common import check_event, public_status, secret
from controller.notify.outbox import Channel, Permanent, Transient, http_post
from controller.stores import Store

REFUSED = "!refused"
IMPACT = {
    ("critical", "down"): ("critical", "major_outage"),
    ("critical", "degraded"): ("major", "partial_outage"),
    ("moderate", "down"): ("major", "partial_outage"),
    ("moderate", "degraded"): ("minor", "degraded_performance"),
    ("low", "down"): ("minor", "degraded_performance"),
    ("low", "degraded"): ("minor", "degraded_performance"),
}


def impact(severity: str, health: str | None = None) -> tuple[str, str]:
    """(impact_override, component status) for an open incident."""
    health = health or ("down" if severity == "critical" else "degraded")
    return IMPACT[(severity, health)]


def _incident(cfg: Statuspage, incident: dict[str, Any], event: str) -> dict[str, Any]:
    status = public_status(incident, event)
    level, component_status = impact(incident["severity"], incident.get("health"))
    if status == "resolved":
        component_status = "operational"
    component = cfg.components.get(incident["service"])
    body: dict[str, Any] = {
        "status": status,
        "body": incident.get("message") or incident["title"],
    }
    if status != "resolved":
        body["impact_override"] = level
    if component:
        body["component_ids"] = [component]
        body["components"] = {component: component_status}
    return body


def create(cfg: Statuspage, incident: dict[str, Any]) -> dict[str, Any]:
    """The first message for an incident: POST /pages/{page_id}/incidents.

    The incident carries our id in Statuspage's `metadata` (namespace `continuity`): two incidents
    with the same text (a moderate incident reopened later) are two different Statuspage incidents,
    and whoever reads the page's API can tell which of ours each one is."""
    return {
        "op": "create",
        "incident_id": incident["id"],
        "body": {
            "incident": {
                "name": incident["title"],
                **_incident(cfg, incident, "opened"),
                "metadata": {"continuity": {"incident_id": incident["id"]}},
            }
        },
    }


def update(cfg: Statuspage, incident: dict[str, Any], event: str = "update") -> dict[str, Any]:
    """A later message (event update or resolved): PATCH /pages/{page_id}/incidents/{their id}."""
    check_event(event)
    if event == "opened":
        raise ValueError("use create() for the opening message")
    return {
        "op": "update",
        "incident_id": incident["id"],
        "body": {"incident": _incident(cfg, incident, event)},
    }


def channel(cfg: Statuspage, store: Store, name: str = "statuspage", timeout: float = 10.0) -> Channel:
    base = cfg.base_url.rstrip("/") + f"/pages/{cfg.page_id}/incidents"

    def headers() -> dict[str, str]:
        return {"Authorization": f"OAuth {secret(cfg.api_key_env)}", "Content-Type": "application/json"}

    created: dict[str, str] = {}
    """Statuspage's id for each of our incidents it created whose id the store has not recorded yet."""

    def remember(ours: str, theirs: str) -> None:
        created[ours] = theirs
        try:
            store.set_ref(name, ours, theirs)
        except Exception as exc:  # the store's trouble: the create stands, its record is retried
            raise Transient(f"created as {theirs}, but the store could not record it: {exc}") from None
        created.pop(ours, None)

    attempts = f"{name}:attempt"

    def get(url: str) -> Any:
        try:
            return http_post(url, b"", headers(), timeout, method="GET").json()
        except ValueError:
            raise Transient(f"GET {url} answered without JSON") from None

    def adopted(ours: str) -> str | None:
        """Statuspage's id of an unresolved incident our earlier attempt created, if one did."""
        found = get(f"{base}/unresolved")
        for inc in found if isinstance(found, list) else []:
            meta = inc.get("metadata") if isinstance(inc, dict) else None
            if isinstance(meta, dict) and (meta.get("continuity") or {}).get("incident_id") == ours:
                return str(inc["id"])
        return None

    def landed(ref: str, body: dict[str, Any]) -> bool:
        """Does the incident's newest update already say what this PATCH says?"""
        found = get(f"{base}/{ref}")
        updates = found.get("incident_updates") if isinstance(found, dict) else None
        if not isinstance(updates, list) or not updates or not isinstance(updates[0], dict):
            return False
        newest, ours = updates[0], body.get("incident") or {}
        return newest.get("body") == ours.get("body") and newest.get("status") == ours.get("status")

    def mark(ours: str, key: str) -> None:
        """Record the attempt before it goes out: a send the store cannot vouch for is not sent."""
        try:
            store.set_ref(attempts, ours, key)
        except Exception as exc:
            raise Transient(f"the store could not record the attempt: {exc}") from None

    def post(url: str, data: bytes, ours: str, method: str = "POST") -> Any:
        try:
            return http_post(url, data, headers(), timeout, method=method)
        except Transient as exc:
            if exc.status == 429:  # rate-limited: Statuspage did not take it, nothing to check later
                with contextlib.suppress(Exception):  # the store's trouble: the retry checks first
                    store.set_ref(attempts, ours, "")
            raise

    def send(payload: dict[str, Any], key: str) -> None:
        ours = payload["incident_id"]
        if ours in created:
            remember(ours, created[ours])  # created before; only its record was missing
        ref = store.get_ref(name, ours)
        data = json.dumps(payload["body"]).encode()
        retried = store.get_ref(attempts, ours) == key  # an earlier attempt of this very message
        if payload["op"] == "create":
            if ref is not None and ref != REFUSED:
                return  # already created (we crashed after the create was recorded): nothing to do
            if retried and (theirs := adopted(ours)) is not None:
                remember(ours, theirs)
                return
            mark(ours, key)
            try:
                resp = post(base, data, ours)
            except Permanent:
                store.set_ref(name, ours, REFUSED)
                raise
            try:
                theirs = resp.json()["id"]
            except (ValueError, KeyError, TypeError):
                # It may well exist now: re-sending could open a second one. A human decides.
                store.set_ref(name, ours, REFUSED)
                raise Permanent(f"create answered without an incident id: {resp.text[:200]}") from None
            remember(ours, str(theirs))
            return
        if ref is None:
            raise Transient("create not delivered yet")
        if ref == REFUSED:
            raise Permanent("the incident's create was refused by Statuspage: nothing to update")
        if retried and landed(ref, payload["body"]):
            return  # the earlier attempt landed; its delivery record is what was lost
        mark(ours, key)
        post(f"{base}/{ref}", data, ours, method="PATCH")

    return Channel(name, send=send, timeout=timeout, rate_per_minute=cfg.rate_per_minute)
