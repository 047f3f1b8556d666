"""The observation: what `decide` sees on one tick, built in one place.

It exists so that the question "what did the controller know when it decided?" has one answer:
every service's health from the detection tracker, its open incident with its severity floor and
runs so far, the persisted failover states and the runs they name, cooldowns, the cap on runs per
hour, pause, freezes, silences and maintenance windows, and the reference targets' verdict. It also
keeps the cut-off windows and the isolation alert current before each read (they change what the
observation says). One `d.Observation` per tick; the decision is `decide`'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from controller import decide as d
from controller.comms import commands as requests_
from controller.config import Config
from controller.effects import Effects
from controller.runs import Runs
from controller.stores import Store
from controller.stores.aio import Snapshot, read_snapshot
from controller.tracker import DetectionTracker

log = structlog.get_logger("continuity.controller")


def resolve_requests(snap: Snapshot) -> dict[str, str]:
    """Incident id -> who asked to resolve it, from the humans' pending requests (their flags; the
    communicator drops each once the incident is resolved and its resolution announced). Requests
    apply in the order given: a resolve counts only once the requests before it about the same
    incident (an ack, a hand-over, an update) have been applied by the communicator."""
    first: dict[str, dict[str, object]] = {}
    for _, value in sorted(snap.flags(requests_.PREFIX).items()):
        try:
            req = json.loads(value)
        except ValueError:
            continue  # unreadable: the communicator drops it
        if isinstance(req, dict) and req.get("incident"):
            first.setdefault(str(req["incident"]), req)
    return {iid: str(req.get("by") or "someone") for iid, req in first.items() if req.get("op") == "resolve"}


class ObservationHost(Protocol):
    """The config is read from the controller each time: a reload swaps it."""

    @property
    def config(self) -> Config: ...


class ObservationBuilder:
    def __init__(
        self,
        host: ObservationHost,
        store: Store,
        clock: Callable[[], float],
        detection: DetectionTracker,
        effects: Effects,
        runs: Runs,
        emit: Callable[..., None],
    ) -> None:
        self.host = host
        self.store = store
        self.clock = clock
        self.detection = detection
        self.effects = effects
        self.runs = runs
        self._emit = emit

    @property
    def config(self) -> Config:
        return self.host.config  # read each time: a reload takes effect at once

    def _failover_observation(self, snap: Snapshot) -> dict[str, Any]:
        """The persisted failover state of every service and the runs it needs to decide on: those
        a state names and every run still running or awaiting approval (one read of each)."""
        states = {
            name: d.FailoverView(r.state, r.run_id, r.incident_id, r.since, r.reason, r.version)
            for name, r in snap.failover.items()
        }
        named = {fo.run_id for fo in states.values() if fo.run_id}
        answers = snap.flags("approval:")
        escalated = snap.flags("escalated:")
        runs = {
            r.id: d.RunView(
                r.id,
                r.service,
                r.playbook,
                r.state,
                r.incident_id,
                r.started_at,
                r.error,
                r.dry_run,
                r.owner,
                live=r.id in self.runs._live and not self.runs._live[r.id].done(),
                answer=answers.get(f"approval:{r.id}"),
                escalated=f"escalated:{r.id}" in escalated,
            )
            for r in snap.runs
            if r.id in named
            or (
                r.state in d.LIVE_RUN_STATES
                and (r.service in self.config.services or r.id in self.runs._left_running)
            )
        }
        failed_over = {n: fo.incident_id or "" for n, fo in states.items() if fo.state == "failed_over"}
        return {"failover": states, "runs": runs, "identity": self.runs.identity, "failed_over": failed_over}

    def silenced(self, now: float, snap: Snapshot | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for window in self.config.maintenance:
            if window.start.timestamp() <= now < window.end.timestamp():
                for svc in window.services:
                    out[svc] = f"maintenance until {window.end.isoformat()}" + (
                        f": {window.reason}" if window.reason else ""
                    )
        for key, value in (snap.flags if snap is not None else self.store.flags)("silence:").items():
            until, _, reason = value.partition("|")
            if float(until) > now:
                out[key.removeprefix("silence:")] = (
                    f"silenced until {time.strftime('%H:%M:%S UTC', time.gmtime(float(until)))}"
                    + (f": {reason}" if reason else "")
                )
        return out

    def observation(self, snap: Snapshot | None = None) -> d.Observation:
        """The tick's observation from its snapshot (`AsyncStore.snapshot`, read off the loop); without
        one (tests, tools), the snapshot is read here."""
        snap = snap if snap is not None else read_snapshot(self.store)
        incidents = {}
        # One read for every open incident, not one per service (20,000 probes: 2,000 services).
        # Newest first, so if a service ever had two open, the newest is the one it acts on.
        open_ids: dict[str, str] = {}
        for inc in reversed(snap.open_incidents):
            open_ids[inc.service] = inc.id
            if inc.service in self.config.services:
                incidents[inc.service] = d.OpenIncidentView(
                    inc.id, inc.severity, self.runs.floors.get(inc.id), self.runs.incident_runs.get(inc.id, 0)
                )
        self.detection.open_incidents = open_ids
        running = frozenset(s for s, t in self.runs.running.items() if not t.done())
        now = self.clock()
        self.detection.track_cut(now)
        refs_ok, isolated, refs_note = self.detection.references()
        self.effects.isolation(isolated, refs_note, now, snap)
        if refs_ok != getattr(self, "_refs_ok", True):
            self._refs_ok = refs_ok
            if refs_ok:
                log.info("reference targets pass again: automatic actions allowed")
            else:
                log.warning(
                    "reference targets failing: automatic actions held (incidents still open and page)",
                    refs=refs_note,
                )
            self._emit("references", ok=refs_ok, message=refs_note)
        health = self.detection.health()
        return d.Observation(
            now,
            health,
            incidents,
            running,
            dict(self.runs.last_run_started),
            runs_last_hour=sum(1 for t in self.runs.run_starts if now - t < 3600),
            paused=snap.flag("paused"),
            frozen={k.removeprefix("frozen:"): v for k, v in snap.flags("frozen:").items()},
            silenced=self.silenced(now, snap),
            **self._failover_observation(snap),
            up_since=self.detection.up_since(now),
            references_ok=refs_ok,
            references_note=refs_note,
            isolated=isolated or self.detection.isolation_forming(),
            resolve_requests=resolve_requests(snap),
        )
