"""Detection: probe results -> probe health -> service health. Pure functions, no I/O.

Hysteresis is per probe: `failure_threshold` consecutive failures to go DOWN and
`success_threshold` consecutive successes to come back UP, so a single blip never pages anyone
and a single lucky probe never declares an outage over.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from probes.base import ProbeResult


class Health(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class ProbeState:
    status: Health = Health.UNKNOWN
    failures: int = 0
    successes: int = 0
    changed_at: float | None = None
    first_failure_at: float | None = None
    """Start of the current failing streak: our best estimate of when an outage began."""
    last: ProbeResult | None = None


def observe(
    state: ProbeState, result: ProbeResult, failure_threshold: int, success_threshold: int
) -> ProbeState:
    """Fold one result into a probe's state.

    A probe seen for the first time is UP on its first success (a restart must not hold the
    controller blind for `success_threshold` intervals) but needs the full failure streak to go DOWN.
    """
    at = result.started_at
    if result.ok:
        successes = state.successes + 1
        status = state.status
        if status is Health.UNKNOWN or (status is Health.DOWN and successes >= success_threshold):
            status = Health.UP
        # A recovering probe keeps its outage start; a healthy one forgets a short failing streak.
        first = state.first_failure_at if status is Health.DOWN else None
        return ProbeState(
            status, 0, successes, at if status is not state.status else state.changed_at, first, result
        )
    failures = state.failures + 1
    status = Health.DOWN if failures >= failure_threshold else state.status
    first = state.first_failure_at if state.first_failure_at is not None else at
    return ProbeState(
        status, failures, 0, at if status is not state.status else state.changed_at, first, result
    )


class ServiceState(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"


SERVICE_STATE_VALUE = {
    ServiceState.UP: 0,
    ServiceState.DEGRADED: 1,
    ServiceState.DOWN: 2,
    ServiceState.UNKNOWN: -1,
}


@dataclass(frozen=True)
class ServiceHealth:
    service: str
    state: ServiceState
    failing: tuple[str, ...] = ()
    reasons: tuple[tuple[str, str], ...] = ()
    """(probe, reason) for each failing probe, from its latest result."""
    since: float | None = None
    """When the earliest failing probe started failing."""

    def summary(self) -> str:
        if not self.failing:
            return f"{self.service} is {self.state}"
        parts = [f"{p}: {r}" if r else p for p, r in self.reasons]
        return f"{self.service} is {self.state}: " + "; ".join(parts)


def service_health(
    service: str, probes: list[str], states: dict[str, ProbeState], impact: dict[str, str]
) -> ServiceHealth:
    """A service is DOWN when any probe whose impact is `down` is DOWN; DEGRADED for `degraded` probes."""
    down = [p for p in probes if states.get(p, ProbeState()).status is Health.DOWN]
    known = [p for p in probes if states.get(p, ProbeState()).status is not Health.UNKNOWN]
    hard = [p for p in down if impact.get(p, "down") == "down"]
    if hard:
        state = ServiceState.DOWN
    elif down:
        state = ServiceState.DEGRADED
    elif not known:
        state = ServiceState.UNKNOWN
    else:
        state = ServiceState.UP
    reasons = tuple((p, states[p].last.reason if states[p].last else "") for p in down)
    starts = [states[p].first_failure_at for p in down if states[p].first_failure_at is not None]
    return ServiceHealth(service, state, tuple(down), reasons, min(starts) if starts else None)
