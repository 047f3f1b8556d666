"""Detection figures from the real controller, in the deterministic simulation (tests/sim).

Two tables, both measured on the production Controller (detection, decide, playbook engine, outbox,
SQLite store) in virtual time, with the configuration models' defaults (http probe every 10 s,
timeout 3 s, failure threshold 3, success threshold 2, a 5-run confirmation burst):

1. False alarms: a target failing a share of its requests at random (both regions) for MONTHS
   independent simulated 30-day months per rate (seeds 1..MONTHS); incidents opened and failovers
   started, counted, as a rate per month with its exact 95% Poisson confidence interval (a rate
   resting on one or two events says little: the interval says how little).
2. Time to detect per fault kind: from the fault's start to the incident opening, over PHASES
   starts spread across the probe interval, p50 and p95.

    python bench/sim_figures.py                          # 1 month per rate, 20 phases per kind
    python bench/sim_figures.py --months 12 --rates 0.2 --phases 0   # the long mode: 20% only
    python bench/sim_figures.py --days 3 --phases 8               # a quick look (3 days per rate)

Virtual time is cheap but not free: a simulated day costs about 9 CPU-seconds (a probe every 10 s).

Runs the two rates and the detection runs on up to two worker processes; prints the wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from figures import record  # bench/, this script's own directory

from tests.sim.figures import KIND_LABEL, KINDS, MONTH_DAYS, false_alarms, poisson_ci, time_to_detect


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--months", type=int, default=1, help="independent simulated 30-day months per rate")
    ap.add_argument("--days", type=float, default=None, help="instead of --months: one run of DAYS per rate")
    ap.add_argument("--first-seed", type=int, default=1, help="seed of the first simulated month")
    ap.add_argument("--rates", default="0.05,0.2", help="comma-separated shares of requests failing")
    ap.add_argument("--phases", type=int, default=20, help="fault starts per kind (0: skip)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    wall = time.perf_counter()
    rates = tuple(float(r) for r in args.rates.split(",") if r.strip())
    chunks = (
        [(args.days, 1)]
        if args.days
        else [(MONTH_DAYS, seed) for seed in range(args.first_seed, args.first_seed + args.months)]
    )
    # spread over the journey's 30 s interval, never twice the same phase of the 10 s one
    phases = [k * 30.0 / args.phases + 0.37 * k for k in range(args.phases)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        alarms = {r: [pool.submit(false_alarms, r, days, seed) for days, seed in chunks] for r in rates}
        detect = {k: [pool.submit(time_to_detect, k, p) for p in phases] for k in KINDS} if phases else {}
        for r, fs in alarms.items():  # each month as it finishes: a long run shows progress
            for (days, seed), f in zip(chunks, fs, strict=True):
                _, inc, fo = f.result()
                print(f"rate {r:.0%} seed {seed}: {days:g} days, {inc} incidents, {fo} failovers", flush=True)
        alarm_results = {r: [f.result() for f in fs] for r, fs in alarms.items()}
        detect_results = {k: [f.result() for f in fs] for k, fs in detect.items()}
    wall = time.perf_counter() - wall

    print("False alarms (real controller, simulated; defaults; a 30-day month; exact Poisson 95% CI):\n")
    print(
        "| requests failing at random | simulated months | false incidents (counted) / month [95% CI] "
        "| false failovers (counted) / month [95% CI] |"
    )
    print("|---|---|---|---|")
    for r, parts in alarm_results.items():
        months = sum(d for d, _, _ in parts) / MONTH_DAYS
        inc = sum(i for _, i, _ in parts)
        fo = sum(f for _, _, f in parts)

        def cell(n: int, months: float = months) -> str:
            lo, hi = poisson_ci(n, months)
            return f"{n / months:.2f} ({n}) [{lo:.2f}, {hi:.2f}]"

        print(f"| {r:.0%} | {months:g} | {cell(inc)} | {cell(fo)} |")
        record(f"sim: false incidents per month, {r:.0%} random failures", inc / months, "per month")
        record(f"sim: false failovers per month, {r:.0%} random failures", fo / months, "per month")
        pairs = zip(chunks, parts, strict=True)
        per_run = ", ".join(f"seed {seed}: {i}/{f}" for (_, seed), (_, i, f) in pairs)
        print(f"<!-- {r:.0%}: incidents/failovers per simulated month: {per_run} -->")
    if detect_results:
        print("\nTime to detect: fault start -> incident opened (seconds):\n")
        print("| fault | p50 | p95 | runs | never opened |")
        print("|---|---|---|---|---|")
        for k in KINDS:
            got = [x for x in detect_results[k] if x is not None]
            missed = len(detect_results[k]) - len(got)
            if got:
                p50, p95 = statistics.median(got), _pct(got, 0.95)
                print(f"| {KIND_LABEL[k]} | {p50:.1f} | {p95:.1f} | {len(got)} | {missed} |")
                record(f"sim: time to detect p50, {KIND_LABEL[k]}", p50, "s")
                record(f"sim: time to detect p95, {KIND_LABEL[k]}", p95, "s")
            else:
                print(f"| {KIND_LABEL[k]} | - | - | 0 | {missed} |")
    sim_days = sum(d for parts in alarm_results.values() for d, _, _ in parts)
    print(
        f"\n{sim_days:g} simulated days ({sim_days / MONTH_DAYS:g} months) of false-alarm runs and "
        f"{len(KINDS) * len(phases)} outage runs in {wall:.0f}s wall ({args.workers} workers)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
