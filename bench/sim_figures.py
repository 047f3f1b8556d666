"""Detection figures from the real controller, in the deterministic simulation (tests/sim).

Two tables, both measured on the production Controller (detection, decide, playbook engine, outbox,
SQLite store) in virtual time, with the configuration models' defaults (http probe every 10 s,
timeout 3 s, failure threshold 3, success threshold 2, a 5-run confirmation burst):

1. False alarms: a target failing a share of its requests at random (both regions) for DAYS
   simulated days; incidents opened and failovers started, scaled to a 30-day month.
2. Time to detect per fault kind: from the fault's start to the incident opening, over PHASES
   starts spread across the probe interval, p50 and p95.

    python bench/sim_figures.py                 # 30 days per rate, 20 phases per kind (~5 min)
    python bench/sim_figures.py --days 3 --phases 8

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

from tests.sim.figures import KIND_LABEL, KINDS, MONTH_DAYS, false_alarms, time_to_detect


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=float, default=30.0, help="simulated days per failure rate")
    ap.add_argument("--phases", type=int, default=20, help="fault starts per kind for time to detect")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    wall = time.perf_counter()
    rates = (0.05, 0.20)
    # spread over the journey's 30 s interval, never twice the same phase of the 10 s one
    phases = [k * 30.0 / args.phases + 0.37 * k for k in range(args.phases)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        alarms = {r: pool.submit(false_alarms, r, args.days) for r in rates}
        detect = {k: [pool.submit(time_to_detect, k, p) for p in phases] for k in KINDS}
        alarm_results = {r: f.result() for r, f in alarms.items()}
        detect_results = {k: [f.result() for f in fs] for k, fs in detect.items()}
    wall = time.perf_counter() - wall

    print("False alarms (real controller, simulated; defaults; a 30-day month):\n")
    print("| requests failing at random | simulated | false incidents / month | false failovers / month |")
    print("|---|---|---|---|")
    for r, (days, inc, fo) in alarm_results.items():
        scale = MONTH_DAYS / days
        print(f"| {r:.0%} | {days:g} days | {inc * scale:.2f} ({inc} seen) | {fo * scale:.2f} ({fo} seen) |")
        record(f"sim: false incidents per month, {r:.0%} random failures", inc * scale, "per month")
        record(f"sim: false failovers per month, {r:.0%} random failures", fo * scale, "per month")
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
    sim_days = sum(d for d, _, _ in alarm_results.values())
    print(
        f"\n{sim_days:g} simulated days of false-alarm runs and {len(KINDS) * len(phases)} outage runs "
        f"in {wall:.0f}s wall ({args.workers} workers)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
