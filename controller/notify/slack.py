"""Slack incoming webhooks with Block Kit: one message per incident event (opened, update, resolved).

The stored payload is exactly the JSON Slack gets; the webhook URL (the secret) is read from the
environment at send time. Limits (Slack's): header text at most 150 characters of plain_text,
section text at most 3,000, at most 10 fields of at most 2,000 each, at most 50 blocks; `text` is
the notification fallback and is always set.
"""

from __future__ import annotations

from typing import Any

from controller.config import Slack
from controller.notify.common import (
    EMOJI,
    RESOLVED_EMOJI,
    check_event,
    headline,
    human_time,
    next_update,
    public_status,
    secret,
)
from controller.notify.outbox import Channel

HEADER_MAX = 150
SECTION_MAX = 3000
FIELD_MAX = 2000


def escape(text: str) -> str:
    """mrkdwn treats &, < and > as control characters: escape what we did not write."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _date(ts: float) -> str:
    """Slack renders this in the reader's time zone; the text after | is the fallback."""
    return f"<!date^{int(ts)}^{{date_short_pretty}} {{time}}|{human_time(ts)}>"


def message(incident: dict[str, Any], event: str) -> dict[str, Any]:
    """The Block Kit message for an incident event: {"text": ..., "blocks": [...]}."""
    check_event(event)
    resolved = event == "resolved"
    emoji = RESOLVED_EMOJI if resolved else EMOJI.get(incident["severity"], ":white_circle:")
    status = public_status(incident, event)
    text = headline(incident, event)
    body = incident.get("message") or incident["title"]
    fields = [
        ("Severity", incident["severity"]),
        ("Status", status),
        ("Service", incident["service"]),
        ("Started", _date(incident["started_at"])),
    ]
    context = [f"Incident `{escape(incident['id'])}`"]
    upcoming = next_update(incident)
    if upcoming and not resolved:
        context.append(f"Next update: {escape(upcoming)}")
    return {
        "text": _cut(text, SECTION_MAX),
        "blocks": [
            {
                "type": "header",
                "text": {"type": "plain_text", "text": _cut(f"{emoji} {text}", HEADER_MAX), "emoji": True},
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _cut(escape(body), SECTION_MAX)},
                "fields": [
                    {
                        "type": "mrkdwn",
                        "text": _cut(f"*{name}*\n{value if name == 'Started' else escape(value)}", FIELD_MAX),
                    }
                    for name, value in fields
                ],
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]},
        ],
    }


def channel(cfg: Slack, name: str = "slack") -> Channel:
    def request(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return secret(cfg.webhook_url_env), payload

    return Channel(name, request=request, rate_per_minute=cfg.rate_per_minute)
