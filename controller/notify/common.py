"""What every channel's builder shares: the incident-like dict it takes, events, times, secrets.

A builder takes a plain dict so the caller (the incident lifecycle) decides what to say:
`id`, `service`, `severity` (critical | moderate | low), `status` (open | resolved), `title`,
`started_at` (epoch seconds), and optionally `public_status` (investigating | identified |
monitoring | resolved), `message` (the human update), `eta` (the next update: epoch seconds or
text), `health` (down | degraded, for Statuspage's component status).
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

Event = Literal["opened", "update", "resolved"]
EVENTS: tuple[str, ...] = ("opened", "update", "resolved")

EMOJI = {"critical": ":red_circle:", "moderate": ":large_orange_circle:", "low": ":large_yellow_circle:"}
RESOLVED_EMOJI = ":large_green_circle:"
PUBLIC_STATUSES = ("investigating", "identified", "monitoring", "resolved")


def check_event(event: str) -> None:
    if event not in EVENTS:
        raise ValueError(f"event must be one of {EVENTS}, not {event!r}")


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def human_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def public_status(incident: dict[str, Any], event: str) -> str:
    """Statuspage's vocabulary: resolved when we say so, else what the caller chose, else investigating."""
    if event == "resolved" or incident.get("status") == "resolved":
        return "resolved"
    status = incident.get("public_status") or "investigating"
    if status not in PUBLIC_STATUSES:
        raise ValueError(f"public_status must be one of {PUBLIC_STATUSES}, not {status!r}")
    return str(status)


def next_update(incident: dict[str, Any]) -> str | None:
    eta = incident.get("eta")
    if eta is None or eta == "":
        return None
    if isinstance(eta, int | float):
        return human_time(float(eta))
    return str(eta)


def headline(incident: dict[str, Any], event: str) -> str:
    prefix = {"opened": "Incident", "update": "Update", "resolved": "Resolved"}[event]
    title, service = str(incident["title"]), str(incident["service"])
    if title.startswith(f"{service} "):  # "checkout down: ..." already names it: say it once
        return f"{prefix}: {title}"
    return f"{prefix}: {service} — {title}"


def secret(env_name: str) -> str:
    """Read a secret at send time; unset is a configuration problem retrying will not fix... until
    someone sets it, so the caller treats it as Transient (the message waits, it is not lost)."""
    value = os.environ.get(env_name)
    if not value:
        from controller.notify.outbox import Transient

        raise Transient(f"environment variable {env_name} is unset")
    return value
