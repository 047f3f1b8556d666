"""Detection: probe results -> probe health -> service health. Pure functions, no I/O.

Why each rule exists:
- Hysteresis: `failure_threshold` consecutive failures (or `F of the last N`) before anything
  happens, `success_threshold` consecutive successes to come back, so one blip never pages anyone
  and one lucky probe never declares an outage over.
- Suspect, then confirm (`judge`): the first sign of trouble (a failed run, or a run still in
  flight at its next slot) starts a burst of tries, and the tries count: DOWN takes
  `failure_threshold + confirm.probes` failed runs in a row, scheduled or tried, spanning at least
  `confirm.span` (as orchestrator re-reads the topology before acting, with the tries overlapping so
  a hang costs one timeout, not a queue of them). With a 20% random failure rate the chance of a
  false DOWN per streak is 0.2^8, about 2.6e-6, instead of 0.008.
- Beyond the target's own chance (`prior_rate`, `needed`): the streak must also be a less than
  `confirm_epsilon` chance at the target's own failure rate over its last runs before the streak
  (upper end of a Wilson interval), so a flaky journey gets a DEGRADED verdict, not a failover; the
  burst keeps trying until the streak is that long (or a try passes).
- A confirmed outage is not flakiness (`ProbeState.outages`): the runs of a solid confirmed DOWN
  period (every run failed until the passes that ended it) count neither in that prior nor in the
  intermittent rate, so a second outage soon after the first is confirmed as fast as the first, and
  a recovered outage does not read as "failed 92% of runs". A DOWN period with passes inside it is
  a flaky target's and stays in: a false DOWN never hides the flakiness that caused it.
- A thin history is not a clean one: with fewer than PRIOR_MIN_RUNS runs (a restarted controller)
  the prior is the documented bound, 35% of requests failing (73% of a three-step journey's runs),
  so a restart never makes a flaky journey's 10-failure streak an outage; the burst gathers the
  longer streak (14 runs for one request, 44 for three) in seconds of tries instead.
- Degraded is its own verdict (latency over the SLO, a failing non-critical journey step, a
  certificate close to expiry): it opens a moderate incident and never starts a failover.
- Flapping: a probe that changes verdict more than N times in a window is marked flapping, and
  no playbook starts for it until it is stable.
- Quorum: with several vantage points a probe is DOWN only when enough fresh ones agree.
- Unknown is not up: a service is UP only when every probe of it is known and fresh, and an
  incident resolves only when every probe has also passed `success_threshold` times since its last
  failure (`ServiceHealth.unproven` lists those that have not). A restart mid-outage therefore
  keeps the incident open until each probe has spoken again, and proved it.
- Intermittent failure: a probe that is not DOWN but failed at least `intermittent.rate` of its
  runs in the last `intermittent.window` (with at least `min_runs` runs) makes its service DEGRADED,
  saying the rate ("checkout-journey failed 59% of runs in the last 5m"); each burst's lucky pass
  no longer hides a journey that fails most of the time.
- A prober's failure is not the target's: a result with `prober_error` set (our file descriptors,
  our resolver, our stalled loop) is no vote either way; `observe` leaves the state as it was.
- An isolated controller's observations are not evidence: failures seen while the reference
  targets failed together are forgotten (`discount`) once they pass again, so a verdict built
  while cut off is never acted on after the cut ends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from operator import itemgetter
from typing import NamedTuple

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
    intermittent_window: float = 600.0
    """Seconds of runs over which the failure rate is measured (0 turns the rule off)."""
    intermittent_rate: float = 0.5
    """A failure rate at or above this, over the window, makes the probe's service DEGRADED."""
    intermittent_min_runs: int = 20
    """Fewer runs than this in the window: no rate is claimed."""
    confirm_probes: int = 5
    """Runs in the confirmation burst: DOWN needs `failure_threshold + confirm_probes` failed runs in a row
    (scheduled runs and burst tries alike), the same evidence the burst after the threshold asked for."""
    confirm_span: float = 0.0
    """Seconds from the first failed run's start to the last one's that a confirmed outage must cover:
    a blip shorter than this never makes a probe DOWN however many tries failed inside it. The config
    defaults it to the old rule's floor, (failure_threshold - 1) x interval + (probes - 1) x spacing."""
    requests: int = 1
    """Requests one run makes (a transaction's steps): with too little history to measure the target's
    own rate, the worst flakiness the documented bound allows is assumed, per request (see prior_rate)."""
    confirm_epsilon: float = 1e-6
    """A burst confirms DOWN only when a target failing at its own recent rate (before this streak)
    would produce the whole run of failures with at most this chance: p_prior ** failures <= epsilon.
    A clean target (p_prior 0) is DOWN at once; a journey failing 67% of its runs needs ~35 failures
    in a row, so intermittent failure is a DEGRADED verdict, not a failover."""


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
    runs: tuple[tuple[float, bool], ...] = ()
    """(started_at, failed) of the runs inside the intermittent window, oldest first."""
    outages: tuple[tuple[float, float], ...] = ()
    """[start, end) of each confirmed DOWN period still inside the intermittent window (end is inf while
    DOWN), from the first failed run of its streak: their runs are the outage, not the target's
    flakiness, so they count neither in the prior failure rate nor in the intermittent rate."""


def in_outage(state: ProbeState, at: float) -> bool:
    """Did a run started at `at` belong to a confirmed outage?"""
    return any(a <= at < b for a, b in state.outages)


def _down_from(state: ProbeState, start: float | None, at: float) -> tuple[tuple[float, float], ...]:
    """The outages once the probe is confirmed DOWN at `at`, its streak begun at `start`."""
    return (*state.outages, (start if start is not None else at, math.inf))


def _closed(
    state: ProbeState, at: float, window: float, runs: tuple[tuple[float, bool], ...]
) -> tuple[tuple[float, float], ...]:
    """The outages once the probe leaves DOWN at `at` (`runs` includes the run that ended it); those
    ended before the window are dropped.

    Only a solid outage is kept: every run from its start to its recovery failed, but for the passes
    that ended it. A DOWN period with passes inside it is what a flaky target's chance streak looks
    like after it was (wrongly or not) confirmed, and its runs are its failure rate: were they left
    out, each false DOWN of a journey failing 72% at random would hide its flakiness and make the
    next one easier, so a flapping target would get faster at failing over, not slower."""
    out: list[tuple[float, float]] = []
    for a, b in state.outages:
        if b == math.inf:
            flags = [failed for t, failed in runs if a <= t <= at]
            while flags and not flags[-1]:
                flags.pop()  # the passes that ended it
            if not all(flags):
                continue  # passes inside: not an outage, the target's own rate
            b = at
        out.append((a, b))
    return tuple(x for x in out if at - x[1] <= window)[-8:]


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
    if getattr(result, "prober_error", None):
        return state  # our own trouble (fd limit, resolver, stalled loop): no vote either way
    at = result.started_at
    kind = outcome(result)
    keep = max(r.window_size or 0, 1)
    recent = (*state.recent, kind == "failed")[-keep:]
    runs = state.runs
    if r.intermittent_window > 0:
        runs = tuple(x for x in (*runs, (at, kind == "failed")) if at - x[0] <= r.intermittent_window)
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
    outages = state.outages
    if state.status is Health.DOWN and status is not Health.DOWN:
        outages = _closed(state, at, r.intermittent_window, runs)
    elif status is Health.DOWN and state.status is not Health.DOWN:
        outages = _down_from(state, first, at)
    return ProbeState(
        status, failures, successes, degraded, changed_at, first, result, recent, changes, runs, outages
    )


def failure_rate(state: ProbeState, now: float, window: float) -> tuple[int, int]:
    """(failed, total) runs of the probe whose start lies within `window` seconds before `now`, leaving
    out the runs of confirmed outages: an outage is reported as one, and once it is over its failed
    runs must not keep the service DEGRADED ("failed 92% of runs") nor its incident open."""
    inside = [failed for at, failed in state.runs if now - at <= window and not in_outage(state, at)]
    return sum(inside), len(inside)


def intermittent(
    state: ProbeState, now: float, rules: Rules, factor: float = 1.0, min_runs: int | None = None
) -> tuple[int, int] | None:
    """(failed, total) when the probe failed at least `factor x rate` of its runs in the window, over at
    least `min_runs` runs (default: the rule's)."""
    if rules.intermittent_window <= 0:
        return None
    failed, total = failure_rate(state, now, rules.intermittent_window)
    return (failed, total) if _rate_over(failed, total, rules, factor, min_runs) else None


def _rate_over(failed: int, total: int, rules: Rules, factor: float, min_runs: int | None = None) -> bool:
    """The intermittent rule on counted runs: enough runs (`min_runs`, default the rule's), and a rate
    at least `factor x rate`."""
    if total < (rules.intermittent_min_runs if min_runs is None else min_runs) or total == 0:
        return False
    return failed / total >= rules.intermittent_rate * factor


def _forgiven(state: ProbeState, last: ProbeResult, rules: Rules) -> ProbeState:
    """A pass ended the streak: it was a chance run of failures. Back to UP with a fresh streak."""
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


def judge(state: ProbeState, tries: Sequence[ProbeResult], rules: Rules) -> ProbeState:
    """Decide a failing probe from its streak of scheduled runs and the burst's tries since it began.

    The burst starts at the first sign of trouble (the first failed run, or a run still in flight at
    its next slot) and its tries count: DOWN when the streak holds `failure_threshold +
    confirm_probes` failed runs in a row, scheduled or tried, whose starts span at least
    `confirm_span`, and the target's own recent failure rate does not explain them. The evidence is
    the old rule's (threshold failures, then a burst failing throughout, over the same floor of
    time), but a hang's tries overlap instead of queueing, and nothing waits for the threshold to
    start gathering it. A try that passed, started inside the streak, forgives it (a chance run of
    failures); tries started before the streak began are no evidence either way. Idempotent: the
    controller calls it after every scheduled result and every try with the whole list.
    """
    if not rules.confirm or state.status is Health.DOWN or state.first_failure_at is None:
        return state
    first = state.first_failure_at
    # The streak runs from the latest pass on: a try that failed after the last passing scheduled run
    # but before the first failed one (a late run's suspicion that saw the outage first, while that
    # slow run still passed) belongs to it; earlier tries are no evidence either way.
    passes = [at for at, failed in state.runs if not failed and at < first]
    since = max(passes) if passes else None
    inside = [
        t
        for t in tries
        if not getattr(t, "prober_error", None)
        and (t.started_at > since if since is not None else t.started_at >= first)
    ]
    passed = [t for t in inside if outcome(t) != "failed"]
    if passed:
        earliest_failure = min([first, *(t.started_at for t in inside if outcome(t) == "failed")])
        if max(t.started_at for t in passed) < earliest_failure:  # passes before the streak began
            cut = max(t.started_at for t in passed)
            inside = [t for t in inside if t.started_at > cut]
            passed = []
    if passed:
        return _forgiven(state, max(passed, key=lambda t: t.started_at), rules)
    failed = len(inside)
    count = state.failures + failed
    latest = max([t.started_at for t in inside] + ([state.last.started_at] if state.last is not None else []))
    start = min([first, *(t.started_at for t in inside)])
    if (
        count >= rules.failure_threshold + rules.confirm_probes
        and latest - start >= rules.confirm_span - 1e-9
        and not explained_by_flakiness(state, failed, rules)
    ):
        candidates = [*inside, *([state.last] if state.last is not None else [])]
        newest = max(candidates, key=lambda t: t.started_at) if candidates else None
        changed_at, changes = _move(state, Health.DOWN, latest, rules)
        return replace(
            state,
            status=Health.DOWN,
            failures=count,
            changed_at=changed_at,
            changes=changes,
            last=newest,
            first_failure_at=start,
            outages=_down_from(state, start, latest),
        )
    if count >= rules.failure_threshold and state.status is not Health.SUSPECT:
        changed_at, changes = _move(state, Health.SUSPECT, latest, rules)
        return replace(state, status=Health.SUSPECT, changed_at=changed_at, changes=changes)
    return state


PRIOR_RUNS = 15
"""The target's own failure rate is estimated over this many runs just before the current streak:
recent enough to see flakiness that began minutes ago, not diluted by an hour of clean runs."""
PRIOR_MIN_RUNS = 5
"""Fewer runs than this before the streak (right after a start or a restart, or when confirmed
outages filled the window) is too thin a history to call the target clean: see FLAKY_REQUEST_BOUND."""
FLAKY_REQUEST_BOUND = 0.35
"""The documented bound (README, "False alarms, measured"): requests failing at random at up to this
rate never fail a region over. A run of `requests` requests then fails at up to 1 - 0.65^requests
(73% for a three-step journey), the rate assumed while the history is too thin to measure one."""
PRIOR_Z = 1.0
"""How far above the observed failure rate the prior is taken (Wilson score, upper end)."""
MAX_NEEDED = 64
"""The most failed runs a streak is asked for (see `needed`): past that the target fails so often that
it is DEGRADED by the intermittent rule, and scheduled runs keep adding to its streak."""


def _wilson_upper(failed: int, n: int) -> float:
    z2 = PRIOR_Z * PRIOR_Z
    rate = failed / n
    centre = rate + z2 / (2 * n)
    spread = PRIOR_Z * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z2 / n))


def prior_rate(state: ProbeState, rules: Rules | None = None) -> float:
    """The probe's failure rate over its last PRIOR_RUNS runs before the current failing streak,
    leaving out the runs of confirmed outages (`ProbeState.outages`).

    A confirmed outage is not flakiness: a second outage soon after a first is confirmed as fast as
    the first. Only a confirmed one, though: a streak the controller forgave (a try passed) stays in,
    however long, since a journey failing 72% of its runs at random makes streaks of 8 one time in 14.

    With fewer than PRIOR_MIN_RUNS runs (a restarted controller, a new probe), the history cannot
    tell a clean target from a flaky one: the rate assumed is the worst the documented bound allows
    for a run of `rules.requests` requests (FLAKY_REQUEST_BOUND), or the upper end of what the few
    runs show if that is higher. So a restart never turns a journey failing 72% of its runs into a
    fast DOWN (simulation seed 177: 10 failures in a row right after a restart, with no history, were
    taken as an outage and the region failed over); the burst gathers the longer streak it needs
    instead (44 failed runs for a three-step journey, 14 for a single request: seconds of tries).
    """
    r = rules or Rules()
    start = state.first_failure_at
    before = [
        failed
        for at, failed in state.runs
        if (start is None or at < start) and not (state.outages and in_outage(state, at))
    ][-PRIOR_RUNS:]
    failed, n = sum(before), len(before)
    if n < PRIOR_MIN_RUNS:
        thin = 1.0 - (1.0 - FLAKY_REQUEST_BOUND) ** max(r.requests, 1)
        return max(thin, _wilson_upper(failed, n) if failed else 0.0)
    if not failed:
        return 0.0  # a clean history: the burst alone decides, as it always has
    # A few runs say little about a rate: 2 failures in 6 runs is as likely from a 59%-failing
    # journey as from a 33% one. Take the upper end of the Wilson score interval (z = 1), so a small
    # sample errs towards "this could be flakiness" and a flaky target is never confirmed DOWN by a
    # streak its own failure rate explains (simulation seed 109: 26% of requests failing, a
    # three-step journey failing 59% of runs, was failed over with the plain estimate).
    return _wilson_upper(failed, n)


def needed(state: ProbeState, rules: Rules) -> int:
    """Failed runs in a row (scheduled runs and tries) the current streak needs before it can be DOWN:
    threshold + confirm.probes, or more when the target's own rate would explain fewer (p^n must be at
    most confirm_epsilon); at most MAX_NEEDED, which only a target failing over 80% of its runs asks."""
    base = rules.failure_threshold + rules.confirm_probes
    p = prior_rate(state, rules)
    if p <= 0:
        return base
    if p >= 1:
        return MAX_NEEDED
    return min(MAX_NEEDED, max(base, math.ceil(math.log(rules.confirm_epsilon) / math.log(p) - 1e-9)))


def explained_by_flakiness(state: ProbeState, burst_failures: int, rules: Rules) -> bool:
    """True when the target's own recent failure rate makes this many failures in a row a likely
    chance event (p ** n > confirm_epsilon): not yet evidence of an outage."""
    p = prior_rate(state, rules)
    return p > 0 and p ** (state.failures + burst_failures) > rules.confirm_epsilon


def flapping(state: ProbeState, now: float, rules: Rules) -> bool:
    return sum(1 for t in state.changes if now - t <= rules.flap_window) >= rules.flap_changes


def discount(state: ProbeState, since: float, until: float) -> ProbeState:
    """Forget the failures a probe saw while the controller itself was cut off ([since, until): the
    reference targets failed together). An isolated controller's observations are not evidence: a
    failing streak that began inside the window says nothing about the target, so the probe is
    UNKNOWN until it runs again (unknown is not up, nor down); its failed runs in the window leave
    the intermittent rate. A streak that began before the window (a real outage the controller saw
    before it was cut off) stands."""
    runs = tuple(x for x in state.runs if not (x[1] and since <= x[0] < until))
    outages = tuple(x for x in state.outages if not since <= x[0] < until)  # verdicts built while cut off
    first = state.first_failure_at
    if first is None or first < since or state.status is Health.UNKNOWN:
        if runs == state.runs and outages == state.outages:
            return state
        return replace(state, runs=runs, outages=outages)
    return replace(
        state,
        status=Health.UNKNOWN,
        failures=0,
        successes=0,
        degraded=0,
        changed_at=until,
        first_failure_at=None,
        recent=tuple(False for _ in state.recent),
        runs=runs,
        outages=outages,
    )


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
    unproven: tuple[tuple[str, str], ...] = ()
    """(probe, why) for each probe that does not yet prove the service recovered: unknown, stale,
    fewer than `success_threshold` passes since its last failure, or still failing intermittently.
    An incident is never resolved while any is listed."""

    def summary(self) -> str:
        if not self.failing:
            return f"{self.service} is {self.state}"
        parts = [r if r.startswith(f"{p} ") else (f"{p}: {r}" if r else p) for p, r in self.reasons]
        return f"{self.service} is {self.state}: " + "; ".join(parts)


def _window_words(seconds: float) -> str:
    """`5m`, `90s`, `2h`: how an SRE wrote the window."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def service_health(
    service: str,
    probes: list[str],
    states: dict[str, ProbeState],
    impact: Mapping[str, str],
    flapping_probes: Iterable[str] = (),
    *,
    now: float | None = None,
    freshness: Mapping[str, float] | None = None,
    rules: Mapping[str, Rules] | None = None,
) -> ServiceHealth:
    """DOWN when a probe whose impact is `down` is DOWN; DEGRADED when a probe is degraded, failing
    intermittently (see Rules.intermittent_*), or an `impact: degraded` probe is DOWN; UNKNOWN when
    nothing fails but a probe has no fresh result (never reported, or older than its `freshness`):
    unknown is not up. SUSPECT counts as up for opening: the confirmation burst decides it.

    `now` and `freshness` (seconds per probe) turn on the staleness check; `rules` gives each probe's
    success threshold and intermittent settings (default: Rules()). The controller passes all three.

    It is `summarize` over one `probe_view` per probe: the controller keeps the views of unchanged
    probes from tick to tick (controller/health_memo.py) and gets the same answer as this.
    """
    fresh_for = freshness or {}
    rule_of = rules or {}
    views = [
        probe_view(
            p,
            states.get(p, _NEVER),
            impact.get(p, "down") == "down",
            rule_of.get(p, _DEFAULT_RULES),
            fresh_for.get(p),
            now,
        )
        for p in probes
    ]
    return summarize(service, views, flapping_probes)


_DEFAULT_RULES = Rules()


class ProbeView(NamedTuple):
    """What `service_health` reads of one probe at one moment. Two views equal but for `until` give
    the same service verdict, so a probe whose new result changed nothing the verdict reads (one
    more pass of a healthy probe) leaves its service's verdict as it was."""

    probe: str
    status: Health
    """The probe's status, UNKNOWN when its latest result is older than its freshness."""
    stale: bool
    hard: bool
    """Its impact is `down`: DOWN makes the service DOWN (else DEGRADED)."""
    flaky: str | None
    """The intermittent-failure reason when it fails at least `intermittent_rate` of its runs."""
    reason: str
    """Why it fails (the flaky reason, else the latest result's): only for a probe that may fail
    the service (DOWN, DEGRADED or flaky); empty otherwise."""
    first_failure_at: float | None
    """Start of its failing streak, only for a probe that may fail the service."""
    unsettled: bool
    unproven: str | None
    """Why it does not yet prove the service recovered (see ServiceHealth.unproven)."""
    until: float | None
    """The earliest moment time alone could change this view (None: never, until a new state):
    the latest result goes stale, or the oldest run inside the intermittent window leaves it while
    a failed run is inside."""


_FAILED = itemgetter(1)
"""(started_at, failed) -> failed"""


def probe_view(
    p: str, st: ProbeState, hard: bool, r: Rules, limit: float | None, now: float | None
) -> ProbeView:
    """One probe as `service_health` sees it at `now` (see ProbeView)."""
    s = st.status
    stale = False
    until = None
    if s is not Health.UNKNOWN and now is not None:
        if st.last is None or (limit is not None and now - st.last.started_at > limit):
            s = Health.UNKNOWN
            stale = True
        elif limit is not None:
            until = st.last.started_at + limit
    flaky: str | None = None
    still_flaky = False
    w = r.intermittent_window
    # = intermittent(st, now, r) and intermittent(st, now, r, factor=0.5), in one pass over the runs.
    # With no failed run (and a positive rate) both are None, now and as runs age out.
    if now is not None and s in (Health.UP, Health.SUSPECT) and w > 0:
        if r.intermittent_rate > 0 and not any(map(_FAILED, st.runs)):
            pass
        else:
            failed = total = 0
            oldest = math.inf
            for at, f in st.runs:
                if now - at <= w and not in_outage(st, at):  # as failure_rate: an outage is no flakiness
                    total += 1
                    failed += f
                    oldest = min(oldest, at)
            if _rate_over(failed, total, r, 1.0):
                latest = last.reason if (last := st.last) is not None and not last.ok else ""
                flaky = (
                    f"{p} failed {round(100 * failed / total)}% of runs in the last "
                    f"{_window_words(w)} ({failed} of {total})" + (f"; latest: {latest}" if latest else "")
                )
            elif _rate_over(failed, total, r, 0.5, min_runs=1):
                # Hysteresis: it must fall below half the rate to prove recovery, and too few runs
                # in the window (a confirmed outage's runs left out, old ones aged out) prove
                # nothing: a DEGRADED incident must not resolve and reopen each time the count of
                # runs crosses min_runs (simulation seed 74: three incidents in a minute).
                still_flaky = True
            if total and (failed or r.intermittent_rate * 0.5 <= 0):
                until = oldest + w if until is None else min(until, oldest + w)
    may_fail = s in (Health.DOWN, Health.DEGRADED) or flaky is not None
    unproven = None
    if stale:
        unproven = "no fresh result"
    elif s is Health.UNKNOWN:
        unproven = "no result yet"
    elif s is Health.UP and st.successes < r.success_threshold:
        unproven = f"{st.successes} of {r.success_threshold} passes since its last failure"
    elif still_flaky:
        unproven = "still failing intermittently"
    return ProbeView(
        p,
        s,
        stale,
        hard,
        flaky,
        (flaky if flaky is not None else (last.reason if (last := st.last) else "")) if may_fail else "",
        st.first_failure_at if may_fail else None,
        s is Health.SUSPECT or (s in (Health.UP, Health.UNKNOWN) and st.failures > 0),
        unproven,
        until,
    )


def summarize(service: str, views: list[ProbeView], flapping_probes: Iterable[str] = ()) -> ServiceHealth:
    """The service's verdict from its probes' views, in the order of its probes (see service_health)."""
    hard = [v.probe for v in views if v.status is Health.DOWN and v.hard]
    soft = [
        v.probe
        for v in views
        if v.status is Health.DEGRADED or (v.status is Health.DOWN and not v.hard) or v.flaky is not None
    ]
    if hard:
        state, failing = ServiceState.DOWN, hard + soft
    elif soft:
        state, failing = ServiceState.DEGRADED, soft
    elif any(v.status is Health.UNKNOWN for v in views):
        state, failing = ServiceState.UNKNOWN, []
    else:
        state, failing = ServiceState.UP, []
    by_name = {v.probe: v for v in views}
    reasons = tuple((p, by_name[p].reason) for p in failing)
    starts = [at for p in failing if (at := by_name[p].first_failure_at) is not None]
    flapping_set = set(flapping_probes)
    return ServiceHealth(
        service,
        state,
        tuple(failing),
        reasons,
        min(starts) if starts else None,
        tuple(v.probe for v in views if v.probe in flapping_set),
        tuple(v.probe for v in views if v.unsettled),
        tuple((v.probe, v.unproven) for v in views if v.unproven is not None),
    )
