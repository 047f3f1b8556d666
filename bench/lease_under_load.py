"""Lease renewals while the other thread pools are full: the longest gap between two renewals.

A LeaseElector (real kubernetes client, the fake API server of tests/fakes/kubeapi.py) runs for
`--seconds` with retry period 0.3 s while the default executor (2 threads, as a loaded process has
none free) and the playbook actions' pool (`controller.executors.ACTIONS`) are full of calls that do
not return, like a five-minute Aurora wait. The lease's renewTime is read every 20 ms from the fake
API server; the figure is the longest gap between two renewals, once on the elector's own pool
(`LEADER`, the shipped setting) and once on the default executor (how it was before).

    PYTHONPATH=. python bench/lease_under_load.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry

from controller.executors import ACTIONS, LEADER, Pool, run_in
from controller.leader import LeaseElector
from tests.fakes.kubeapi import FakeKubeAPI

TIMING = {"lease_duration": 3.0, "renew_deadline": 2.0, "retry_period": 0.3}


def measure(pool: Pool | None, seconds: float) -> tuple[int, float | None]:
    """(renewals seen, longest gap between two in seconds; None if it never held the lease)."""
    with FakeKubeAPI() as kube:
        api = kube.api_client()
        gate = threading.Event()
        elector = LeaseElector(
            api, "continuity", "bench", "a", registry=CollectorRegistry(), pool=pool, **TIMING
        )

        async def run() -> list[float]:
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
            blocked: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(asyncio.to_thread(gate.wait, 600)) for _ in range(4)
            ]
            blocked += [
                asyncio.ensure_future(run_in(ACTIONS, gate.wait, 600)) for _ in range(ACTIONS.max_workers)
            ]
            stop = asyncio.Event()
            task = asyncio.create_task(elector.run(stop))
            renewals: list[float] = []
            last = None
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await asyncio.sleep(0.02)
                lease = kube.get_object("coordination.k8s.io", "v1", "continuity", "leases", "bench")
                stamp = lease["spec"].get("renewTime") if lease else None
                if stamp and stamp != last:
                    renewals.append(time.monotonic())
                    last = stamp
            stop.set()
            gate.set()
            await asyncio.gather(task, *blocked, return_exceptions=True)
            return renewals

        try:
            seen = asyncio.run(run())
        finally:
            gate.set()
            api.close()
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    return len(seen), (max(gaps) if gaps else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(
        f"retry period {TIMING['retry_period']} s, renew deadline {TIMING['renew_deadline']} s,"
        f" {args.seconds} s per case"
    )
    for label, pool in (("own pool (LEADER)", LEADER), ("default executor", None)):
        n, gap = measure(pool, args.seconds)
        shown = f"{gap:.3f} s" if gap is not None else "never held the lease"
        print(f"{label:<20} renewals {n:>3}  longest gap {shown}")


if __name__ == "__main__":
    main()
