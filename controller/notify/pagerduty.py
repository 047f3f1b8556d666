"""PagerDuty Events API v2: trigger on open, re-trigger on severity change, acknowledge when a human
takes it, resolve on the end.

The dedup_key is stored with the incident, so a restarted controller can still resolve the alert
it opened. The routing key is a secret: it is added at send time and never written to the store.
"""

from __future__ import annotations

import time
from typing import Any

from controller.config import PagerDuty
from controller.notify.outbox import Channel
from controller.stores.model import Incident

SEVERITY = {"critical": "critical", "moderate": "error", "low": "warning"}
"""Ours -> PagerDuty's (critical, error, warning, info)."""


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def trigger(
    cfg: PagerDuty,
    *,
    dedup_key: str,
    summary: str,
    severity: str,
    service: str,
    tier: str,
    ts: float,
    details: dict[str, Any],
) -> dict[str, Any]:
    return {
        "kind": "event",
        "body": {
            "event_action": "trigger",
            "dedup_key": dedup_key,
            "payload": {
                "summary": summary[:1024],
                "source": cfg.source,
                "severity": SEVERITY[severity],
                "timestamp": _iso(ts),
                "component": service,
                "group": tier,
                "class": "availability",
                "custom_details": details,
            },
            "client": "Continuity",
        },
    }


def page(
    cfg: PagerDuty, inc: Incident, *, tier: str, ts: float, details: dict[str, Any], note: str = ""
) -> dict[str, Any]:
    """The trigger for an incident (its first page, a re-page, an escalation): one dedup key per
    incident, so that PagerDuty folds every page of an outage into one alert."""
    return trigger(
        cfg,
        dedup_key=inc.dedup_key,
        summary=f"[{inc.severity}] {note + ': ' if note else ''}{inc.title}",
        severity=inc.severity,
        service=inc.service,
        tier=tier,
        ts=ts,
        details=details,
    )


def resolve(dedup_key: str) -> dict[str, Any]:
    return {"kind": "event", "body": {"event_action": "resolve", "dedup_key": dedup_key}}


def acknowledge(dedup_key: str) -> dict[str, Any]:
    """A human has it: PagerDuty stops escalating. Same dedup_key as the trigger (stored with the
    incident), so a restarted controller acknowledges the alert its predecessor opened."""
    return {"kind": "event", "body": {"event_action": "acknowledge", "dedup_key": dedup_key}}


def change(cfg: PagerDuty, *, summary: str, ts: float, details: dict[str, Any]) -> dict[str, Any]:
    """A change event (`/v2/change/enqueue`): 'traffic moved to the secondary' belongs on the service's
    timeline in PagerDuty, not as another alert."""
    return {
        "kind": "change",
        "body": {
            "payload": {
                "summary": summary[:1024],
                "timestamp": _iso(ts),
                "source": cfg.source,
                "custom_details": details,
            }
        },
    }


def url_for(cfg: PagerDuty, kind: str) -> str:
    if kind == "change":
        return cfg.events_url.replace("/v2/enqueue", "/v2/change/enqueue")
    return cfg.events_url


def channel(cfg: PagerDuty, routing_key: str) -> Channel:
    """The outbox channel, built like every other notifier's; the routing key is read once, when the
    controller starts or reloads, so that a missing secret refuses the config before any change."""
    return Channel(
        "pagerduty",
        lambda p: (
            url_for(cfg, p["kind"]),
            {"routing_key": routing_key, **p["body"]},
        ),
        rate_per_minute=cfg.rate_per_minute,
    )
