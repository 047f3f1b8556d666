"""The promises, checked on the real controller in a deterministic simulation (tests/sim).

CI mode runs CONTINUITY_SIM_SCENARIOS (default 200) seeded scenarios; CONTINUITY_SIM_LONG=1 runs
100x more. A failure prints the seed and the fault timeline; `--sim-seed N` (or CONTINUITY_SIM_SEED)
replays exactly that scenario. Counts, simulated time and wall time are printed (`-s`).
"""

from __future__ import annotations

import os
import time

import pytest

from tests.sim.runner import run
from tests.sim.scenarios import generate

FIRST_SEED = 1


def _count() -> int:
    if os.environ.get("CONTINUITY_SIM_LONG"):
        return 100 * int(os.environ.get("CONTINUITY_SIM_SCENARIOS", "200"))
    return int(os.environ.get("CONTINUITY_SIM_SCENARIOS", "200"))


def test_seeded_scenarios_keep_every_promise(sim_seed: int | None) -> None:
    seeds = [sim_seed] if sim_seed is not None else list(range(FIRST_SEED, FIRST_SEED + _count()))
    wall = time.perf_counter()
    simulated = 0.0
    kube = 0
    failures: list[str] = []
    skipped: set[str] = set()
    for seed in seeds:
        out = run(generate(seed))
        simulated += out.simulated
        kube += out.scenario.store == "kube"
        skipped.update(out.skipped)
        if out.violations:
            failures.append(out.report())
    wall = time.perf_counter() - wall
    print(
        f"\nsimulation: {len(seeds)} scenarios ({kube} on the Kubernetes store), "
        f"{simulated / 3600:.1f} simulated hours, {wall:.1f}s wall, {len(failures)} failing"
        + (f"; not checked: {', '.join(sorted(skipped))}" if skipped else "")
    )
    assert not failures, f"{len(failures)} of {len(seeds)} scenarios broke a promise:\n\n" + "\n\n".join(
        failures[:20]
    )
