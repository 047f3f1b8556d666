"""The controller: observe -> decide -> act -> record, on one asyncio loop; a composition root.

`Controller` builds the parts, each with one job and its own module, and wires them together:

- `tracker.DetectionTracker`: probe results -> verdicts (quorum, confirmation bursts, prober
  errors, reference targets and cut-off windows);
- `inputs.ProbeInputs`: how a probe runs once, and the pushed signals (heartbeats, Alertmanager);
- `observation.ObservationBuilder`: the one `decide.Observation` of a tick;
- `decide.decide` (pure) turns it into decisions, carried out by
- `effects.Effects` (incidents, pages, the isolation alert) and `runs.Runs` (playbook runs:
  start, approval, resume, ownership, execution);
- `cycle.TickLoop`: the tick while leading, a standby's refresh, the glue of becoming leader;
- `supervise.supervise`: background tasks that restart after a failure.

What remains here is the wiring, the tick's body (`reconcile`: one snapshot, one observation,
`decide`, each decision to the part that carries it out, the tick hooks, one flush) and
start/stop/reload. Callers use the parts directly (`c.detection.health()`, `c.runs.running`,
`c.inputs.heartbeat(...)`); `run_once` stays because it is the tracker's host interface.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog

from controller import decide as d
from controller.aws import client_factory
from controller.comms.communicator import attach
from controller.config import Config, resolve_secret
from controller.cycle import TickLoop
from controller.effects import Effects, pagerduty_channels
from controller.executors import IO, run_in
from controller.inputs import ProbeInputs
from controller.leader import Elector
from controller.metrics import Metrics
from controller.notify.outbox import Dispatcher
from controller.observation import ObservationBuilder
from controller.runs import RUN_DECISIONS, Runs, new_identity
from controller.stores import Store
from controller.stores.aio import AsyncStore
from controller.supervise import supervise
from controller.tracker import DetectionTracker
from playbooks.engine import Engine
from probes import resolve
from probes.base import ProbeResult
from probes.runner import prepare, run_probe
from probes.scheduler import OVERLAP, Scheduler

log = structlog.get_logger("continuity.controller")


FLUSH_WAIT = 0.5
"""How long a reconcile waits for its timeline batch to be written (a store in good health: a few
milliseconds); a longer write carries on in the background."""

STOP_GRACE = 10.0
"""How long a stop waits for the reconcile pass in hand (a store write and its timeline line, a
notice); past it the pass is cancelled so that a held store cannot keep a pod from ending."""


class Controller:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        aws: Callable[[str], Any] | None = None,
        env: Callable[[str], str] = resolve_secret,
        elector: Elector | None = None,
        prober: Callable[[str, Any], Awaitable[ProbeResult]] = run_probe,
    ) -> None:
        self.config = config
        self.elector = elector
        self._elector_stop = asyncio.Event()
        self.astore = AsyncStore(store)
        """The store off the loop: every call awaited on the STORE pool, timeline entries batched and
        written once per tick (controller/stores/aio.py)."""
        self.store: Store = cast(Store, self.astore.batching)
        """The synchronous view (its `append` queues into the tick's batch): for the API, the
        console, the communicator and tests; the decision path uses `astore`."""
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.aws = aws or client_factory(config.aws)
        self._aws_given = aws is not None
        self.identity = getattr(elector, "identity", None) or new_identity()
        """Who owns the runs this process executes (the elector's identity when there is one)."""
        self.engine = Engine(store, self.metrics, clock, owner=self.identity)
        self._kick = asyncio.Event()
        self.detection = DetectionTracker(self, self.store, clock, self.metrics, self._emit, self._kick)
        self.effects = Effects(self, store, clock, self.metrics, self.detection, self._emit, self.astore)
        self.runs = Runs(
            self,
            store,
            clock,
            self.metrics,
            self.engine,
            self.identity,
            self.detection,
            self.effects,
            self._emit,
            self._kick,
            self.astore,
        )
        self.observer = ObservationBuilder(
            self, store, clock, self.detection, self.effects, self.runs, self._emit
        )
        self.task_backoff: tuple[float, float] = (0.5, 30.0)
        """First and longest pause before a failed background task restarts (doubling between)."""
        resolve.configure(config.controller.resolver_nameservers)
        self._prober = prober
        self.inputs = ProbeInputs(self, store, clock, prober, self.astore.defer_flag)
        self.inputs.load_signals()
        self._tasks: list[asyncio.Task[Any]] = []
        self._reconciler: asyncio.Task[None] | None = None
        self._probe_tasks: list[asyncio.Task[Any]] = []
        self._probe_stop = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        """Observers of what the controller does (the demo prints them): (kind, facts)."""
        self.tick_hooks: list[Callable[[float], Awaitable[None] | None]] = []
        """Called with the time at the end of each reconcile (the communicator speaks there); a hook
        that returns an awaitable is awaited (its store work runs on the STORE pool)."""
        self._env = env
        self.leadership_hooks: list[Callable[[bool], None]] = []
        """Called with True when this replica starts leading and False when it stops (pod label)."""
        self.dispatcher = Dispatcher(
            store,
            pagerduty_channels(config, env),
            clock,
            on_event=self.effects.delivery_event,
            first_retry=config.controller.outbox_retry,
        )
        self.dispatcher.may_send = self.may_act
        self.dispatcher.on_error = self.metrics.task_restarts.labels("outbox").inc
        self.runs.recover_from_restart()
        self.cycle = TickLoop(self, clock, self.metrics, self.runs, self.inputs, self._kick)
        self.communicator = attach(self)

    def run_once(self, name: str, cfg: Any) -> Awaitable[ProbeResult]:
        """How a probe runs once (the tracker's confirmation bursts; `inputs` owns it)."""
        return self.inputs.run_once(name, cfg)

    # ------------------------------------------------------------------ decide + act

    async def reconcile(self) -> list[d.Decision]:
        try:
            return await self._reconcile()
        finally:
            # The tick's timeline entries (and pushed signals), even from a cycle that failed; waited
            # for FLUSH_WAIT at most, so that a held store write never delays the next decision.
            await self.astore.flush_within(FLUSH_WAIT)

    async def _reconcile(self) -> list[d.Decision]:
        snap = await self.astore.snapshot()  # the tick's one read, off the loop
        obs = self.observer.observation(snap)
        await self.effects.send_isolation_alerts()
        self.effects.export(obs)
        decisions = d.decide(obs, self.config)
        for decision in decisions:  # runs are started, moved and resumed by `runs`; the rest by `effects`
            part = self.runs if isinstance(decision, RUN_DECISIONS) else self.effects
            await part.act(decision, self.clock())
        for hook in self.tick_hooks:
            if inspect.isawaitable(done := hook(self.clock())):
                await done
        self.metrics.last_tick.set(self.clock())
        self.effects.update_incident_gauge(snap)
        return decisions

    # ------------------------------------------------------------------ record

    def kick(self) -> None:
        """Re-evaluate now (a human answered an approval, paused, acknowledged)."""
        self._kick.set()

    def _emit(self, kind: str, **facts: Any) -> None:
        for listener in self.listeners:
            listener(kind, facts)

    # ------------------------------------------------------------------ the loop

    def may_act(self) -> bool:
        """Only the leader decides, runs playbooks and sends notifications; standbys only probe."""
        return self.elector is None or self.elector.is_leader()

    async def start(self, decide: bool = True) -> None:
        """Start probing; with `decide=False` (a run by hand) nothing is decided automatically."""
        self._start_probes()
        self._tasks = []
        if decide:
            self._reconciler = self._supervise("reconcile", self.cycle.run, self.stop_event)
            self._tasks.append(self._reconciler)
        self._tasks.append(
            self._supervise(
                "outbox", lambda: self.dispatcher.run(self.stop_event, period=0.5), self.stop_event
            )
        )
        self._warm_up()
        if self.elector is not None:
            # Its own stop event: the lease is released only after the step in hand has finished.
            self._elector = asyncio.create_task(self.elector.run(self._elector_stop), name="leader")
        log.info(
            "controller started",
            probes=len(self.config.probes),
            services=len(self.config.services),
            dry_run=self.config.controller.dry_run,
        )

    async def _warm_aws(self) -> None:
        """Build the AWS clients the playbooks' steps will call, now rather than mid-failover: loading
        botocore's service models costs 0.15-0.25 s a client, which the first failover would pay."""
        services = sorted(
            {
                step.action.split(".")[1]
                for playbook in self.config.playbooks.values()
                for step in [*playbook.steps, *playbook.rollback_steps]
                if step.action.startswith("aws.") and step.action.count(".") >= 2
            }
        )
        for service in services:
            try:
                await run_in(IO, self.aws, service)
            except Exception as exc:  # a bad region or endpoint shows when a step runs; here, only a note
                log.warning("could not prepare an AWS client", service=service, error=str(exc))

    async def _warm_probes(self) -> None:
        """Build the http probes' request plans in a worker thread now, rather than one by one in
        the first interval's runs (about 28 us each: 0.56 s of CPU at 20,000 probes)."""
        if self._prober is not run_probe:
            return  # a prober of its own (the simulation's edge) has no plans to build
        try:
            await run_in(IO, prepare, dict(self.config.probes))
        except Exception as exc:  # a probe whose plan cannot be built fails at its run, with its reason
            log.warning("could not prepare the probes' plans", error=str(exc))

    async def reload(self, new: Config) -> None:
        """Swap in a validated config. Probes whose settings did not change keep their history, so a
        reload never resets a failure streak; runs in progress finish with the playbook they started."""
        old = self.config
        channels = pagerduty_channels(new, self._env)  # a missing secret refuses the reload before any change
        self._probe_stop.set()
        for t in self._probe_tasks:
            t.cancel()
        await asyncio.gather(*self._probe_tasks, return_exceptions=True)
        self.config = new
        self.detection.reload(old, new)
        # Notifier channels (added, changed, removed: queued messages of a removed channel wait for its
        # return) and the AWS client factory (runs in progress keep the clients they started with).
        self.dispatcher.channels.clear()
        self.dispatcher.channels.update(channels)
        self.communicator._add_channels()
        self.dispatcher.buckets.clear()
        if new.aws != old.aws and not self._aws_given:
            self.aws = client_factory(new.aws)
        self.dispatcher.wake.set()
        log.info("config reloaded", channels=sorted(self.dispatcher.channels), probes=len(new.probes))
        resolve.configure(new.controller.resolver_nameservers)
        self._start_probes()
        self._kick.set()
        # A new factory, or a playbook that calls a service the old config did not: built now, not by
        # the first failover after the reload (clients already built are kept by the factory).
        self._tasks = [t for t in self._tasks if not t.done()]
        self._warm_up()

    def _warm_up(self) -> None:
        """The AWS clients and the http probes' plans built off the loop, at start and at each reload,
        so that the first failover or probe run after either does not build them."""
        self._tasks.append(asyncio.create_task(self._warm_aws(), name="warm-aws"))
        self._tasks.append(asyncio.create_task(self._warm_probes(), name="warm-probes"))

    def _start_probes(self) -> None:
        """One scheduler for every probe: stable offsets spread over each interval, per-host limits,
        and at most OVERLAP runs of one probe at once (probes/scheduler.py)."""
        self._probe_stop = asyncio.Event()
        self.scheduler = Scheduler(
            dict(self.config.probes),
            self.inputs.run_once,
            self.inputs.ingest,
            per_probe=OVERLAP,
            on_late=self.detection._late,
        )
        stop = self._probe_stop
        self._probe_tasks = [self._supervise("probes", lambda: self.scheduler.run(stop), stop)]

    def _supervise(
        self, name: str, run: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> asyncio.Task[None]:
        """A background task restarted after a failure (controller/supervise.py)."""
        return supervise(name, run, stop, backoff=self.task_backoff, metrics=self.metrics)

    async def stop(self) -> None:
        self.stop_event.set()
        self.dispatcher.wake.set()
        if self._reconciler is not None and not self._reconciler.done():
            # Let the reconcile pass in hand end rather than cancel it between a state written and
            # its line on the timeline (a transition the timeline would never explain); the loop
            # sees stop_event at its next turn.
            self._kick.set()
            await asyncio.wait([self._reconciler], timeout=STOP_GRACE)
        running = [t for t in self.runs.running.values() if not t.done()]
        if running:  # let a playbook step in hand finish rather than cut it in half
            await asyncio.wait(running, timeout=30)
        self._probe_stop.set()
        refresh = self.cycle.background()
        for t in [*self._probe_tasks, *self._tasks, *self.detection._burst_tasks, *refresh]:
            t.cancel()
        await asyncio.gather(
            *self._probe_tasks, *self._tasks, *self.detection._burst_tasks, *refresh, return_exceptions=True
        )
        await self.dispatcher.settle()  # a message sent just before the stop is recorded as sent
        if not await self.astore.close():  # queued timeline entries and pushed signals, retried
            log.error("controller stopped with timeline entries not written (logged one by one above)")
        if self.elector is not None:
            self._elector_stop.set()  # the elector releases the lease so a standby takes over at once
            await asyncio.gather(self._elector, return_exceptions=True)
        log.info("controller stopped")
