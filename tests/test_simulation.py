"""The promises, checked on the real controller in a deterministic simulation (tests/sim).

CI mode runs CONTINUITY_SIM_SCENARIOS (default 200) seeded scenarios; CONTINUITY_SIM_LONG=1 runs
100x more. A failure prints the seed and the fault timeline; `--sim-seed N` (or CONTINUITY_SIM_SEED)
replays exactly that scenario. Counts, simulated time and wall time are printed (`-s`).
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest

from tests.sim.runner import run_many

FIRST_SEED = 1


def _count() -> int:
    if os.environ.get("CONTINUITY_SIM_LONG"):
        return 100 * int(os.environ.get("CONTINUITY_SIM_SCENARIOS", "200"))
    return int(os.environ.get("CONTINUITY_SIM_SCENARIOS", "200"))


# The CI budget is 5 minutes on 2 loaded cores; the long mode has none.
@pytest.mark.timeout(0 if os.environ.get("CONTINUITY_SIM_LONG") else 600)
def test_seeded_scenarios_keep_every_promise(sim_seed: int | None) -> None:
    seeds = [sim_seed] if sim_seed is not None else list(range(FIRST_SEED, FIRST_SEED + _count()))
    wall = time.perf_counter()
    results = run_many(seeds)
    wall = time.perf_counter() - wall
    simulated = sum(r.simulated for r in results)
    kube = sum(r.store == "kube" for r in results)
    failures = [r.report for r in results if r.violations]
    skipped = {name for r in results for name in r.skipped}
    counts = Counter(name for r in results for name in r.invariants)
    seeds_of: dict[str, list[int]] = {}
    for r in results:
        for name in r.invariants:
            seeds_of.setdefault(name, []).append(r.seed)
    cpu = sum(r.cpu for r in results)
    features = Counter(f.split("=")[0] for r in results for f in r.features)
    approvals = Counter(f for r in results for f in r.features if f.startswith("approval="))
    print(
        f"\nsimulation: {len(seeds)} scenarios ({kube} on the Kubernetes store), "
        f"{simulated / 3600:.1f} simulated hours, {wall:.1f}s wall, {cpu:.1f} CPU-s in the workers, "
        f"{len(failures)} failing" + (f"; not checked: {', '.join(sorted(skipped))}" if skipped else "")
    )
    print(
        f"  with pushed inputs through the API: {features['pushes']}, email+Statuspage: {features['comms']}, "
        f"the real Lease elector: {features['lease']}, approvals: "
        + (", ".join(f"{k.split('=')[1]} {n}" for k, n in sorted(approvals.items())) or "0")
    )
    for name, n in counts.most_common():
        print(f"  {name}: broken in {n} scenario(s), seeds {seeds_of[name][:12]}")
    assert not failures, f"{len(failures)} of {len(seeds)} scenarios broke a promise:\n\n" + "\n\n".join(
        failures[:20]
    )


@pytest.mark.timeout(300)
def test_a_seed_replays_exactly() -> None:
    """Same seed, same run: every world-changing call, delivery and incident at the same virtual time."""
    from tests.sim.runner import run
    from tests.sim.scenarios import generate

    seed = 17  # an outage, AWS timing out after success, PagerDuty down: plenty to diverge on

    def trace() -> list[tuple[object, ...]]:
        out = run(generate(seed))
        return [
            *((round(c.t, 6), c.actor, c.kind, c.key) for c in out.world.calls),
            *((round(d.t, 6), d.actor, d.key) for d in out.world.deliveries),
            *((i.id, i.service, i.severity, i.opened_at, i.resolved_at) for i in out.incidents),
            *((r.id, r.playbook, r.state, r.started_at, r.ended_at) for r in out.runs),
        ]

    first, second = trace(), trace()
    assert first, "the scenario should do something"
    assert first == second


@pytest.mark.timeout(300)
def test_a_seed_with_pushes_approvals_mail_and_the_lease_replays_exactly() -> None:
    """The newer edges keep a replay exact too: pushes through the API app (whose rate limit runs on
    the wall clock, out of reach), a human's approval, SMTP and Statuspage, the Lease elector's
    jittered retries (seeded `random`)."""
    from dataclasses import replace

    from tests.sim.runner import run
    from tests.sim.scenarios import generate
    from tests.sim.world import Event, Fault

    base = generate(17)
    s = replace(
        base,
        replicas=2,
        lease=True,
        pushes=True,
        comms=True,
        approval="approve",
        faults=[*base.faults, Fault("payments_down", 200, 450), Fault("worker_down", 300, 500)],
        events=[*base.events, Event("forged_push", 150, 500), Event("leader_change", 400, value=12.0)],
    )

    def trace() -> list[tuple[object, ...]]:
        out = run(s)
        return [
            *((round(c.t, 6), c.actor, c.kind, c.key) for c in out.world.calls),
            *((round(d.t, 6), d.actor, d.key) for d in out.world.deliveries),
            *((round(t, 6), e, who, status) for t, e, who, status in out.world.pushes),
            *((round(t, 6), who) for t, who in out.world.leadership),
            *((i.id, i.service, i.severity, i.opened_at, i.resolved_at) for i in out.incidents),
            *((r.id, r.playbook, r.state, r.started_at, r.ended_at) for r in out.runs),
        ]

    first, second = trace(), trace()
    assert any(e[2] == "attacker" for e in first if len(e) == 4 and isinstance(e[2], str)), "pushes expected"
    assert first == second
