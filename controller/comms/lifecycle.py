"""Pure rules of incident communication: public status, update cadence, ETA, escalation.

No I/O and no clock: every function takes `now`, so the rules are tested in simulated time and
the Communicator (which does the I/O) stays a thin shell around them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from controller.comms.settings import Cadence

PUBLIC_STATUSES: tuple[str, ...] = ("investigating", "identified", "monitoring", "resolved")

STATUS_WORDS = {
    "investigating": "We are looking into the problem.",
    "identified": "We have found the cause and are fixing it.",
    "monitoring": "A fix is in place and we are watching to make sure it holds.",
    "resolved": "The problem is fixed.",
}
"""What each public status means, in words a customer reads without a glossary."""


def advance(current: str, proposed: str) -> str:
    """Automatic transitions only move forward: a playbook finishing never undoes a human's
    'monitoring', and the machine never re-opens a status a human has moved past."""
    if PUBLIC_STATUSES.index(proposed) > PUBLIC_STATUSES.index(current):
        return proposed
    return current


def cadence_for(severity: str, cadence: Cadence) -> float:
    return float(getattr(cadence, severity, cadence.moderate))


def next_update_at(severity: str, last_update_at: float, cadence: Cadence) -> float:
    """When the next public update is due: the last one plus the severity's interval."""
    return last_update_at + cadence_for(severity, cadence)


def update_due(severity: str, last_update_at: float, now: float, cadence: Cadence) -> bool:
    return now >= next_update_at(severity, last_update_at, cadence)


@dataclass(frozen=True)
class StepView:
    """One step of the playbook run in hand, as the ETA needs it."""

    name: str
    state: str  # pending | running | done | failed | skipped
    expected: float  # seconds: measured from past runs, else the step's timeout
    started_at: float | None = None


def measured(history: Iterable[tuple[str, float | None, float | None]]) -> dict[str, float]:
    """Median duration by step name from past runs' (name, started, ended); steps never
    finished are ignored. Measured beats the configured timeout, which is a worst case."""
    seen: dict[str, list[float]] = {}
    for name, started, ended in history:
        if started is not None and ended is not None and ended >= started:
            seen.setdefault(name, []).append(ended - started)
    return {name: statistics.median(values) for name, values in seen.items()}


def remaining(steps: Iterable[StepView], now: float) -> float | None:
    """Seconds of plan left: pending steps in full, the running one less what it has used.
    None when there is no plan left (nothing pending or running)."""
    left = 0.0
    any_left = False
    for s in steps:
        if s.state == "pending":
            left += s.expected
            any_left = True
        elif s.state == "running":
            used = now - s.started_at if s.started_at is not None else 0.0
            left += max(s.expected - used, 0.0)
            any_left = True
    return left if any_left else None


def estimate_eta(
    remaining_s: float | None, rto: float, started_at: float, now: float
) -> tuple[float | None, str]:
    """(ETA epoch seconds rounded up to the minute, basis). With a plan in hand: now plus what it
    has left. Without one: the RTO's deadline while it is still ahead; past it, unknown (a
    promise we already broke is not an estimate)."""
    if remaining_s is not None:
        return _minute(now + remaining_s), "playbook"
    deadline = started_at + rto
    if deadline > now:
        return _minute(deadline), "rto"
    return None, "unknown"


def _minute(ts: float) -> float:
    return float(math.ceil(ts / 60.0) * 60)


def eta_moved(old: float | None, new: float | None) -> bool:
    """An update says 'the ETA moved' when a previous estimate changes by a minute or more, or
    is withdrawn. A first estimate is news, not a move."""
    if old is None:
        return False
    if new is None:
        return True
    return abs(new - old) >= 60.0


def escalation_level(
    severity: str, acknowledged: bool, opened_at: float, now: float, delay: float, contacts: int, level: int
) -> int:
    """How far down the escalation list an incident should be by now. Only critical incidents
    escalate, only while nobody has acknowledged, one contact per `delay`, never past the list."""
    if severity != "critical" or acknowledged or contacts == 0:
        return level
    due = min(int((now - opened_at) // delay), contacts)
    return max(level, due)
