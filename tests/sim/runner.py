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
from datetime import UTC, datetime
from typing import Any

import structlog

import controller.stores.model as store_module
import probes.scheduler as scheduler_module
from controller import remote
from controller.config import Config
from controller.loop import Controller
from controller.stores import SQLiteStore
from tests.sim import invariants
from tests.sim.edges import (
    ACTOR,
    PD_KEY,
    SLACK_URL,
    STATUSPAGE_KEY,
    ProcessStore,
    SeededSecrets,
    SimApi,
    SimAws,
    SimElector,
    SimHttp,
    SimLeaseApi,
    SimProber,
    lease_elector,
    patched_network,
)
from tests.sim.scenarios import Scenario, config
from tests.sim.vloop import START, VirtualLoop
from tests.sim.world import World

AGENTS = ("agent-a", "agent-b")
API_TOKEN = "sim-api-token-0123456789"
HEARTBEAT_TOKEN = "sim-heartbeat-token-0123456789"
ENV = {
    "SIM_SLACK_URL": SLACK_URL,
    "SIM_API_TOKEN": API_TOKEN,
    "SIM_HEARTBEAT_TOKEN": HEARTBEAT_TOKEN,
    "SIM_STATUSPAGE_KEY": STATUSPAGE_KEY,
}


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
        self.lease = SimLeaseApi(self.world, self.loop.executor, self.clock)
        self.apis: dict[str, SimApi] = {}
        """The real API app of each live process (pushes and approvals go through it)."""
        self.prober_metric: dict[str, float] = {}

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
        ctx = contextvars.copy_context()
        ctx.run(ACTOR.set, actor)
        elector: Any = None
        if self.s.replicas > 1:
            elector = ctx.run(lease_elector, actor, self.lease, self.clock) if self.s.lease else None
            elector = elector or SimElector(actor, self.world)

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
        world = self.world

        def own_alert(kind: str, facts: dict[str, Any], actor: str = actor) -> None:
            if kind == "prober_error":
                world.own_alerts.append((world.rel(self.clock()), actor, str(facts.get("prober_error"))))

        ctrl.listeners.append(own_alert)
        if self.s.pushes or self.s.approval:
            self.apis[actor] = ctx.run(SimApi, ctrl)
        self.procs[actor] = ctrl
        self.all_procs[actor] = ctrl
        self.loop.create_task(ctrl.start(), context=ctx)
        return actor

    def crash(self, actor: str) -> None:
        """The process dies: its tasks stop where they are, its memory is gone, its edges refuse."""
        ctrl = self.procs.pop(actor, None)
        self.apis.pop(actor, None)
        if ctrl is None:
            return
        self.world.dead.add(actor)
        if self.world.leader == actor and not self.s.lease:  # a Lease outlives its holder
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
                    if self.s.replicas > 1 and not self.s.lease:
                        self.loop.create_task(self._handover(e.value / 2))
            elif e.kind == "leader_change" and self.s.lease:
                # The holder is cut off from the API server (not from anything else) for 3x the gap:
                # 3-45 s, short ones inside the renew deadline, long ones past the lease's expiry.
                holder = self.world.leader or next(iter(self.procs), "")
                self.lease.partitions.append((holder, e.at, e.at + 3 * e.value))
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
                if self.s.pushes:
                    await self._post_result(v, result)
                else:
                    for ctrl in list(self.procs.values()):
                        ctrl.ingest(result)
                await asyncio.sleep(max(cfg.interval - result.latency, 0.1))

        polled = [n for n, c in self.cfg.probes.items() if c.kind not in ("heartbeat", "alertmanager")]
        await asyncio.gather(*(one(v, name) for v in AGENTS for name in polled))

    async def _post_result(self, vantage: str, result: Any) -> None:
        """An agent POSTs its result to /results of every replica, with the API token; a skewed
        clock (the world's `agent_skew`) stamps it in the past (stale) or the future."""
        skew = self.world.event_active("agent_skew", self.world.rel(self.clock()), vantage)
        wire = remote.to_wire(result)
        if skew is not None:
            wire["started_at"] = result.started_at + skew.value
        for actor, api in list(self.apis.items()):
            ctrl = self.procs.get(actor)
            if ctrl is None:
                continue
            now = ctrl.clock()
            ahead = wire["started_at"] - now
            may_vote = ahead <= remote.CLOCK_SKEW and now - wire["started_at"] <= self.cfg.freshness(
                result.probe
            )
            status, answer = await api.call("POST", "/results", {"results": [wire]}, API_TOKEN)
            accepted = int((answer or {}).get("accepted", 0)) if status == 200 else 0
            self.world.result_posts.append((self.world.rel(now), actor, vantage, ahead, may_vote, accepted))

    # ------------------------------------------------------------------ pushed inputs and humans

    def _leaders(self) -> list[tuple[str, SimApi]]:
        """Where a push lands: the replica that leads (the Service selects the leader's pod)."""
        return [(a, api) for a, api in list(self.apis.items()) if a in self.procs and self.procs[a].may_act()]

    async def _push(self, who: str, endpoint: str, path: str, body: Any, token: str | None) -> int:
        status = 503
        for _actor, api in self._leaders():
            status, _ = await api.call("POST", path, body, token, remote=f"10.9.0.{len(who)}")
        self.world.pushes.append((self.world.rel(self.clock()), endpoint, who, status))
        return status

    def _alerts(self, t: float) -> list[dict[str, Any]]:
        """What Alertmanager sends about `payments`: each outage firing while it lasts, then resolved
        (Alertmanager keeps notifying resolved alerts for its resolve_timeout)."""
        out = []
        for f in self.world.faults:
            if f.kind != "payments_down" or t < f.start or t > f.end + 300:
                continue
            out.append(
                {
                    "status": "firing" if t < f.end else "resolved",
                    "labels": {"alertname": "PaymentsDown", "service": "payments"},
                    "annotations": {"summary": "payment provider failing"},
                    "startsAt": _rfc3339(self.world.t0 + f.start),
                    "endsAt": _rfc3339(self.world.t0 + f.end) if t >= f.end else "0001-01-01T00:00:00Z",
                    "fingerprint": f"payments-{f.start:.0f}",
                }
            )
        return out

    @staticmethod
    def _payload(alerts: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "version": "4",
            "groupKey": '{}:{service="payments"}',
            "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
            "receiver": "continuity",
            "alerts": alerts,
        }

    async def alertmanager(self) -> None:
        """The real Alertmanager's webhook, with the bearer token, every 30 s while it has alerts."""
        while True:
            await asyncio.sleep(30.0)
            alerts = self._alerts(self.world.rel(self.clock()))
            if alerts:
                await self._push(
                    "alertmanager", "alertmanager", "/alertmanager", self._payload(alerts), API_TOKEN
                )

    async def heartbeat_job(self) -> None:
        """The worker's job checks in every 30 s while it runs (the world's `worker_down` stops it);
        a refused or lost check-in is retried after 10 s."""
        await asyncio.sleep(5.0)
        while True:
            t = self.world.rel(self.clock())
            if self.world.active("worker_down", t):
                await asyncio.sleep(10.0)
                continue
            status = await self._push(
                "worker", "heartbeat", "/heartbeat/worker-heartbeat", {}, HEARTBEAT_TOKEN
            )
            await asyncio.sleep(30.0 if status == 200 else 10.0)

    async def attacker(self) -> None:
        """During `forged_push` windows, someone who reaches the port but holds no token: a firing
        payments alert, a worker heartbeat, an approval of any waiting run and a forged passing
        result, each without a token or with a wrong one."""
        n = 0
        while True:
            await asyncio.sleep(20.0)
            t = self.world.rel(self.clock())
            if not self.world.event_active("forged_push", t):
                continue
            n += 1
            token = None if n % 2 else "guessed-token"
            alert = {
                "status": "firing",
                "labels": {"alertname": "PaymentsDown", "service": "payments"},
                "annotations": {"summary": "forged"},
                "startsAt": _rfc3339(self.clock() - 60),
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": f"forged-{n}",
            }
            await self._push("attacker", "alertmanager", "/alertmanager", self._payload([alert]), token)
            await self._push("attacker", "heartbeat", "/heartbeat/worker-heartbeat", {}, token)
            forged = {
                "probe": "checkout-api",
                "ok": True,
                "started_at": self.clock(),
                "latency": 0.01,
                "reason": "",
                "vantage": "agent-a",
                "details": {},
            }
            await self._push("attacker", "results", "/results", {"results": [forged]}, token)
            for run_id in await self._awaiting():
                await self._push("attacker", "approve", f"/runs/{run_id}/approve", {"by": "mallory"}, token)

    async def _awaiting(self) -> list[str]:
        """Runs awaiting approval, as `GET /runs` (read-only, open) shows them."""
        for actor, api in list(self.apis.items()):
            if actor in self.procs:
                try:
                    status, runs = await api.call("GET", "/runs")
                except Exception:  # the store is failing: the page shows an error; look again later
                    return []
                if status == 200 and isinstance(runs, list):
                    return [r["id"] for r in runs if r.get("state") == "awaiting_approval"]
        return []

    async def approver(self) -> None:
        """The human on call: sees a run awaiting approval (the page says so) and, 45 s later,
        approves or rejects it through the API with the token, or never answers (it must expire)."""
        first_seen: dict[str, float] = {}
        answered: set[str] = set()
        while True:
            await asyncio.sleep(15.0)
            now = self.clock()
            for run_id in await self._awaiting():
                first_seen.setdefault(run_id, now)
                if run_id in answered or now - first_seen[run_id] < 45.0 or self.s.approval == "never":
                    continue
                verb = "approve" if self.s.approval == "approve" else "reject"
                status = await self._push(
                    "human", verb, f"/runs/{run_id}/{verb}", {"by": "oncall", "reason": "sim"}, API_TOKEN
                )
                if status == 200:
                    answered.add(run_id)
                    self.world.approvals.append((self.world.rel(now), run_id, verb))

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
            if not self.s.lease:  # with the Lease, the electors decide
                self._set_leader(first)
        extras = [self.loop.create_task(self.driver())]
        if not self.s.lean:
            extras.append(self.loop.create_task(self.monitor()))
        if self.s.agents:
            extras.append(self.loop.create_task(self.agents()))
        if self.s.pushes:
            extras += [
                self.loop.create_task(self.alertmanager()),
                self.loop.create_task(self.heartbeat_job()),
                self.loop.create_task(self.attacker()),
            ]
        if self.s.approval:
            extras.append(self.loop.create_task(self.approver()))
        await asyncio.sleep(self.s.duration)
        for t in extras:
            t.cancel()
        ended = await asyncio.gather(*extras, return_exceptions=True)
        broken = [e for e in ended if isinstance(e, Exception)]
        if broken:  # a world task died: the run did not simulate what it says
            raise RuntimeError(f"simulated world task failed: {broken[0]!r}") from broken[0]
        for actor, ctrl in list(self.procs.items()):
            ctx = contextvars.copy_context()
            ctx.run(ACTOR.set, actor)
            await self.loop.create_task(_stop(ctrl), context=ctx)

    def run(self) -> Outcome:
        for name, value in ENV.items():
            os.environ[name] = value
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
            out.prober_metric = _prober_metric(self.all_procs.values())  # type: ignore[attr-defined]
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


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _prober_metric(procs: Any) -> dict[str, float]:
    """continuity_prober_errors_total by kind, summed over every process of the run."""
    totals: dict[str, float] = {}
    for ctrl in procs:
        for metric in ctrl.metrics.prober_errors.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    kind = sample.labels.get("kind", "?")
                    totals[kind] = totals.get(kind, 0.0) + sample.value
    return totals


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
    cpu: float = 0.0
    """CPU seconds the run took in its worker (the budget on a loaded machine, where wall time lies)."""
    features: tuple[str, ...] = ()


def summarize(seed: int) -> Summary:
    from tests.sim.scenarios import generate

    scenario = generate(seed)
    cpu = time.process_time()
    out = run(scenario)
    cpu = time.process_time() - cpu
    features = tuple(
        name
        for name, on in (
            ("pushes", scenario.pushes),
            ("comms", scenario.comms),
            ("lease", scenario.lease),
            (f"approval={scenario.approval}", bool(scenario.approval)),
        )
        if on
    )
    return Summary(
        seed,
        out.scenario.store,
        out.simulated,
        out.wall,
        tuple(str(v) for v in out.violations),
        tuple(sorted({v.invariant for v in out.violations})),
        out.report() if out.violations else "",
        tuple(out.skipped),
        cpu,
        features,
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
