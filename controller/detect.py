"""Detection: probe results -> probe health -> service health. Pure functions, no I/O.

Why each rule exists:
- Hysteresis: `failure_threshold` consecutive failures (or `F of the last N`) before anything
  happens, `success_threshold` consecutive successes to come back, so one blip never pages anyone
  and one lucky probe never declares an outage over.
- Suspect, then confirm: reaching the threshold only makes a probe SUSPECT; the controller
  re-probes at once in a short burst and only a burst that fails throughout makes it DOWN (as
  orchestrator re-reads the topology before acting). With a 20% random failure rate the chance of
  a false DOWN per probe slot is 0.2^3 x 0.2^5, about 2.6e-6, instead of 0.008.
- Degraded is its own verdict (latency over the SLO, a failing non-critical journey step, a
  certificate close to expiry): it opens a moderate incident and never starts a failover.
- Flapping: a probe that changes verdict more than N times in a window is marked flapping, and
  no playbook starts for it until it is stable.
- Quorum: with several vantage points a probe is DOWN only when enough fresh ones agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from probes.base import ProbeResult


class Health(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DEGRADED = "degraded"
    SUSPECT = "suspect"
    DOWN = "down"


BAD = (Health.DOWN,)
"""Verdicts counted as changes for flapping: into and out of DOWN."""


@dataclass(frozen=True)
class Rules:
    """The detection settings for one probe (defaults from the `detection` section)."""

    failure_threshold: int = 3
    success_threshold: int = 2
    window_failures: int | None = None
    window_size: int | None = None
    """With both set, `window_failures` of the last `window_size` results also make a probe SUSPECT."""
    confirm: bool = False
    """True: reaching the threshold makes the probe SUSPECT until a confirmation burst decides."""
    flap_changes: int = 4
    flap_window: float = 600.0


@dataclass(frozen=True)
class ProbeState:
    status: Health = Health.UNKNOWN
    failures: int = 0
    """Consecutive hard failures."""
    successes: int = 0
    """Consecutive passing results (a degraded result counts toward leaving DOWN, not toward UP)."""
    degraded: int = 0
    """Consecutive degraded results."""
    changed_at: float | None = None
    first_failure_at: float | None = None
    """Start of the current failing streak: our best estimate of when an outage began."""
    last: ProbeResult | None = None
    recent: tuple[bool, ...] = ()
    """Failure flags of the latest results (newest last), as long as the window needs."""
    changes: tuple[float, ...] = ()
    """When the verdict moved into or out of DOWN, within the flapping window."""


def outcome(result: ProbeResult) -> str:
    """ok | degraded | failed: a probe reports `details.degraded` when it works, but not well."""
    if result.ok:
        return "ok"
    return "degraded" if result.details.get("degraded") else "failed"


def _move(
    state: ProbeState, status: Health, at: float, rules: Rules
) -> tuple[float | None, tuple[float, ...]]:
    if status is state.status:
        return state.changed_at, state.changes
    changes = state.changes
    if (status in BAD) != (state.status in BAD) and state.status is not Health.UNKNOWN:
        changes = tuple(t for t in (*changes, at) if at - t <= rules.flap_window)
    return at, changes


def observe(
    state: ProbeState,
    result: ProbeResult,
    failure_threshold: int = 3,
    success_threshold: int = 2,
    rules: Rules | None = None,
) -> ProbeState:
    """Fold one result into a probe's state.

    A probe seen for the first time is UP on its first success (a restart must not hold the
    controller blind for `success_threshold` intervals) but needs the full failure streak to go DOWN.
    """
    r = rules or Rules(failure_threshold, success_threshold)
    at = result.started_at
    kind = outcome(result)
    keep = max(r.window_size or 0, 1)
    recent = (*state.recent, kind == "failed")[-keep:]
    status = state.status
    if kind == "ok":
        successes, failures, degraded = state.successes + 1, 0, 0
        if status in (Health.UNKNOWN, Health.SUSPECT):
            status = Health.UP  # a pass during suspicion: it was a chance run of failures
        elif status in (Health.DOWN, Health.DEGRADED) and successes >= r.success_threshold:
            status = Health.UP
    elif kind == "degraded":
        successes, failures, degraded = 0, 0, state.degraded + 1
        if status is Health.DOWN:
            if degraded >= r.success_threshold:
                status = Health.DEGRADED  # it answers again, just not well
        elif status in (Health.UNKNOWN, Health.UP, Health.SUSPECT) and degraded >= r.failure_threshold:
            status = Health.DEGRADED
    else:
        successes, failures, degraded = 0, state.failures + 1, 0
        windowed = (
            r.window_failures is not None
            and r.window_size is not None
            and sum(recent[-r.window_size :]) >= r.window_failures
        )
        if (failures >= r.failure_threshold or windowed) and status not in (Health.DOWN, Health.SUSPECT):
            status = Health.SUSPECT if r.confirm else Health.DOWN
    first = state.first_failure_at
    if kind == "failed" and first is None:
        first = at
    elif kind == "ok" and status is Health.UP:
        first = None  # a healthy probe forgets a short failing streak; a recovering one keeps its start
    changed_at, changes = _move(state, status, at, r)
    return ProbeState(status, failures, successes, degraded, changed_at, first, result, recent, changes)


def confirm(state: ProbeState, burst: list[ProbeResult], rules: Rules) -> ProbeState:
    """Decide a SUSPECT probe from a confirmation burst: DOWN only if every burst run failed."""
    if state.status is not Health.SUSPECT or not burst:
        return state
    last = burst[-1]
    if all(outcome(b) == "failed" for b in burst):
        changed_at, changes = _move(state, Health.DOWN, last.started_at, rules)
        return replace(
            state,
            status=Health.DOWN,
            failures=state.failures + len(burst),
            changed_at=changed_at,
            changes=changes,
            last=last,
        )
    # Not confirmed: back to UP and a fresh streak; the failures that made it suspect are forgiven.
    changed_at, changes = _move(state, Health.UP, last.started_at, rules)
    return replace(
        state,
        status=Health.UP,
        failures=0,
        successes=1,
        changed_at=changed_at,
        changes=changes,
        first_failure_at=None,
        last=last,
        recent=tuple(False for _ in state.recent),
    )


def flapping(state: ProbeState, now: float, rules: Rules) -> bool:
    return sum(1 for t in state.changes if now - t <= rules.flap_window) >= rules.flap_changes


def combine(states: Iterable[ProbeState], quorum: int, freshness: float, now: float) -> ProbeState:
    """One verdict from several vantage points: DOWN when at least `quorum` fresh ones say DOWN.

    A result older than `freshness` does not vote (an agent that went silent must not keep a
    target down, nor keep it up). Too few fresh vantage points to reach the quorum means not DOWN.
    """
    fresh = [s for s in states if s.last is not None and now - s.last.started_at <= freshness]
    if not fresh:
        return ProbeState()
    down = [s for s in fresh if s.status is Health.DOWN]
    if len(down) >= quorum:
        return min(down, key=lambda s: s.first_failure_at or now)
    for verdict in (Health.DEGRADED, Health.UP, Health.SUSPECT):
        same = [s for s in fresh if s.status is verdict]
        if same:
            return same[0]
    if down:  # some vantage points see it down, too few to agree: suspected, not declared
        return replace(down[0], status=Health.SUSPECT)
    return ProbeState()


_NEVER = ProbeState()
"""The state of a probe never observed (shared: ProbeState is frozen)."""


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
    flapping: tuple[str, ...] = ()
    """Probes changing verdict too often: no playbook starts while any is listed."""
    unsettled: tuple[str, ...] = ()
    """Probes SUSPECT or in a failing streak not yet past the threshold: an outage may be forming."""

    def summary(self) -> str:
        if not self.failing:
            return f"{self.service} is {self.state}"
        parts = [f"{p}: {r}" if r else p for p, r in self.reasons]
        return f"{self.service} is {self.state}: " + "; ".join(parts)


def service_health(
    service: str,
    probes: list[str],
    states: dict[str, ProbeState],
    impact: Mapping[str, str],
    flapping_probes: Iterable[str] = (),
) -> ServiceHealth:
    """DOWN when a probe whose impact is `down` is DOWN; DEGRADED when a probe is degraded, or an
    `impact: degraded` probe is DOWN. SUSPECT counts as up: the confirmation burst decides it."""

    seen = {p: states.get(p, _NEVER) for p in probes}
    status = {p: st.status for p, st in seen.items()}
    hard = [p for p in probes if status[p] is Health.DOWN and impact.get(p, "down") == "down"]
    soft = [
        p
        for p in probes
        if status[p] is Health.DEGRADED or (status[p] is Health.DOWN and impact.get(p, "down") != "down")
    ]
    known = [p for p in probes if status[p] is not Health.UNKNOWN]
    if hard:
        state, failing = ServiceState.DOWN, hard + soft
    elif soft:
        state, failing = ServiceState.DEGRADED, soft
    elif not known:
        state, failing = ServiceState.UNKNOWN, []
    else:
        state, failing = ServiceState.UP, []
    reasons = tuple((p, last.reason if (last := seen[p].last) else "") for p in failing)
    starts = [at for p in failing if (at := seen[p].first_failure_at) is not None]
    flapping_set = set(flapping_probes)
    flaps = tuple(p for p in probes if p in flapping_set)
    unsettled = tuple(
        p
        for p in probes
        if status[p] is Health.SUSPECT or (status[p] in (Health.UP, Health.UNKNOWN) and seen[p].failures > 0)
    )
    return ServiceHealth(
        service, state, tuple(failing), reasons, min(starts) if starts else None, flaps, unsettled
    )
