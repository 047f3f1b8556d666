"""Probe inputs: how a probe runs once, and the pushed signals passive probes read.

It exists so that what reaches detection from outside the scheduler's network probes is in one
place: polled kinds go out through the prober (the network edge; the simulation passes its
world's), passive kinds (heartbeat, alertmanager) read the signals jobs and Alertmanager pushed.
Pushes reach the leader only, so the signals are kept in the store and read again at start, by a
standby on every tick (off the loop) and by a new leader.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from controller.config import Config
from controller.executors import STORE, run_in
from controller.stores import Store
from probes import passive
from probes.base import ProbeResult
from probes.passive import PASSIVE_KINDS, Signals

log = structlog.get_logger("continuity.controller")


class InputsHost(Protocol):
    """Read from the controller each time: the config (a reload swaps it), whether this replica
    leads, and where a result goes (the tracker's `ingest`, looked up each time: a test may wrap it)."""

    @property
    def config(self) -> Config: ...
    @property
    def detection(self) -> Ingests: ...
    def may_act(self) -> bool: ...


class Ingests(Protocol):
    def ingest(self, result: ProbeResult) -> None: ...


class ProbeInputs:
    def __init__(
        self,
        host: InputsHost,
        store: Store,
        clock: Callable[[], float],
        prober: Callable[[str, Any], Awaitable[ProbeResult]],
        defer_flag: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.host = host
        self.store = store
        self.defer_flag = defer_flag or store.set_flag
        """How a pushed signal is kept: the controller's `AsyncStore.defer_flag` (written at the next
        tick's flush, never on the loop; a failed write is retried)."""
        self.clock = clock
        self.prober = prober
        """Runs one polled probe (the network edge): the simulation (tests/sim) passes its world's."""
        self.signals = Signals(started_at=clock())

    @property
    def config(self) -> Config:
        return self.host.config  # read each time: a reload takes effect at once

    def may_act(self) -> bool:
        return self.host.may_act()

    def ingest(self, result: ProbeResult) -> None:
        self.host.detection.ingest(result)

    def stored_signals(self) -> tuple[dict[str, str], dict[str, str]]:
        return self.store.flags("heartbeat:"), self.store.flags("alert:")

    async def refresh_signals(self) -> None:
        """A standby's copy of the pushed signals, read off the loop (a sick API must not stall it)."""
        try:
            stored = await run_in(STORE, self.stored_signals)
        except Exception as exc:  # next tick tries again; the leader is unaffected
            log.debug("standby could not refresh pushed signals", error=f"{type(exc).__name__}: {exc}")
            return
        if not self.may_act():  # a leader's own copy is newer than a read that started before it led
            self.load_signals(stored)

    def load_signals(self, stored: tuple[dict[str, str], dict[str, str]] | None = None) -> None:
        """Pushed signals kept in the store: heartbeats jobs sent and alerts still firing (each sent
        only once by Alertmanager). Read at start, by a standby every tick and again on becoming
        leader: pushes reach the leader only, and a standby whose passive probes judged from stale
        signals would, on taking over, resolve the open incident and reopen it (a second page)."""
        heartbeats, alerts = stored if stored is not None else self.stored_signals()
        for key, value in heartbeats.items():
            name = key.removeprefix("heartbeat:")
            self.signals.heartbeats[name] = max(float(value), self.signals.heartbeats.get(name, 0.0))
        # A store written before the bound existed must not blow memory at start.
        stored_alerts = [
            passive.Alert(**json.loads(value)) for value in list(alerts.values())[: passive.MAX_ALERTS]
        ]
        firing = {alert.fingerprint for alert in stored_alerts}
        for fp, alert in list(self.signals.alerts.items()):
            if alert.status == "firing" and fp not in firing:  # resolved while we stood by
                del self.signals.alerts[fp]
        for alert in stored_alerts:
            self.signals.alerts[alert.fingerprint] = alert
            self.signals.seen[(alert.fingerprint, alert.starts_at, alert.status)] = alert.received_at

    async def run_once(self, name: str, cfg: Any) -> ProbeResult:
        """Run a probe once: polled kinds go out on the network, passive ones read pushed signals."""
        if cfg.kind in PASSIVE_KINDS:
            return passive.evaluate(name, cfg, self.signals, self.clock())
        return await self.prober(name, cfg)

    def heartbeat(self, name: str) -> None:
        now = self.clock()
        self.signals.heartbeats[name] = now
        self.defer_flag(f"heartbeat:{name}", repr(now))

    def alertmanager(self, payload: Any) -> tuple[int, int]:
        """Apply an Alertmanager webhook; matching probes are re-evaluated at once."""
        before = dict(self.signals.alerts)
        applied, dupes = passive.apply_alertmanager(self.signals, payload, self.clock())
        for fp, alert in self.signals.alerts.items():
            if before.get(fp) is not alert:  # kept while firing: a restart must not forget it
                firing = alert.status == "firing"
                self.defer_flag(f"alert:{fp}", json.dumps(dataclasses.asdict(alert)) if firing else None)
        if applied:
            for name, cfg in self.config.probes.items():
                if cfg.kind == "alertmanager":
                    self.ingest(passive.evaluate(name, cfg, self.signals, self.clock()))
        return applied, dupes
