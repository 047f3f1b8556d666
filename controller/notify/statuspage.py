"""Atlassian Statuspage REST API v1: create an incident on open, PATCH it on updates and resolution.

Statuspage names the incident itself (the create returns its id), and the outbox sends later, so:
the create and update payloads store OUR incident id; the create's sender remembers Statuspage's id
in the store (`channel_refs`); an update's sender looks it up, and if the create has not been
delivered yet the update waits (Transient "create not delivered yet") — it never creates a second
incident. If the create was refused (4xx), updates are refused too rather than waiting forever.
If the store cannot record the id after Statuspage's 201 (a full disk, a sick API server), the
channel keeps it in memory, answers Transient, and the retry records it without a second POST. Only
a crash between the 201 and the record would re-send the create on restart (the API has no
idempotency key); the create's `metadata` carries our incident id, so a human can spot that one.

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

    def send(payload: dict[str, Any], key: str) -> None:
        ours = payload["incident_id"]
        if ours in created:
            remember(ours, created[ours])  # created before; only its record was missing
        ref = store.get_ref(name, ours)
        data = json.dumps(payload["body"]).encode()
        if payload["op"] == "create":
            if ref is not None and ref != REFUSED:
                return  # already created (we crashed after the create was recorded): nothing to do
            try:
                resp = http_post(base, data, headers(), timeout)
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
        http_post(f"{base}/{ref}", data, headers(), timeout, method="PATCH")

    return Channel(name, send=send, timeout=timeout, rate_per_minute=cfg.rate_per_minute)
