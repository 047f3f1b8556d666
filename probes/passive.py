"""Passive probes: signals pushed to the controller instead of polled by it.

- `heartbeat`: a job POSTs /heartbeat/NAME after each run; silence longer than period + grace
  fails the probe. Heartbeats are kept in the store so a controller restart does not forget them.
- `alertmanager`: Prometheus alerts that SREs already have, received on POST /alertmanager
  (webhook payload version 4). While an alert matching the probe's labels is firing, the probe
  fails; when Alertmanager sends it resolved, the probe passes again.

Both go through the same detection as polled probes (thresholds, windows, flapping), so an
alert that flaps or a job that misses one beat never pages on its own.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.durations import format_duration
from probes.base import Check, ProbeResult, StepResult
from probes.models import (
    PASSIVE_KINDS as PASSIVE_KINDS,  # re-exported: the config models live in probes/models.py
)
from probes.models import AlertmanagerProbe, HeartbeatProbe


@dataclass
class Alert:
    fingerprint: str
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    received_at: float


@dataclass
class Signals:
    """What has been pushed: heartbeats by probe name, alerts by fingerprint."""

    started_at: float = field(default_factory=time.time)
    heartbeats: dict[str, float] = field(default_factory=dict)
    alerts: dict[str, Alert] = field(default_factory=dict)
    seen: dict[tuple[str, str, str], float] = field(default_factory=dict)
    """(fingerprint, startsAt, status) already applied -> when: Alertmanager retries, we stay
    idempotent. Bounded (oldest forgotten first): retries come within minutes, not days."""
    dropped: int = 0
    """New alerts refused because MAX_ALERTS were already kept (exported as a metric)."""


SEEN_MAX = 50_000
"""Applied-alert keys remembered for idempotency; a long-running feed must not grow memory forever."""
MAX_ALERTS = 5_000
"""Alerts kept at most (firing, or resolved within RESOLVED_KEEP). Beyond it a new alert is dropped
and counted, never stored: a flood of unique alerts cannot grow memory past the chart's limit."""
MAX_LABELS_CHARS = 4_096
"""Labels of one alert, names and values together, at most (Prometheus labels are short)."""
MAX_ANNOTATION_CHARS = 1_024
"""Annotation text kept per alert (only `summary` is shown); the rest is cut, not refused."""
MAX_FINGERPRINT = 128
RESOLVED_KEEP = 3600.0
"""Seconds a resolved alert is kept before it is forgotten (it no longer affects any probe)."""


class PayloadError(ValueError):
    """A payload that does not follow the wire format; the message says what and where."""


def _matches(matchers: dict[str, str], labels: dict[str, str]) -> bool:
    for name, want in matchers.items():
        got = labels.get(name)
        if got is None:
            return False
        if want.startswith("=~"):
            if re.fullmatch(want[2:], got) is None:
                return False
        elif got != want:
            return False
    return True


def _rfc3339(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PayloadError(f"{where}: expected an RFC 3339 time, found {value!r}")
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PayloadError(f"{where}: expected an RFC 3339 time, found {value!r}") from None
    return value


def apply_alertmanager(signals: Signals, payload: Any, now: float) -> tuple[int, int]:
    """Validate a version 4 webhook payload completely, then apply it. Returns (applied, duplicates).

    Nothing changes unless the whole payload is valid, so a malformed request is a 400 with its
    reason and never half an update.
    """
    if not isinstance(payload, dict):
        raise PayloadError("body: expected a JSON object (Alertmanager webhook payload)")
    if str(payload.get("version")) != "4":
        raise PayloadError(f'version: expected "4", found {payload.get("version")!r}')
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError(f"alerts: expected a list, found {type(alerts).__name__}")
    parsed: list[Alert] = []
    for i, a in enumerate(alerts):
        where = f"alerts[{i}]"
        if not isinstance(a, dict):
            raise PayloadError(f"{where}: expected an object")
        status = a.get("status")
        if status not in ("firing", "resolved"):
            raise PayloadError(f"{where}.status: expected firing or resolved, found {status!r}")
        labels = a.get("labels")
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise PayloadError(f"{where}.labels: expected an object of strings")
        if sum(len(k) + len(v) for k, v in labels.items()) > MAX_LABELS_CHARS:
            raise PayloadError(f"{where}.labels: expected at most {MAX_LABELS_CHARS} characters, found more")
        annotations = a.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise PayloadError(f"{where}.annotations: expected an object")
        fingerprint = a.get("fingerprint")
        if not isinstance(fingerprint, str) or not fingerprint or len(fingerprint) > MAX_FINGERPRINT:
            raise PayloadError(
                f"{where}.fingerprint: expected a non-empty string of at most {MAX_FINGERPRINT}"
            )
        starts = _rfc3339(a.get("startsAt"), f"{where}.startsAt")
        kept: dict[str, str] = {}
        room = MAX_ANNOTATION_CHARS
        for k, v in sorted(annotations.items(), key=lambda kv: kv[0] != "summary"):
            if room <= 0:
                break
            text = str(v)[:room]
            kept[str(k)[:64]] = text
            room -= len(text) + min(len(str(k)), 64)
        parsed.append(Alert(fingerprint, status, dict(labels), kept, starts, now))
    applied = dupes = 0
    _forget_resolved(signals, now)
    for alert in parsed:
        key = (alert.fingerprint, alert.starts_at, alert.status)
        if key in signals.seen:
            dupes += 1
            continue
        signals.seen[key] = now
        while len(signals.seen) > SEEN_MAX:
            del signals.seen[next(iter(signals.seen))]
        current = signals.alerts.get(alert.fingerprint)
        if alert.status == "resolved" and current is not None and current.starts_at != alert.starts_at:
            dupes += 1  # a resolve for an older firing of this alert: the newer one stands
            continue
        if current is None and len(signals.alerts) >= MAX_ALERTS:
            if alert.status == "resolved":
                dupes += 1  # a resolve for an alert we never kept changes nothing
                continue
            resolved = next((fp for fp, a in signals.alerts.items() if a.status == "resolved"), None)
            if resolved is None:
                signals.dropped += 1
                del signals.seen[key]  # not applied: Alertmanager's retry may land once there is room
                continue
            del signals.alerts[resolved]  # the oldest resolved alert makes room: it affects nothing
        signals.alerts[alert.fingerprint] = alert
        applied += 1
    _forget_resolved(signals, now)
    return applied, dupes


def _forget_resolved(signals: Signals, now: float) -> None:
    for fp in [
        fp
        for fp, a in signals.alerts.items()
        if a.status == "resolved" and now - a.received_at > RESOLVED_KEEP
    ]:
        del signals.alerts[fp]


def _result(name: str, ok: bool, check: Check, now: float, details: dict[str, Any]) -> ProbeResult:
    step = StepResult(name, ok, 0.0, (check,))
    return ProbeResult(name, ok, now, 0.0, (step,), details=details)


def evaluate(name: str, cfg: HeartbeatProbe | AlertmanagerProbe, signals: Signals, now: float) -> ProbeResult:
    if isinstance(cfg, HeartbeatProbe):
        last = signals.heartbeats.get(name)
        allowed = cfg.period + cfg.grace
        if last is None:
            waited = now - signals.started_at
            ok = waited <= allowed  # give a job one period after our start before calling it silent
            found = "no heartbeat yet" + ("" if ok else f" in {format_duration(waited)}")
            return _result(
                name,
                ok,
                Check("heartbeat", ok, f"within {format_duration(allowed)}", found),
                now,
                {"last_heartbeat": None},
            )
        age = now - last
        ok = age <= allowed
        check = Check(
            "heartbeat", ok, f"within {format_duration(allowed)}", f"last {format_duration(age)} ago"
        )
        return _result(name, ok, check, now, {"last_heartbeat": last, "age_seconds": age})
    firing = [a for a in signals.alerts.values() if a.status == "firing" and _matches(cfg.matchers, a.labels)]
    ok = not firing
    found = (
        "none firing"
        if ok
        else "; ".join(
            f"{a.labels.get('alertname', a.fingerprint)} firing since {a.starts_at}"
            + (f": {a.annotations['summary']}" if "summary" in a.annotations else "")
            for a in firing
        )
    )
    check = Check("alerts", ok, f"no firing alert matching {cfg.matchers}", found)
    return _result(name, ok, check, now, {"firing": [a.fingerprint for a in firing]})
