"""Detection figures measured on the real controller in the simulation (bench/sim_figures.py prints
them; tests/test_detection_trust.py asserts them on shorter runs)."""

from __future__ import annotations

import math
from collections.abc import Callable

from tests.sim.runner import run
from tests.sim.scenarios import Scenario
from tests.sim.world import Fault

DAY = 86_400.0
MONTH_DAYS = 30.0
KINDS = ("refused", "http5xx", "hang", "slow", "step")
KIND_LABEL = {
    "refused": "refused",
    "http5xx": "5xx",
    "hang": "hang",
    "slow": "slow (2.5 s, over a 1 s SLO)",
    "step": "one journey step broken",
}


def false_alarms(rate: float, days: float, seed: int = 1) -> tuple[float, int, int]:
    """(simulated days, incidents, failovers) with every request failing at `rate` at random."""
    s = Scenario(
        seed=seed,
        name=f"false-alarms-{rate:g}",
        duration=days * DAY,
        only_api=True,
        tick=60.0,
        lean=True,
        faults=[Fault("flaky", 0.0, days * DAY, None, rate=rate)],
        checks=("figures-only",),
    )
    out = run(s)
    incidents = sum(1 for i in out.incidents if i.service == "checkout")
    failovers = sum(1 for c in out.world.calls if c.kind == "route53" and c.detail.get("region") == "us")
    return days, incidents, failovers


def time_to_detect(kind: str, phase: float) -> float | None:
    """Seconds from the fault's start to the checkout incident opening (None: never opened)."""
    start = 120.0 + phase
    fault = {
        "slow": Fault("slow", start, start + 600, "eu", latency=2.5),
        "step": Fault("step", start, start + 600, "eu", step="pay"),
    }.get(kind, Fault(kind, start, start + 600, "eu"))
    s = Scenario(
        seed=1000 + int(phase * 10),
        name=f"detect-{kind}",
        duration=start + 500,
        playbook=False,
        faults=[fault],
        checks=("figures-only",),
    )
    out = run(s)
    opened = [i.opened_at - out.world.t0 for i in out.incidents if i.service == "checkout"]
    return opened[0] - start if opened else None


def _poisson_cdf(k: int, mu: float) -> float:
    """P(X <= k) for X ~ Poisson(mu) (no scipy needed for two bounds)."""
    if mu <= 0:
        return 1.0
    term = math.exp(-mu)
    total = term
    for i in range(1, k + 1):
        term *= mu / i
        total += term
    return min(1.0, total)


def _solve(f: Callable[[float], float], lo: float, hi: float) -> float:
    """Bisection for a decreasing `f` that crosses 0 in [lo, hi]."""
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def poisson_ci(events: int, exposure: float, level: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) confidence interval of a Poisson rate: `events` seen over `exposure` units
    (simulated months). Exact, because with a handful of events the normal approximation goes below
    zero. Nothing seen: the lower bound is 0 and the upper one 3.69 / exposure at 95%."""
    tail = (1 - level) / 2
    top = 10.0 * (events + 10)
    upper = _solve(lambda mu: _poisson_cdf(events, mu) - tail, 0.0, top)
    lower = 0.0
    if events > 0:
        lower = _solve(lambda mu: tail - (1 - _poisson_cdf(events - 1, mu)), 0.0, top)
    return lower / exposure, upper / exposure
