"""Microsoft Teams incoming webhook (Workflows): an Adaptive Card 1.4 in a `message` envelope.

The stored payload is exactly what Teams gets; the webhook URL (the secret) is read from the
environment at send time.
"""

from __future__ import annotations

from typing import Any

from controller.config import Teams
from controller.notify.common import check_event, headline, human_time, next_update, public_status, secret
from controller.notify.outbox import Channel

CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
COLOR = {"critical": "Attention", "moderate": "Warning", "low": "Accent"}


def message(incident: dict[str, Any], event: str) -> dict[str, Any]:
    check_event(event)
    resolved = event == "resolved"
    facts = [
        {"title": "Severity", "value": incident["severity"]},
        {"title": "Status", "value": public_status(incident, event)},
        {"title": "Service", "value": incident["service"]},
        {"title": "Started", "value": human_time(incident["started_at"])},
        {"title": "Incident", "value": incident["id"]},
    ]
    upcoming = next_update(incident)
    if upcoming and not resolved:
        facts.append({"title": "Next update", "value": upcoming})
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": headline(incident, event),
            "size": "Large",
            "weight": "Bolder",
            "wrap": True,
            "color": "Good" if resolved else COLOR.get(incident["severity"], "Default"),
        },
        {"type": "TextBlock", "text": incident.get("message") or incident["title"], "wrap": True},
        {"type": "FactSet", "facts": facts},
    ]
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": CONTENT_TYPE,
                "contentUrl": None,
                "content": {"type": "AdaptiveCard", "$schema": SCHEMA, "version": "1.4", "body": body},
            }
        ],
    }


def channel(cfg: Teams, name: str = "teams") -> Channel:
    def request(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return secret(cfg.webhook_url_env), payload

    return Channel(name, request=request, rate_per_minute=cfg.rate_per_minute)
