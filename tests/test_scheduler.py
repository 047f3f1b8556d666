"""The many-probe scheduler: spread starts, caps honoured, no overlapping runs, prompt stop.

Fake runs (return at once, or sleep) keep these fast and independent of any network.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass

from probes.base import ProbeResult
from probes.scheduler import Scheduler, host_key, offsets


@dataclass
class Cfg:
    url: str
    interval: float


def result(name: str) -> ProbeResult:
    return ProbeResult(probe=name, ok=True, started_at=time.time(), latency=0.0)


def test_offsets_give_each_second_its_fair_share() -> None:
    spread = offsets({f"probe-{i}": 10.0 for i in range(1000)} | {f"x-{i}": 3.0 for i in range(30)})
    starts = Counter(int(v) for k, v in spread.items() if k.startswith("probe-"))
    assert set(starts) == set(range(10))
    assert max(starts.values()) == 100  # 1,000 probes at 10 s: exactly the fair share a second
    assert all(0 <= v < 3.0 for k, v in spread.items() if k.startswith("x-"))
    again = offsets({f"probe-{i}": 10.0 for i in reversed(range(1000))})
    assert all(again[k] == spread[k] for k in again)  # a function of the names, not of their order
    grown = offsets({f"probe-{i}": 10.0 for i in range(1001)})
    assert max(abs(grown[k] - spread[k]) for k in again) <= 10.0 / 1000  # one more probe barely moves


def test_live_starts_are_spread_over_the_interval() -> None:
    """1,000 probes at a 1 s interval (a 10x time-scaled 10 s): no tenth of a second gets a crowd."""
    probes = {f"probe-{i}": Cfg(f"http://10.0.{i % 250}.1/", 1.0) for i in range(1000)}
    starts: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def run(name: str, cfg: Cfg) -> ProbeResult:
            starts.append(loop.time() - t0)
            return result(name)

        stop = asyncio.Event()
        sched = Scheduler(probes, run, lambda r: None, quantum=0)  # each start at its own offset
        task = asyncio.create_task(sched.run(stop))
        await asyncio.sleep(1.0)
        stop.set()
        await task
        assert max(sched.jitter_samples) < 0.1

    asyncio.run(main())
    first_round = [s for s in starts if s < 1.0]
    assert len(first_round) >= 950
    buckets = Counter(int(s * 10) for s in first_round)
    assert max(buckets.values()) <= 115  # fair share is 100 a tenth


def test_runs_start_in_batches_on_the_quantum_grid() -> None:
    probes = {f"p-{i}": Cfg("http://a/", 1.0) for i in range(200)}
    starts: list[float] = []

    async def main() -> Scheduler:
        loop = asyncio.get_running_loop()

        async def run(name: str, cfg: Cfg) -> ProbeResult:
            starts.append(loop.time())
            return result(name)

        stop = asyncio.Event()
        sched = Scheduler(probes, run, lambda r: None, quantum=0.1)
        task = asyncio.create_task(sched.run(stop))
        await asyncio.sleep(1.5)
        stop.set()
        await task
        return sched

    sched = asyncio.run(main())
    assert len(starts) >= 200
    batches = sorted(starts)
    distinct = 1 + sum(1 for a, b in itertools.pairwise(batches) if b - a > 0.02)
    assert distinct <= 17  # about one batch per 0.1 s over 1.5 s, not 200 separate wake-ups
    assert max(sched.jitter_samples) < 0.1 + 0.05
    assert min(sched.jitter_samples) >= 0


def test_per_host_cap_is_honoured() -> None:
    probes = {f"a-{i}": Cfg("http://a.example:8080/health", 0.2) for i in range(200)}
    probes |= {f"b-{i}": Cfg("http://b.example/health", 0.2) for i in range(30)}
    in_flight: Counter[str] = Counter()
    peak: Counter[str] = Counter()

    async def run(name: str, cfg: Cfg) -> ProbeResult:
        key = host_key(cfg)
        in_flight[key] += 1
        peak[key] = max(peak[key], in_flight[key])
        await asyncio.sleep(0.1)
        in_flight[key] -= 1
        return result(name)

    async def main() -> Scheduler:
        stop = asyncio.Event()
        sched = Scheduler(probes, run, lambda r: None, per_host=20)
        task = asyncio.create_task(sched.run(stop))
        await asyncio.sleep(1.0)
        stop.set()
        await task
        return sched

    sched = asyncio.run(main())
    assert peak["a.example:8080"] == 20
    assert 1 <= peak["b.example:80"] <= 20
    assert sched.completed > 100


def test_global_cap_is_honoured() -> None:
    probes = {f"p-{i}": Cfg(f"http://h{i}.example/", 0.2) for i in range(100)}
    state = {"now": 0, "peak": 0}

    async def run(name: str, cfg: Cfg) -> ProbeResult:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.1)
        state["now"] -= 1
        return result(name)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(Scheduler(probes, run, lambda r: None, max_in_flight=7).run(stop))
        await asyncio.sleep(0.6)
        stop.set()
        await task

    asyncio.run(main())
    assert state["peak"] == 7


def test_a_probe_slower_than_its_interval_never_overlaps_itself() -> None:
    probes = {"slow": Cfg("http://a/", 0.05), "fast": Cfg("http://a/", 0.05)}
    running: Counter[str] = Counter()
    overlaps: list[str] = []
    results: list[str] = []

    async def run(name: str, cfg: Cfg) -> ProbeResult:
        running[name] += 1
        if running[name] > 1:
            overlaps.append(name)
        await asyncio.sleep(0.22 if name == "slow" else 0.0)
        running[name] -= 1
        return result(name)

    async def main() -> Scheduler:
        stop = asyncio.Event()
        sched = Scheduler(probes, run, lambda r: results.append(r.probe), quantum=0)
        task = asyncio.create_task(sched.run(stop))
        await asyncio.sleep(1.0)
        stop.set()
        await task
        return sched

    sched = asyncio.run(main())
    assert overlaps == []
    assert 3 <= results.count("slow") <= 5  # about one run per 0.25 s, not one per 0.05 s
    assert results.count("fast") >= 15
    assert sched.skipped >= 10


def test_stop_is_prompt_and_cancels_runs_in_flight() -> None:
    probes = {f"p-{i}": Cfg(f"http://h{i}/", 0.05) for i in range(50)}
    cancelled: list[str] = []

    async def run(name: str, cfg: Cfg) -> ProbeResult:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        return result(name)

    async def main() -> float:
        stop = asyncio.Event()
        sched = Scheduler(probes, run, lambda r: None, quantum=0)
        task = asyncio.create_task(sched.run(stop))
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        stop.set()
        await asyncio.wait_for(task, 1.0)
        return time.perf_counter() - t0

    took = asyncio.run(main())
    assert took < 0.1
    assert len(cancelled) == 50  # every run in flight was stopped, none left behind


def test_stop_while_idle_is_prompt() -> None:
    async def main() -> float:
        stop = asyncio.Event()
        sched = Scheduler({"p": Cfg("http://a/", 3600.0)}, lambda n, c: asyncio.sleep(0), lambda r: None)
        task = asyncio.create_task(sched.run(stop))
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        stop.set()
        await asyncio.wait_for(task, 1.0)
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 0.05


def test_a_raising_run_or_callback_does_not_stop_the_scheduler() -> None:
    seen: list[ProbeResult] = []

    async def run(name: str, cfg: Cfg) -> ProbeResult:
        if name == "bad":
            raise RuntimeError("boom")
        return result(name)

    def on_result(r: ProbeResult) -> None:
        seen.append(r)
        if r.probe == "good":
            raise ValueError("downstream bug")

    async def main() -> None:
        stop = asyncio.Event()
        sched = Scheduler(
            {"bad": Cfg("http://a/", 0.05), "good": Cfg("http://a/", 0.05)}, run, on_result, quantum=0
        )
        task = asyncio.create_task(sched.run(stop))
        await asyncio.sleep(0.3)
        stop.set()
        await task

    asyncio.run(main())
    bad = [r for r in seen if r.probe == "bad"]
    assert len(bad) >= 3 and not bad[0].ok and "RuntimeError: boom" in bad[0].error
    assert sum(r.probe == "good" for r in seen) >= 3


def test_host_key() -> None:
    assert host_key(Cfg("http://Shop.Example/x", 1)) == "shop.example:80"
    assert host_key(Cfg("https://shop.example/x", 1)) == "shop.example:443"
    assert host_key(Cfg("http://{{ host }}/x", 1)) == ""
