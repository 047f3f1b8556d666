"""One scheduler for every probe, instead of one sleeping task per probe.

Why: at 20,000 probes a task per probe means 20,000 timers re-armed every interval, no way to cap
how many connections are open at once, and nothing that stops a thousand probes of the same
backend from opening a thousand connections to it in the same instant. A single heap of due
times gives all three: starts spread over the interval by a stable per-probe offset, a global cap
and a per-host cap on runs in flight, and one place that measures how late each run started.

Rules:
- A probe's slots are a fixed grid, `offset + k * interval` on the scheduler's clock: a late run
  never shifts later ones (no drift). Offsets come from the names (crc32 order, evenly spaced;
  see `offsets`), so they are the same across restarts and every second gets its fair share.
- Bounded overlap per probe (`per_probe`, 1 by default; the controller passes OVERLAP): a slot that
  comes due while earlier runs of the probe are still talking to the target starts another run, up
  to `per_probe` in flight, so a hanging target's runs never queue behind each other's timeouts
  (issue 10: with one run at a time, interval 1 s and timeout 3 s, a hang took 15 s to be DOWN
  against 3 s for a refusal). A slot is skipped and counted when the probe already has `per_probe`
  runs in flight, or one still waiting for a cap (that lateness is ours, not the target's).
- Results are delivered in start order: a later run that answers first waits for the earlier ones,
  so detection sees the same sequence it would have seen one run at a time.
- A run still in flight when its probe's next slot comes due (it has been talking to the target for
  a whole interval) is reported to `on_late`: a suspicion, never a failure by itself. The controller
  starts its confirmation burst there instead of waiting a full timeout for the first failure.
- Runs start on a grid of `quantum` seconds (100 ms by default), in batches: see DEFAULT_QUANTUM.
- Start-time jitter is measured when the run actually starts, after waiting for the caps, because
  that is the lateness a user sees.
- A prober's failure is not the target's: a watchdog wakes every STALL_TICK and notes when the event
  loop was blocked for `stall` seconds or more; a run that FAILED while such a stall overlapped it
  (a timeout that fired because the loop could not read the answer) is marked
  `prober_error="loop_stall"`, so detection counts it as UNKNOWN. A pass is a pass, stall or not.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import structlog

from probes.base import ProbeResult, failure

log = structlog.get_logger("continuity.scheduler")

#: Per host:port, how many runs may be in flight at once; 50 keeps us a polite client of any one
#: backend even when hundreds of probes point at it.
DEFAULT_PER_HOST = 50
#: Runs of one probe in flight at once when the controller asks for overlap: a 3 s timeout at a 1 s
#: interval needs 3; more than 4 would only pile connections onto a target that does not answer.
OVERLAP = 4
#: Across all probes: 20,000 probes at 30 s with a 3 s timeout against hung targets would be about
#: 2,000 in flight; more than that means the controller itself is the bottleneck.
DEFAULT_MAX_IN_FLIGHT = 2000
#: Runs are dispatched on a grid of this many seconds: everything due within one quantum starts
#: together. Measured (uvloop, 667 probes/s to a local nginx, CPU per probe): about 390 us waking
#: for each probe alone, 200 us on a 50 ms grid, 190 us on a 100 ms grid, because the event loop's
#: per-iteration cost (epoll_wait, timers) is shared by the batch. It adds at most 100 ms of start
#: jitter, well inside the 1 s budget.
DEFAULT_QUANTUM = 0.1
#: Jitter samples kept for metrics (a ring: the latest ones).
DEFAULT_SAMPLES = 100_000
#: How often the loop-stall watchdog wakes, and how late it must wake to call it a stall: a
#: blocked loop for half a second can time out a healthy probe with a sub-second budget.
STALL_TICK = 0.1
DEFAULT_STALL = 0.5


class _Cap:
    """A FIFO counting semaphore whose acquire and release cost O(1) however many wait.

    Why not asyncio.Semaphore: on Python 3.11 its `locked()` scans every waiter on each
    `acquire()`, and `release()` walks the woken-but-not-yet-running ones, so a burst of runs
    queued behind the per-host cap costs quadratic time. Profiled at 20,000 probes on one host,
    that was about a seventh of the prober's CPU. Here a release hands its slot straight to the
    oldest waiter, so nobody can overtake the queue.
    """

    __slots__ = ("free", "waiters")

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.free > 0:  # nobody waits while a slot is free: release hands slots over directly
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            else:
                self.waiters.remove(fut)
            raise

    def release(self) -> None:
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes to the oldest waiter, never back to `free`
                return
        self.free += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def offsets(intervals: dict[str, float]) -> dict[str, float]:
    """Start offset of each probe in [0, its interval): crc32 order, evenly spaced.

    Why not `crc32(name) / 2**32 * interval` alone: a hash spreads names only statistically, and
    names like `probe-1..probe-1000` are far from random for crc32 (which is linear): measured,
    1,000 such probes at 10 s put 133 starts in the busiest second and 64 in the quietest. Ranking
    the probes of one interval by crc32 and spacing them evenly gives every second its fair share
    exactly, while keeping each offset a function of the names alone: the same across restarts,
    and adding or removing k probes moves the others by at most k * interval / n.
    """
    groups: dict[float, list[tuple[int, str]]] = {}
    for name, interval in intervals.items():
        groups.setdefault(interval, []).append((zlib.crc32(name.encode()), name))
    out: dict[str, float] = {}
    for interval, members in groups.items():
        members.sort()
        n = len(members)
        for rank, (_, name) in enumerate(members):
            out[name] = rank / n * interval
    return out


def host_key(cfg: Any) -> str:
    """`host:port` a probe talks to (its URL, or its first step's), for the per-host cap."""
    url = getattr(cfg, "url", None)
    if url is None:
        steps = getattr(cfg, "steps", None) or []
        url = getattr(steps[0], "url", None) if steps else None
    if not isinstance(url, str) or "{{" in url:
        return ""  # unknown until templated: only the global cap applies
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return ""
    return f"{(parts.hostname or '').lower()}:{port}"


class Scheduler:
    """Runs many probes from one heap; see the module docstring for the rules."""

    def __init__(
        self,
        probes: dict[str, Any],
        run: Callable[[str, Any], Awaitable[ProbeResult]],
        on_result: Callable[[ProbeResult], None],
        clock: Callable[[], float] | None = None,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        per_host: int = DEFAULT_PER_HOST,
        samples: int = DEFAULT_SAMPLES,
        quantum: float = DEFAULT_QUANTUM,
        stall: float = DEFAULT_STALL,
        per_probe: int = 1,
        on_late: Callable[[str], None] | None = None,
    ) -> None:
        self.probes = probes
        self._run = run
        self._on_result = on_result
        self._clock = clock
        self._global = _Cap(max_in_flight)
        self._per_host_limit = per_host
        self._quantum = quantum
        self._hosts: dict[str, _Cap] = {}
        self._host_of = {name: host_key(cfg) for name, cfg in probes.items()}
        self._heap: list[tuple[float, int, str]] = []
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {}
        self._per_probe = max(1, per_probe)
        self._on_late = on_late
        self._waiting: dict[str, int] = {}
        """Runs of each probe not yet started (waiting for a cap)."""
        self._seq: dict[str, int] = {}
        self._next: dict[str, int] = {}
        self._done: dict[str, dict[int, ProbeResult | None]] = {}
        """Finished runs waiting for an earlier run of the same probe: results go out in start order."""
        #: Actual start minus scheduled start, in seconds, of the latest runs.
        self.jitter_samples: deque[float] = deque(maxlen=samples)
        self.started = 0
        self.completed = 0
        self.skipped = 0  # slots skipped because the probe's previous run was still in flight
        self.stall = stall
        #: (from, to) on the scheduler's clock of the latest loop stalls the watchdog saw.
        self.stalls: deque[tuple[float, float]] = deque(maxlen=64)
        self._beat: float | None = None

    def _host_sem(self, name: str) -> _Cap | None:
        key = self._host_of.get(name, "")
        if not key:
            return None
        sem = self._hosts.get(key)
        if sem is None:
            sem = self._hosts[key] = _Cap(self._per_host_limit)
        return sem

    def _deliver(self, name: str, seq: int, result: ProbeResult | None) -> None:
        """Hand results to `on_result` in start order (None: a run that ended without one)."""
        if seq == self._next.get(name, 0) and not self._done.get(name):
            # The common case (one run at a time, or the earliest of several): nothing to reorder.
            self._next[name] = seq + 1
            self._hand(name, result)
            return
        done = self._done.setdefault(name, {})
        done[seq] = result
        nxt = self._next.get(name, 0)
        while nxt in done:
            self._hand(name, done.pop(nxt))
            nxt += 1
        self._next[name] = nxt

    def _hand(self, name: str, result: ProbeResult | None) -> None:
        if result is None:
            return
        try:
            self._on_result(result)
        except Exception:  # a bug downstream must not stop the probing
            log.exception("on_result raised", probe=name)

    async def _one(self, name: str, cfg: Any, due: float, clock: Callable[[], float], seq: int = 0) -> None:
        host = self._host_sem(name)
        result: ProbeResult | None = None
        waiting = True
        self._waiting[name] = self._waiting.get(name, 0) + 1
        try:
            async with self._global:
                if host is not None:
                    await host.acquire()
                try:
                    self._waiting[name] -= 1
                    waiting = False
                    began = clock()
                    self.jitter_samples.append(began - due)
                    self.started += 1
                    try:
                        result = await self._run(name, cfg)
                    except Exception as exc:  # the runner should never raise; if it does, it is a failure
                        log.exception("probe run raised", probe=name)
                        result = failure(name, time.time(), 0.0, f"probe error: {type(exc).__name__}: {exc}")
                    if not result.ok and result.prober_error is None:
                        stalled = self.stalled_during(began, clock())
                        if stalled:
                            result = replace(
                                result,
                                prober_error="loop_stall",
                                error=f"{result.reason or result.error} (our event loop was blocked for "
                                f"{stalled:.1f}s during the run: not the target's failure)",
                            )
                finally:
                    if host is not None:
                        host.release()
            self.completed += 1
        finally:
            if waiting:
                self._waiting[name] -= 1
            tasks = self._in_flight.get(name)
            if tasks is not None:
                tasks.discard(asyncio.current_task())
                if not tasks:
                    del self._in_flight[name]
            self._deliver(name, seq, result)

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch due runs until `stop` is set; then cancel the runs in flight and return."""
        loop = asyncio.get_running_loop()
        clock = self._clock or loop.time
        now = clock()
        spread = offsets({n: c.interval for n, c in self.probes.items()})
        self._heap = [(now + spread[n], i, n) for i, n in enumerate(self.probes)]
        heapq.heapify(self._heap)
        wake: asyncio.Future[None] | None = None

        def _wake(_: object = None) -> None:
            if wake is not None and not wake.done():
                wake.set_result(None)

        stopper = loop.create_task(stop.wait())
        stopper.add_done_callback(_wake)
        watchdog = loop.create_task(self._watch(stop, clock)) if self.stall > 0 else None
        heap = self._heap
        try:
            while not stop.is_set():
                now = clock()
                while heap and heap[0][0] <= now:
                    due, seq, name = heapq.heappop(heap)
                    cfg = self.probes[name]
                    interval = cfg.interval
                    flying = self._in_flight.get(name)
                    if flying and self._waiting.get(name, 0):
                        self.skipped += 1  # its last run still waits for a cap: our lateness
                    elif flying and len(flying) >= self._per_probe:
                        self.skipped += 1
                        self._late(name)
                    else:
                        if flying:
                            self._late(name)
                        run_seq = self._seq.get(name, 0)
                        self._seq[name] = run_seq + 1
                        task = loop.create_task(self._one(name, cfg, due, clock, run_seq))
                        self._in_flight.setdefault(name, set()).add(task)
                    nxt = due + interval
                    if nxt <= now:  # the scheduler itself fell a whole interval behind: skip ahead
                        missed = int((now - nxt) // interval) + 1
                        self.skipped += missed
                        nxt += missed * interval
                    heapq.heappush(heap, (nxt, seq, name))
                if not heap:
                    await stop.wait()
                    break
                wake = loop.create_future()
                due = heap[0][0]
                if self._quantum > 0:  # round up to the dispatch grid (see DEFAULT_QUANTUM)
                    due = math.ceil(due / self._quantum) * self._quantum
                timer = loop.call_at(loop.time() + max(0.0, due - clock()), _wake)
                await wake
                timer.cancel()
        finally:
            stopper.cancel()
            if watchdog is not None:
                watchdog.cancel()
            tasks = [t for ts in self._in_flight.values() for t in ts]
            for t in tasks:
                t.cancel()
            await asyncio.gather(stopper, *tasks, *([watchdog] if watchdog else []), return_exceptions=True)

    def _late(self, name: str) -> None:
        if self._on_late is None:
            return
        try:
            self._on_late(name)
        except Exception:  # a bug downstream must not stop the probing
            log.exception("on_late raised", probe=name)

    async def _watch(self, stop: asyncio.Event, clock: Callable[[], float]) -> None:
        """Note every stretch in which the loop could not run us for `stall` seconds or more."""
        while not stop.is_set():
            self._beat = before = clock()
            await asyncio.sleep(STALL_TICK)
            after = clock()
            if after - before - STALL_TICK >= self.stall:
                self.stalls.append((before, after))
                log.warning("event loop stalled", seconds=round(after - before - STALL_TICK, 2))

    def stalled_during(self, began: float, ended: float) -> float:
        """Seconds of the longest loop stall overlapping [began, ended] (0.0: none). A stall still
        going on (the watchdog has not woken yet) counts from its last beat."""
        worst = 0.0
        for start, end in self.stalls:
            if start <= ended and end >= began:
                worst = max(worst, end - start - STALL_TICK)
        if self._beat is not None and ended - self._beat - STALL_TICK >= self.stall:
            worst = max(worst, ended - self._beat - STALL_TICK)
        return worst
