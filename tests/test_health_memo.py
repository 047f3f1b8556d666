"""The tracker's memo of service health (controller/health_memo.py) gives what `service_health`
computed afresh gives: over random results, vantage points and time passing (a probe going stale on
time alone, failed runs leaving the intermittent window, the clock stepping back), and through the
real controller's `health()`."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from controller.config import load_config
from controller.detect import (
    Health,
    ProbeState,
    Rules,
    ServiceHealth,
    ServiceState,
    combine,
    flapping,
    observe,
    service_health,
)
from controller.health_memo import HealthMemo
from controller.loop import Controller
from controller.stores import SQLiteStore
from probes.base import ProbeResult, StepResult


def result(probe: str, kind: str, at: float, vantage: str = "local") -> ProbeResult:
    if kind == "ok":
        return ProbeResult(probe, True, at, 0.01, (), vantage=vantage)
    details = {"degraded": True} if kind == "degraded" else {}
    step = StepResult(probe, False, 0.01, error=f"{kind}: expected status 200, found 503 at {at:.1f}")
    return ProbeResult(probe, False, at, 0.01, (step,), details=details, vantage=vantage)


def plain(
    services: dict[str, list[str]],
    states: dict[str, ProbeState],
    impact: dict[str, str],
    flaps: list[str],
    now: float,
    fresh: dict[str, float],
    rules: dict[str, Rules],
) -> dict[str, ServiceHealth]:
    return {
        name: service_health(name, probes, states, impact, flaps, now=now, freshness=fresh, rules=rules)
        for name, probes in services.items()
    }


def test_the_memo_equals_a_fresh_computation_over_random_results_and_time() -> None:
    compared = lookups = 0
    memo_views = 0
    for seed in range(25):
        rng = random.Random(seed)
        probes = [f"p{i}" for i in range(rng.randint(2, 7))]
        services = {
            f"s{j}": rng.sample(probes, rng.randint(1, len(probes))) for j in range(rng.randint(1, 4))
        }
        rules = {
            p: Rules(
                failure_threshold=rng.randint(1, 3),
                success_threshold=rng.randint(1, 3),
                window_failures=2,
                window_size=rng.choice([None, 4]),
                intermittent_window=rng.choice([0.0, 20.0, 60.0]),
                intermittent_rate=rng.choice([0.0, 0.3, 0.5]),
                intermittent_min_runs=rng.randint(1, 6),
            )
            for p in probes
        }
        fresh = {p: rng.choice([5.0, 15.0, 40.0]) for p in probes if rng.random() < 0.9}
        impact = {p: rng.choice(["down", "degraded"]) for p in probes}
        vstates: dict[str, dict[str, ProbeState]] = {p: {} for p in probes}
        states: dict[str, ProbeState] = {}
        memo = HealthMemo()
        now = 1000.0
        flaps: list[str] = []
        for _ in range(120):
            move = rng.random()
            if move < 0.6:  # a result from one vantage point, combined under a quorum of one
                p = rng.choice(probes)
                vantage = rng.choice(["local", "local", "eu"])
                kind = rng.choice(["ok", "ok", "ok", "failed", "degraded"])
                before = vstates[p].get(vantage, ProbeState())
                vstates[p][vantage] = observe(before, result(p, kind, now - rng.random()), rules=rules[p])
                states[p] = combine(vstates[p].values(), 1, fresh.get(p, 1e9), now)
            elif move < 0.85:  # time passes: often past a freshness limit or an intermittent window
                now += rng.choice([0.1, 1.0, 4.0, 6.0, 16.0, 41.0, 61.0])
            elif move < 0.9:
                now -= rng.choice([0.5, 30.0])  # the wall clock stepped back
            elif move < 0.95:
                flaps = rng.sample(probes, rng.randint(0, 2))
            else:  # an equal state as a new object, and a rules object replaced by an equal one
                p = rng.choice(probes)
                if p in states:
                    states[p] = ProbeState(
                        **{f: getattr(states[p], f) for f in ProbeState.__dataclass_fields__}
                    )
                rules[p] = Rules(**{f: getattr(rules[p], f) for f in Rules.__dataclass_fields__})
            got = memo.health(services, states, impact, flaps, now=now, freshness=fresh, rules=rules)
            assert got == plain(services, states, impact, flaps, now, fresh, rules), (seed, now)
            up = {p: s.changed_at or now for p, s in states.items() if s.status is Health.UP}
            assert memo.up_since(now) == up
            compared += 1
            lookups += len({p for ps in services.values() for p in ps})
        memo_views += memo.views_computed
    assert compared == 25 * 120
    # And it is a memo: most probe views were reused, not recomputed.
    assert memo_views < lookups / 2, (memo_views, lookups)


def _fold(state: ProbeState, probe: str, kinds: list[str], start: float, rules: Rules) -> ProbeState:
    for i, kind in enumerate(kinds):
        state = observe(state, result(probe, kind, start + i * 10.0), rules=rules)
    return state


def test_a_probe_that_stops_reporting_is_unknown_on_time_alone() -> None:
    """Unknown is not up: no new result, no new state object, and still the verdict moves."""
    rules = {"a": Rules(), "b": Rules()}
    states = {"a": _fold(ProbeState(), "a", ["ok"] * 3, 1000.0, rules["a"])}
    states["b"] = _fold(ProbeState(), "b", ["ok"] * 3, 1000.0, rules["b"])
    services = {"shop": ["a", "b"]}
    fresh = {"a": 30.0, "b": 300.0}
    memo = HealthMemo()
    args = (services, states, {}, [])
    up = memo.health(*args, now=1025.0, freshness=fresh, rules=rules)["shop"]
    assert up.state is ServiceState.UP
    assert memo.health(*args, now=1050.0, freshness=fresh, rules=rules)["shop"] is up  # still fresh
    stale = memo.health(*args, now=1050.5, freshness=fresh, rules=rules)["shop"]  # a: 30.5 s old
    assert stale.state is ServiceState.UNKNOWN
    assert stale.unproven == (("a", "no fresh result"),)
    assert stale == service_health("shop", ["a", "b"], states, {}, now=1050.5, freshness=fresh, rules=rules)


def test_failed_runs_leave_the_intermittent_window_on_time_alone() -> None:
    r = Rules(intermittent_window=60.0, intermittent_rate=0.5, intermittent_min_runs=3)
    st = _fold(ProbeState(), "j", ["ok", "ok", "failed", "failed", "ok", "ok"], 1000.0, r)
    assert st.status is Health.UP
    states, rules, fresh = {"j": st}, {"j": r}, {"j": 1000.0}
    memo = HealthMemo()
    seen = []
    for now in (1060.0, 1061.0, 1071.0, 1081.0, 1091.0):
        got = memo.health({"shop": ["j"]}, states, {}, [], now=now, freshness=fresh, rules=rules)["shop"]
        assert got == service_health("shop", ["j"], states, {}, now=now, freshness=fresh, rules=rules)
        seen.append((got.state.value, got.unproven))
    # The same state throughout; only the window moves: 2 of 6 runs failed, 2 of 5 (still failing
    # intermittently: over half the rate), 2 of 4 (50%: DEGRADED), 1 of 3, then too few runs to
    # claim a rate.
    still = ("up", (("j", "still failing intermittently"),))
    assert seen == [still, still, ("degraded", ()), still, ("up", ())]


CONFIG = """
services:
  shop: {tier: critical, rto: 5m, probes: [health, journey]}
  search: {tier: important, rto: 5m, probes: [journey, search]}
probes:
  health: {kind: http, url: "http://127.0.0.1:9/health", interval: 10s, timeout: 1s}
  journey: {kind: http, url: "http://127.0.0.1:9/journey", interval: 10s, timeout: 1s, impact: degraded}
  search: {kind: http, url: "http://127.0.0.1:9/search", interval: 10s, timeout: 1s}
  ref: {kind: http, url: "http://127.0.0.1:9/ref", interval: 10s, timeout: 1s}
detection: {reference_probes: [ref]}
"""


def test_the_controllers_health_is_service_health_of_its_states(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG)
    cfg = load_config(tmp_path / "c.yaml")
    now = [1000.0]
    store = SQLiteStore(tmp_path / "data")
    ctrl = Controller(cfg, store, clock=lambda: now[0])

    def fresh_health() -> dict[str, ServiceHealth]:
        det = ctrl.detection
        rules = {p: cfg.rules(p) for p in cfg.probes}
        freshness = {p: cfg.freshness(p) for p in cfg.probes}
        flaps = [p for p, st in det.states.items() if st.changes and flapping(st, now[0], cfg.rules(p))]
        return plain(
            {n: s.probes for n, s in cfg.services.items()}, det.states, det.impact, flaps, now[0],
            freshness, rules,
        )  # fmt: skip

    async def scenario() -> list[str]:
        rng = random.Random(7)
        states_seen = []
        for _ in range(200):
            if rng.random() < 0.7:
                probe = rng.choice(list(cfg.probes))
                ctrl.inputs.ingest(result(probe, rng.choice(["ok", "ok", "failed"]), now[0]))
            else:
                now[0] += rng.choice([1.0, 5.0, 40.0])  # past the default freshness now and then
            got = ctrl.detection.health()
            assert got == fresh_health(), now[0]
            states = ctrl.detection.states
            up = {p: s.changed_at or now[0] for p, s in states.items() if s.status is Health.UP}
            assert ctrl.detection.up_since(now[0]) == up
            states_seen += [h.state.value for h in got.values()]
        for t in ctrl.detection._burst_tasks:
            t.cancel()
        return states_seen

    seen = asyncio.run(scenario())
    assert {"up", "unknown"} <= set(seen), set(seen)
    store.close()
