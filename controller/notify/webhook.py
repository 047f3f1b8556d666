"""Generic webhooks, signed with HMAC-SHA256 so the receiver knows the event is ours and fresh.

Wire format (POST, `Content-Type: application/json`):

    X-Continuity-Event: incident.opened | incident.update | incident.resolved
    X-Continuity-Timestamp: 1732420000                (when this attempt was sent, epoch seconds)
    X-Continuity-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>
    Idempotency-Key: <the outbox key: the same on every retry of one event>

    {"event": "incident.opened", "occurred_at": "...Z", "incident": {...}}

The signature covers the timestamp, so a captured request cannot be replayed after the tolerance
window; a retry is re-signed with a new timestamp but keeps its Idempotency-Key, so the receiver
can drop duplicates. Receivers: copy `verify` below.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from controller.config import Webhook
from controller.notify.common import check_event, iso, next_update, public_status, secret
from controller.notify.outbox import Channel, http_post

SIGNATURE = "X-Continuity-Signature"
TIMESTAMP = "X-Continuity-Timestamp"
EVENT = "X-Continuity-Event"
IDEMPOTENCY = "Idempotency-Key"


def event(incident: dict[str, Any], kind: str, now: float) -> dict[str, Any]:
    """The stored payload: the JSON body, without any signature (that is made at send time)."""
    check_event(kind)
    return {
        "event": f"incident.{kind}",
        "occurred_at": iso(now),
        "incident": {
            "id": incident["id"],
            "service": incident["service"],
            "severity": incident["severity"],
            "status": "resolved" if kind == "resolved" else incident.get("status", "open"),
            "public_status": public_status(incident, kind),
            "title": incident["title"],
            "started_at": iso(incident["started_at"]),
            "message": incident.get("message"),
            "next_update": next_update(incident),
        },
    }


def sign(secret_value: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret_value.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """True if `signature` is ours for this exact body and the timestamp is within the window.

    Copy this into a receiver: compare in constant time, and refuse stale (or far-future)
    timestamps so a captured request cannot be replayed later.
    """
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected.encode(), (signature or "").encode())


def channel(cfg: Webhook, name: str = "webhook", clock: Callable[[], float] = time.time) -> Channel:
    def send(payload: dict[str, Any], key: str) -> None:
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        timestamp = str(int(clock()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Continuity",
            EVENT: payload["event"],
            TIMESTAMP: timestamp,
            SIGNATURE: sign(secret(cfg.secret_env), timestamp, body),
            IDEMPOTENCY: key,
        }
        http_post(cfg.url, body, headers, cfg.timeout)

    return Channel(name, send=send, timeout=cfg.timeout, rate_per_minute=cfg.rate_per_minute)
