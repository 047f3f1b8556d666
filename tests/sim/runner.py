"""Run one scenario: the production Controller(s) in virtual time against the world, then the invariants.

Everything inside the controller is the real code: detection, decide, the playbook engine and its
actions, the communicator, the outbox dispatcher and the store (SQLite in a temp dir, or the
KubernetesStore against tests/fakes/kubeapi.py). Only the edges come from tests/sim/edges.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

import controller.stores.model as store_module
import probes.scheduler as scheduler_module
from controller.config import Config
from controller.loop import Controller
from controller.stores import SQLiteStore
from tests.sim import invariants
from tests.sim.edges import (
    ACTOR,
    PD_KEY,
    SLACK_URL,
    ProcessStore,
    SeededSecrets,
    SimAws,
    SimElector,
    SimHttp,
    SimProber,
    patched_network,
)
from tests.sim.scenarios import Scenario, config
from tests.sim.vloop import START, VirtualLoop
from tests.sim.world import World

AGENTS = ("agent-a", "agent-b")


@dataclass
class Outcome:
    scenario: Scenario
    world: World
    violations: list[invariants.Violation]
    simulated: float
    wall: float
    incidents: list[Any] = field(default_factory=list)
    runs: list[Any] = field(default_factory=list)
    outbox: list[Any] = field(default_factory=list)
    timelines: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [self.scenario.describe()]
        lines += [f"VIOLATION {v}" for v in self.violations]
        lines.append(f"replay: python -m pytest tests/test_simulation.py --sim-seed {self.scenario.seed}")
        return "\n".join(lines)


_KUBE: Any = None


def _kube_api() -> Any:
    """One fake API server per test process; every kube scenario gets its own namespace."""
    global _KUBE
    if _KUBE is None:
        from tests.fakes.kubeapi import FakeKubeAPI

        _KUBE = FakeKubeAPI().start()
    return _KUBE


def _quiet_logs() -> None:
    structlog.configure(
        processors=[lambda *_: (_ for _ in ()).throw(structlog.DropEvent)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        cache_logger_on_first_use=False,
    )


class Harness:
    """One run: the loop, the world, the controller processes and the event driver."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.loop = VirtualLoop()
        self.world = World(scenario.seed, START, list(scenario.faults), list(scenario.events))
        self.cfg: Config = config(scenario)
        self.clock = self.loop.time
        self.aws = SimAws(self.world, self.loop.executor, self.clock)
        self.http = SimHttp(self.world, self.loop.executor, self.clock)
        self.tmp = tempfile.mkdtemp(prefix="continuity-sim-")
        self.namespace = f"sim-{scenario.seed}-{random.Random(scenario.seed).randrange(1 << 30)}"
        self.procs: dict[str, Controller] = {}
        """Live controller processes by actor name."""
        self.all_procs: dict[str, Controller] = {}
        self.stores: list[Any] = []
        self.generation: dict[str, int] = {}
        self.stalls: list[tuple[float, float]] = []
        self.ticks: dict[str, list[float]] = {}
        self.reference_store: Any = None

    # ------------------------------------------------------------------ processes

    def _open_store(self) -> Any:
        if self.s.store == "kube":
            from controller.stores.kube import KubernetesStore

            store = KubernetesStore(
                _kube_api().api_client(), self.namespace, request_timeout=5.0, backoff=0.0, max_backoff=0.0
            )
        else:
            store = SQLiteStore(self.tmp)
        self.stores.append(store)
        return store

    def spawn(self, replica: str) -> str:
        """Start a fresh controller process for `replica` (A or B): nothing in memory, same store."""
        n = self.generation.get(replica, 0) + 1
        self.generation[replica] = n
        actor = f"{replica}{n}"
        inner = self._open_store()
        store = ProcessStore(inner, self.world, actor, self.loop.executor, self.clock)
        elector = SimElector(actor, self.world) if self.s.replicas > 1 else None
        ctx = contextvars.copy_context()
        ctx.run(ACTOR.set, actor)

        def build() -> Controller:
            return Controller(
                self.cfg,
                store,  # type: ignore[arg-type]
                clock=self.clock,
                aws=self.aws,
                env=lambda name: PD_KEY,
                elector=elector,
                prober=SimProber(self.world, self.clock),
            )

        ctrl = ctx.run(build)
        # The dispatcher polls every 0.5 s for retries that come due; new messages wake it at once.
        # A 2 s poll changes no outcome by more than 2 s and saves a quarter of the wall time.
        drain_run = ctrl.dispatcher.run
        poll = 60.0 if self.s.lean else 2.0
        ctrl.dispatcher.run = lambda stop, period=0.5: drain_run(stop, period=max(period, poll))  # type: ignore[method-assign]
        ticks = self.ticks.setdefault(actor, [])
        ctrl.tick_hooks.append(lambda now, ticks=ticks: ticks.append(now))
        self.procs[actor] = ctrl
        self.all_procs[actor] = ctrl
        self.loop.create_task(ctrl.start(), context=ctx)
        return actor

    def crash(self, actor: str) -> None:
        """The process dies: its tasks stop where they are, its memory is gone, its edges refuse."""
        ctrl = self.procs.pop(actor, None)
        if ctrl is None:
            return
        self.world.dead.add(actor)
        if self.world.leader == actor:
            self._set_leader(None)
        tasks = [*ctrl._tasks, *ctrl._probe_tasks, *ctrl._burst_tasks, *ctrl.running.values()]
        if getattr(ctrl, "_elector", None) is not None:
            tasks.append(ctrl._elector)
        for t in tasks:
            t.cancel()

    def _set_leader(self, actor: str | None) -> None:
        self.world.leader = actor
        self.world.leadership.append((self.world.rel(self.clock()), actor))

    # ------------------------------------------------------------------ the world's own tasks

    async def driver(self) -> None:
        """Apply crashes, leader changes and loop stalls at their times."""
        for e in sorted(self.s.events, key=lambda e: e.at):
            if e.kind not in ("crash", "leader_change", "loop_stall"):
                continue
            await self._sleep_until(e.at)
            if e.kind == "crash":
                victims = [a for a in self.procs if a.startswith(e.target or "A")] or list(self.procs)[:1]
                if self.world.leader is not None and self.world.leader in self.procs:
                    victims = [self.world.leader]
                for actor in victims:
                    replica = actor.rstrip("0123456789")
                    self.crash(actor)
                    self.loop.create_task(self._restart(replica, e.value))
                    if self.s.replicas > 1:
                        self.loop.create_task(self._handover(e.value / 2))
            elif e.kind == "leader_change":
                self.loop.create_task(self._handover(e.value))
            elif e.kind == "loop_stall":
                self.stalls.append((e.at, e.at + e.value))
                self.loop.executor.charge(e.value)  # on the loop thread: every task waits

    async def _sleep_until(self, rel: float) -> None:
        delay = START + rel - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _restart(self, replica: str, after: float) -> None:
        await asyncio.sleep(after)
        self.spawn(replica)

    async def _handover(self, gap: float) -> None:
        """The lease moves: nobody leads for `gap` seconds (lease expiry), then another replica does."""
        old = self.world.leader
        self._set_leader(None)
        await asyncio.sleep(gap)
        if self.world.leader is not None:
            return
        live = [a for a in self.procs if a != old] or list(self.procs)
        if live:
            self._set_leader(live[0])

    async def agents(self) -> None:
        """Remote vantage points: they probe on their own and post results to every replica."""
        probers = {v: SimProber(self.world, self.clock, vantage=v) for v in AGENTS}

        async def one(v: str, name: str) -> None:
            cfg = self.cfg.probes[name]
            await asyncio.sleep(cfg.interval * (0.3 + 0.2 * AGENTS.index(v)))  # its own phase
            while True:
                result = await probers[v](name, cfg)
                for ctrl in list(self.procs.values()):
                    ctrl.ingest(result)
                await asyncio.sleep(max(cfg.interval - result.latency, 0.1))

        await asyncio.gather(*(one(v, name) for v in AGENTS for name in self.cfg.probes))

    async def monitor(self) -> None:
        """Samples how late a 2 s timer fires: a blocked loop shows here."""
        while True:
            before = self.clock()
            await asyncio.sleep(2.0)
            late = self.clock() - before - 2.0
            self.world.samples.append((self.world.rel(self.clock()), late))

    # ------------------------------------------------------------------ the run

    async def main(self) -> None:
        first = self.spawn("A")
        if self.s.replicas > 1:
            self.spawn("B")
            self._set_leader(first)
        extras = [self.loop.create_task(self.driver())]
        if not self.s.lean:
            extras.append(self.loop.create_task(self.monitor()))
        if self.s.agents:
            extras.append(self.loop.create_task(self.agents()))
        await asyncio.sleep(self.s.duration)
        for t in extras:
            t.cancel()
        await asyncio.gather(*extras, return_exceptions=True)
        for actor, ctrl in list(self.procs.items()):
            ctx = contextvars.copy_context()
            ctx.run(ACTOR.set, actor)
            await self.loop.create_task(_stop(ctrl), context=ctx)

    def run(self) -> Outcome:
        os.environ.setdefault("SIM_SLACK_URL", SLACK_URL)
        random.seed(self.s.seed)
        saved_secrets = store_module.secrets
        store_module.secrets = SeededSecrets(self.s.seed)  # type: ignore[assignment]
        _quiet_logs()
        saved_tick = scheduler_module.STALL_TICK
        if self.s.lean:
            # The scheduler's loop-stall watchdog wakes every 0.1 s: ten timers a virtual second, 70%
            # of a month-long run's wall time. Measurement runs inject no stall; a later wake still
            # notes any stall over its 0.5 s threshold, so only the timer count changes.
            scheduler_module.STALL_TICK = 5.0
        wall = time.perf_counter()
        try:
            with patched_network(self.http):
                self.loop.run_until_complete(self.main())
                # whatever is left (cancelled tasks) winds down in virtual time too
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            wall = time.perf_counter() - wall
            reader = self._open_store()
            out = Outcome(
                self.s,
                self.world,
                [],
                self.s.duration,
                wall,
                incidents=reader.list_incidents(limit=100_000),
                runs=reader.runs(),
                outbox=reader.outbox(include_delivered=True),
            )
            out.steps = {r.id: reader.steps(r.id) for r in out.runs}  # type: ignore[attr-defined]
            out.timelines = {i.id: [e.message for e in reader.timeline(i.id)] for i in out.incidents}
            out.ticks = self.ticks  # type: ignore[attr-defined]
            out.stalls = self.stalls  # type: ignore[attr-defined]
            out.cfg = self.cfg  # type: ignore[attr-defined]
            out.violations, out.skipped = invariants.check(out)
            return out
        finally:
            store_module.secrets = saved_secrets  # type: ignore[assignment]
            scheduler_module.STALL_TICK = saved_tick
            for st in self.stores:
                try:
                    st.close()
                except Exception:
                    pass
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self.s.store == "kube" and _KUBE is not None:
                _forget_namespace(_KUBE, self.namespace)


def _forget_namespace(api: Any, namespace: str) -> None:
    """Drop a finished scenario's objects from the shared fake API server (memory stays flat)."""
    with api._lock:
        for key in [k for k in api._objects if namespace in k]:
            del api._objects[key]
        api.requests.clear()


async def _stop(ctrl: Controller) -> None:
    try:
        await asyncio.wait_for(ctrl.stop(), timeout=120)
    except Exception:
        pass


def run(scenario: Scenario) -> Outcome:
    return Harness(scenario).run()


@dataclass(frozen=True)
class Summary:
    """What a worker process sends back about one scenario (small and picklable)."""

    seed: int
    store: str
    simulated: float
    wall: float
    violations: tuple[str, ...]
    invariants: tuple[str, ...]
    report: str
    skipped: tuple[str, ...]


def summarize(seed: int) -> Summary:
    from tests.sim.scenarios import generate

    out = run(generate(seed))
    return Summary(
        seed,
        out.scenario.store,
        out.simulated,
        out.wall,
        tuple(str(v) for v in out.violations),
        tuple(sorted({v.invariant for v in out.violations})),
        out.report() if out.violations else "",
        tuple(out.skipped),
    )


def run_many(seeds: list[int], workers: int | None = None) -> list[Summary]:
    """Scenarios across worker processes (each run is single-threaded and independent)."""
    workers = workers or min(2, os.cpu_count() or 1)
    if workers <= 1 or len(seeds) < 4:
        return [summarize(s) for s in seeds]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(summarize, seeds, chunksize=4))
