"""The tick: reconcile on every tick (or at once when kicked) while leading, and leadership glue.

It exists so that what changes with leadership is in one place: the leader reconciles (observe,
decide, act); a standby only refreshes the pushed signals off the loop and exports service states;
a replica that becomes leader first reads what the previous leader left (cooldowns, runs per
incident, severity floors, runs left running, pushed signals). A bug in one cycle is logged and
counted, and the next cycle runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog

from controller import decide as d
from controller.config import Config
from controller.detect import SERVICE_STATE_VALUE, ServiceHealth
from controller.executors import STORE, run_in
from controller.inputs import ProbeInputs
from controller.leader import Elector
from controller.metrics import Metrics
from controller.runs import Runs

log = structlog.get_logger("continuity.controller")


class TickHost(Protocol):
    """What the tick reads from the controller each time."""

    @property
    def config(self) -> Config: ...
    @property
    def elector(self) -> Elector | None: ...
    @property
    def leadership_hooks(self) -> list[Callable[[bool], None]]: ...
    @property
    def stop_event(self) -> asyncio.Event: ...
    def may_act(self) -> bool: ...
    async def reconcile(self) -> list[d.Decision]: ...
    @property
    def detection(self) -> HealthSource: ...


class HealthSource(Protocol):
    def health(self) -> dict[str, ServiceHealth]: ...


class TickLoop:
    def __init__(
        self,
        host: TickHost,
        clock: Callable[[], float],
        metrics: Metrics,
        runs: Runs,
        inputs: ProbeInputs,
        kick: asyncio.Event,
    ) -> None:
        self.host = host
        self.clock = clock
        self.metrics = metrics
        self.runs = runs
        self.inputs = inputs
        self._kick = kick
        self._refresh_task: asyncio.Task[None] | None = None

    @property
    def config(self) -> Config:
        return self.host.config

    @property
    def elector(self) -> Elector | None:
        return self.host.elector

    @property
    def leadership_hooks(self) -> list[Callable[[bool], None]]:
        return self.host.leadership_hooks

    @property
    def stop_event(self) -> asyncio.Event:
        return self.host.stop_event

    def may_act(self) -> bool:
        return self.host.may_act()

    async def reconcile(self) -> list[d.Decision]:
        return await self.host.reconcile()

    def health(self) -> dict[str, ServiceHealth]:
        return self.host.detection.health()

    def background(self) -> list[asyncio.Task[None]]:
        """The standby's signal refresh in flight, if any: cancelled when the controller stops."""
        return [self._refresh_task] if self._refresh_task is not None else []

    async def run(self) -> None:
        was_leader = False
        while not self.stop_event.is_set():
            try:
                leader = self.may_act()
                if leader != was_leader and self.elector is not None:
                    for hook in self.leadership_hooks:
                        hook(leader)
                if leader and not was_leader and self.elector is not None:
                    await self._became_leader()
                if leader and not was_leader:
                    await self.runs.explain_lost_transitions()
                was_leader = leader
                if leader:
                    await self.reconcile()
                else:
                    # At most one refresh in flight, never awaited here: a sick API must not slow the tick.
                    if self._refresh_task is None or self._refresh_task.done():
                        self._refresh_task = asyncio.create_task(
                            self.inputs.refresh_signals(), name="signals"
                        )
                    for name, h in self.health().items():
                        self.metrics.set_labelled(
                            self.metrics.service_state, name, SERVICE_STATE_VALUE[h.state]
                        )
                    self.metrics.last_tick.set(self.clock())
            except Exception:  # a bug in one cycle must not stop the controller
                log.exception("reconcile failed; the next cycle retries")
                self.metrics.task_restarts.labels("reconcile").inc()
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=self.config.controller.tick)
            except TimeoutError:
                pass

    async def _became_leader(self) -> None:
        """A new leader reads what the previous one left: cooldowns, runs per incident, runs to resume.
        The reads are made on the STORE pool, never on the loop."""
        log.warning("became leader", identity=getattr(self.elector, "identity", None))
        self.runs.last_run_started.clear()
        self.runs.incident_runs.clear()
        self.runs.run_starts.clear()
        self.runs.floors.clear()
        await self.runs.recover()  # runs to take over are decided by the next reconcile
        try:
            self.inputs.load_signals(await run_in(STORE, self.inputs.stored_signals))
        except Exception:  # the store is sick: the signals come back with the next push or tick
            log.exception("could not read pushed signals from the store")
