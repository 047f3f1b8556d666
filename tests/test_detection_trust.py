"""Can detection be trusted? False alarms, time to detect, quorum, isolation, flapping, dependencies,
silences and windows.

The first part is a seeded simulation in simulated time over the pure functions (observe, confirm,
service_health, decide) with the config models' own defaults; the rest runs the Controller against
local aiohttp targets the test flips, with the local PagerDuty receiver checking what is sent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from controller.config import Config, Detection
from controller.decide import (
    Observation,
    OpenIncident,
    OpenIncidentView,
    ResolveIncident,
    StartPlaybook,
    decide,
)
from controller.detect import (
    Health,
    ProbeState,
    confirm,
    flapping,
    observe,
    service_health,
)
from probes.base import ProbeResult
from probes.http import HttpProbe

DAY = 86_400.0
MONTH = 30 * DAY

# ====================================================================== the simulation


def sim_config() -> Config:
    """One critical service, one http probe and one playbook, everything else at its default."""
    return Config.model_validate(
        {
            "services": {"shop": {"tier": "critical", "rto": "5m", "probes": ["web"], "playbook": "fo"}},
            "probes": {"web": {"kind": "http", "url": "http://127.0.0.1:9/"}},
            "playbooks": {"fo": {"steps": [{"name": "pause", "action": "wait", "with": {"duration": "1s"}}]}},
        }
    )


@dataclass
class SimOutcome:
    incidents: int = 0
    failovers: int = 0
    down_at: float | None = None
    """Simulated time of the first OpenIncident (for the time-to-detect runs)."""


def simulate(
    seed: int,
    p: float,
    duration: float,
    *,
    burst: bool = True,
    outage_at: float | None = None,
    stop_at_first_incident: bool = False,
    fast: bool = True,
) -> SimOutcome:
    """Walk the probe's slots in simulated time; each run fails with probability p (always from
    `outage_at` on). A failing run takes the whole timeout (the worst case: a hung target), a passing
    one 50 ms. When a slot makes the probe SUSPECT, a confirmation burst runs as the controller's
    `_confirm` does (`probes` runs `spacing` apart, stopping at the first pass). The decision is fed
    the open incident, the runs per incident, the last start and the runs in the last hour, like
    `Controller.observation`; a started playbook is taken to finish at once and succeed.

    `fast`: a passing run while the probe is UP with a clean slate and no incident is open changes
    nothing but `successes` and `last`, which the next failure overwrites; such slots still draw
    their random number but skip building the result and calling observe (3x faster, same figures:
    see test_the_fast_path_changes_nothing)."""
    cfg = sim_config()
    probe = cfg.probes["web"]
    interval, timeout = probe.interval, probe.timeout
    spec = cfg.detection.confirm
    rules = cfg.rules("web", confirm=burst)
    rng = random.Random(seed)
    out = SimOutcome()
    state = ProbeState()
    incident: OpenIncidentView | None = None
    last_run: dict[str, float] = {}
    run_starts: list[float] = []
    n = 0

    def run(at: float, draw: float | None = None) -> ProbeResult:
        draw = rng.random() if draw is None else draw
        failed = (outage_at is not None and at >= outage_at) or draw < p
        if failed:
            return ProbeResult("web", False, at, timeout, error=f"timed out after {timeout:g}s")
        return ProbeResult("web", True, at, 0.05)

    t = 0.0
    while t < duration:
        before = state.status
        draw = rng.random()
        if (
            fast
            and draw >= p
            and incident is None
            and outage_at is None
            and before is Health.UP
            and state.failures == 0
            and state.degraded == 0
            and state.first_failure_at is None
        ):
            t += interval
            continue
        result = run(t, draw)
        state = observe(state, result, rules=rules)
        now = t + result.latency
        if state.status is Health.SUSPECT and before is not Health.SUSPECT:
            runs: list[ProbeResult] = []
            at = now
            for i in range(spec.probes):
                if i:
                    at += spec.spacing
                runs.append(run(at))
                at += runs[-1].latency
                if runs[-1].ok:
                    break
            state = confirm(state, runs, rules)
            now = at
        if state.status not in (Health.UP, Health.SUSPECT, Health.UNKNOWN) or incident is not None:
            # (UP with no incident open decides nothing: skipped for speed, not for effect)
            flaps = ["web"] if flapping(state, now, rules) else []
            health = {"shop": service_health("shop", ["web"], {"web": state}, {"web": "down"}, flaps)}
            obs = Observation(
                now,
                health,
                {"shop": incident} if incident else {},
                last_run_started=dict(last_run),
                runs_last_hour=sum(1 for s in run_starts if now - s < 3600),
            )
            for dec in decide(obs, cfg):
                if isinstance(dec, OpenIncident):
                    n += 1
                    incident = OpenIncidentView(f"i{n}", dec.severity)
                    out.incidents += 1
                    if out.down_at is None:
                        out.down_at = now
                    if stop_at_first_incident:
                        return out
                elif isinstance(dec, StartPlaybook):
                    assert incident is not None
                    out.failovers += 1
                    incident = OpenIncidentView(incident.id, incident.severity, runs=incident.runs + 1)
                    last_run["shop"] = now
                    run_starts.append(now)
                    run_starts[:] = [s for s in run_starts if now - s < 3600]
                elif isinstance(dec, ResolveIncident):
                    incident = None
        t += interval
    return out


def test_simulation_uses_the_models_defaults() -> None:
    cfg = sim_config()
    d = Detection()
    assert cfg.detection == d
    assert (d.failure_threshold, d.success_threshold, d.confirm.probes) == (3, 2, 5)
    assert d.confirm.spacing == 0.25
    assert cfg.probes["web"].interval == HttpProbe.model_fields["interval"].default
    assert cfg.probes["web"].timeout == HttpProbe.model_fields["timeout"].default
    assert cfg.rules("web").confirm is True and cfg.rules("web", confirm=False).confirm is False


def test_the_fast_path_changes_nothing() -> None:
    for burst in (True, False):
        slow = simulate(seed=11, p=0.2, duration=3 * DAY, burst=burst, fast=False)
        quick = simulate(seed=11, p=0.2, duration=3 * DAY, burst=burst, fast=True)
        assert slow == quick
        assert slow.incidents > 0 or burst, "the comparison should cover incidents"


def test_five_percent_failures_for_a_month_open_no_incident() -> None:
    with_burst = simulate(seed=5, p=0.05, duration=MONTH)
    without = simulate(seed=5, p=0.05, duration=MONTH, burst=False)
    print(
        f"\np=0.05, 30 days: {with_burst.incidents} incidents with the burst, "
        f"{without.incidents} without (failovers {with_burst.failovers} / {without.failovers})"
    )
    assert with_burst.incidents == 0, f"{with_burst.incidents} false incidents at p=0.05 in 30 days"
    assert without.incidents > 0, "without the burst the same draws should raise false alarms"


def test_twenty_percent_failures_for_a_year_fail_over_less_than_once_a_month() -> None:
    months = 12
    with_burst = simulate(seed=20, p=0.20, duration=months * MONTH)
    # Without the burst false alarms come every hour: two months give the rate (and save 12 s).
    off_months = 2
    without = simulate(seed=20, p=0.20, duration=off_months * MONTH, burst=False)
    rate, off_rate = with_burst.failovers / months, without.failovers / off_months
    print(
        f"\np=0.20: with the burst, {months} x 30 days: {with_burst.incidents} incidents, "
        f"{with_burst.failovers} failovers ({rate:.2f}/month); without it, {off_months} x 30 days: "
        f"{without.incidents} incidents, {without.failovers} failovers ({off_rate:.0f}/month)"
    )
    assert rate < 1, (
        f"{with_burst.failovers} failovers in {months} months ({rate:.2f}/month) at p=0.20: "
        "expected less than one a month"
    )
    assert off_rate > 10 * max(rate, 1), "the burst should cut failovers by far"


def test_a_hard_outage_is_declared_down_within_the_bound() -> None:
    cfg = sim_config()
    probe, d = cfg.probes["web"], cfg.detection
    bound = (
        d.failure_threshold * probe.interval
        + probe.timeout
        + d.confirm.probes * d.confirm.spacing
        + d.confirm.probes * probe.timeout
    )
    rng = random.Random(7)
    delays = []
    for _ in range(300):
        start = 60.0 + rng.uniform(0, probe.interval)
        got = simulate(
            seed=rng.randrange(1 << 30),
            p=0.0,
            duration=start + 10 * probe.interval,
            outage_at=start,
            stop_at_first_incident=True,
        )
        assert got.down_at is not None, f"an outage from t={start:.2f}s was never declared"
        delays.append(got.down_at - start)
    worst, best = max(delays), min(delays)
    print(f"\nhard outage: declared DOWN after {best:.1f}s .. {worst:.1f}s (bound {bound:.1f}s)")
    assert worst <= bound, f"worst detection delay {worst:.2f}s over the bound {bound:.2f}s"
    assert best >= (d.failure_threshold - 1) * probe.interval, "too fast to be the failure streak"
