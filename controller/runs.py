"""Runs: the playbook runs `decide` starts, and only those.

It exists so that a run's whole life is in one place: created and owned through the failover
state's compare-and-swap (`_move`), held for approval or launched, taken over from an owner that
stopped (a compare-and-swap on the owner), executed by the engine with the action context the
steps see, and its end left in the store for `decide` to judge (a failed run's freeze, raised
severity and page are done here as `decide` orders them). Also the book-keeping the decisions
read: cooldowns, runs per incident, runs per hour and severity floors, recovered from the store
after a restart or a change of leader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from controller import decide as d
from controller.config import Config
from controller.durations import format_duration
from controller.effects import Effects
from controller.metrics import Metrics
from controller.notify import pagerduty
from controller.stores import FailoverRecord, Incident, Run, Store
from controller.stores.aio import AsyncStore
from controller.tracker import DetectionTracker
from playbooks.actions import ActionContext
from playbooks.engine import Engine, RunResult, render_plan

log = structlog.get_logger("continuity.controller")

RUN_DECISIONS = (d.StartPlaybook, d.Transition, d.ResumeRun, d.AbandonRun)
"""The decisions `Runs.act` carries out; the others are incidents' (`Effects.act`)."""


def new_identity() -> str:
    """A run owner's name when there is no elector: host, process and a random part (a restarted
    process is a new owner, so it takes over the runs of the one that died)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


class RunsHost(Protocol):
    """What runs read from the controller each time: the config and the AWS client factory (a
    reload swaps them; a run in progress keeps what it started with) and whether this replica
    leads (a step is applied only while it does)."""

    @property
    def config(self) -> Config: ...
    @property
    def aws(self) -> Callable[[str], Any]: ...
    def may_act(self) -> bool: ...


class Runs:
    def __init__(
        self,
        host: RunsHost,
        store: Store,
        clock: Callable[[], float],
        metrics: Metrics,
        engine: Engine,
        identity: str,
        detection: DetectionTracker,
        effects: Effects,
        emit: Callable[..., None],
        kick: asyncio.Event,
        astore: AsyncStore | None = None,
    ) -> None:
        self.host = host
        self.astore = astore or AsyncStore(store)
        """Every store call awaited off the loop; `store` (its batching view) only appends and
        serves `recover_from_restart`'s reads."""
        self.store = self.astore.batching
        self.clock = clock
        self.metrics = metrics
        self.engine = engine
        self.identity = identity
        """Who owns the runs this process executes (the elector's identity when there is one)."""
        self.detection = detection
        self.effects = effects
        self._emit = emit
        self._kick = kick
        self.running: dict[str, asyncio.Task[RunResult]] = {}
        self._live: dict[str, asyncio.Task[RunResult]] = {}
        """Run id -> the task of this process executing it."""
        self.last_run_started: dict[str, float] = {}
        self.incident_runs: dict[str, int] = {}
        self.run_starts: list[float] = []
        """When automatic runs started, for the cap on runs per hour."""
        self.floors: dict[str, str] = {}
        self._left_running: set[str] = set()
        """Filled by `recover_from_restart` (see there)."""

    @property
    def config(self) -> Config:
        return self.host.config  # read each time: a reload takes effect at once

    @property
    def aws(self) -> Callable[[str], Any]:
        return self.host.aws

    def may_act(self) -> bool:
        return self.host.may_act()

    async def act(self, decision: d.Decision, now: float) -> None:
        """Carry out a run decision (start, transition, resume, abandon)."""
        if isinstance(decision, d.StartPlaybook):
            await self._start_playbook(decision, now)
        elif isinstance(decision, d.Transition):
            await self._transition(decision, now)
        elif isinstance(decision, d.ResumeRun):
            await self._resume_run(decision, now)
        elif isinstance(decision, d.AbandonRun):
            await self.astore.update_run(
                decision.run_id, state="abandoned", ended_at=now, error=decision.reason
            )
            if decision.incident_id:
                self.store.append(decision.incident_id, now, "playbook", decision.reason)
            log.warning("run abandoned", run=decision.run_id, reason=decision.reason)

    def recovery_reads(self) -> tuple[list[Run], list[Incident]]:
        """What `recover_from_restart` reads (blocking: on the STORE pool from a coroutine)."""
        return self.store.runs(), self.store.list_incidents(status="open")

    def unexplained_transitions(self) -> list[FailoverRecord]:
        """Failover states of open incidents with no line on their timeline (blocking: on the STORE
        pool). `_move` writes the state, then queues its line; a controller killed between the two
        (or before its batch was flushed) leaves a state that nothing on the incident explains."""
        opened = {inc.id for inc in self.store.list_incidents(status="open")}
        lost = []
        for rec in self.store.failover_states().values():
            if rec.incident_id not in opened or rec.version == 0:
                continue
            events = self.store.timeline(rec.incident_id or "")
            if not any(e.kind == "failover" and e.data.get("version") == rec.version for e in events):
                lost.append(rec)
        return lost

    async def explain_lost_transitions(self) -> None:
        """On taking the lead (or starting as the only replica): put each state the previous
        controller wrote without its timeline line on the timeline, at the time it was written."""
        try:
            lost = await self.astore.call(self.unexplained_transitions)
        except Exception:  # a sick store: the decisions go on; the lines wait for the next take-over
            log.exception("could not check the timeline for failover states written without their line")
            return
        for rec in lost:
            self.store.append(
                rec.incident_id or "",
                rec.since,
                "failover",
                f"failover state of {rec.service} is {rec.state} (version {rec.version}), written by a "
                f"controller that stopped before it put the line here; its reason: {rec.reason}",
                {"to": rec.state, "run_id": rec.run_id, "version": rec.version, "restored": True},
            )
            log.warning("failover state restored to the timeline", service=rec.service, state=rec.state)

    async def recover(self) -> None:
        """`recover_from_restart` with the store read off the loop (a replica becoming leader)."""
        self.recover_from_restart(*await self.astore.call(self.recovery_reads))

    def recover_from_restart(
        self, runs: list[Run] | None = None, opened: list[Incident] | None = None
    ) -> None:
        """Pick up where a previous process stopped: cooldowns and runs per incident. Runs to resume
        are found by `decide` from the failover states and the runs' owners, not here. Without the
        reads (`recovery_reads`) they are made here, blocking: at construction, before any loop work."""
        if runs is None or opened is None:
            runs, opened = self.recovery_reads()
        self._left_running = set()
        """Runs found running when this process started or became leader: the only runs by hand
        (no service state owns them) it may resume; a CLI run started later may be alive."""
        for run in runs:
            if run.state == "running":
                self._left_running.add(run.id)
            if run.service and run.service != "manual":
                self.last_run_started[run.service] = max(
                    self.last_run_started.get(run.service, 0), run.started_at
                )
                self.run_starts.append(run.started_at)
            if run.incident_id:
                self.incident_runs[run.incident_id] = self.incident_runs.get(run.incident_id, 0) + 1
        for inc in opened:
            floor = inc.data.get("severity_floor")
            if floor:
                self.floors[inc.id] = floor

    async def _start_playbook(self, dec: d.StartPlaybook, now: float) -> None:
        """Create the run, then move the service's state to it (compare-and-swap): a run whose state
        did not move is never executed. Stopping in between leaves a run no state owns, which the
        next `decide` adopts."""
        if dec.incident_id is None:  # decided in the same cycle that opened the incident
            inc = await self.astore.open_incident_for(dec.service)
            if inc is not None:
                dec = dataclasses.replace(dec, incident_id=inc.id)
        pb = self.config.playbooks[dec.playbook]
        run = await self.astore.call(
            self.engine.create,
            dec.playbook,
            pb,
            incident_id=dec.incident_id,
            service=dec.service,
            dry_run=self.config.controller.dry_run,
            state="awaiting_approval" if dec.approval else "running",
        )
        moved = await self._move(
            dec.service, dec.frm, dec.to, dec.version, run.id, dec.incident_id, dec.reason, dec.checks, now
        )
        if not moved:
            await self.astore.update_run(
                run.id, state="abandoned", ended_at=now, error="the failover state moved meanwhile"
            )
            return
        self.last_run_started[dec.service] = now
        self.run_starts.append(now)
        if dec.incident_id:
            self.incident_runs[dec.incident_id] = self.incident_runs.get(dec.incident_id, 0) + 1
        if dec.approval:
            plan = render_plan(dec.playbook, pb)
            if dec.incident_id:
                self.store.append(
                    dec.incident_id,
                    now,
                    "approval",
                    f"run {run.id} of {dec.playbook} awaits approval: `continuity approve {run.id}` "
                    f"or `continuity reject {run.id}` (expires in {format_duration(pb.approval_timeout)})",
                    {"run_id": run.id, "plan": plan},
                )
                await self.effects.page_incident(
                    dec.incident_id,
                    f"approval-{run.id}",
                    f"approval needed for {dec.playbook} (run {run.id})",
                )
            log.warning("playbook awaits approval", service=dec.service, playbook=dec.playbook, run=run.id)
            self._emit("approval_requested", run_id=run.id, playbook=dec.playbook, plan=plan)
            return
        log.warning("starting playbook", service=dec.service, playbook=dec.playbook, reason=dec.reason)
        self._launch(dec.service, dec.playbook, dec.incident_id, run.id)

    async def _move(
        self,
        service: str,
        frm: str,
        to: str,
        version: int,
        run_id: str | None,
        incident_id: str | None,
        reason: str,
        checks: tuple[str, ...],
        now: float,
    ) -> bool:
        """Persist a transition decided by `decide` (compare-and-swap on the version it read) and
        put it on the timeline with its sentence and the checks that passed."""
        rec = await self.astore.transition_failover(service, version, to, run_id, incident_id, reason, now)
        if rec is None:
            log.warning("failover state moved meanwhile; deciding again", service=service, to=to)
            self._kick.set()
            return False
        message = f"{service}: {frm} -> {to}: {reason}"
        if checks:
            message += " (checks passed: " + "; ".join(checks) + ")"
        if incident_id:
            self.store.append(
                incident_id,
                now,
                "failover",
                message,
                {"from": frm, "to": to, "run_id": run_id, "checks": list(checks), "version": rec.version},
            )
        log.warning("failover state", service=service, frm=frm, to=to, run=run_id, reason=reason)
        self._emit("failover_state", service=service, frm=frm, to=to, run_id=run_id, reason=reason)
        self._kick.set()  # the next state's decision need not wait for the tick
        return True

    async def _transition(self, dec: d.Transition, now: float) -> None:
        if dec.freeze is not None:
            await self._freeze(dec, dec.freeze, now)
        if dec.close_run is not None and dec.run_id:
            await self.astore.update_run(dec.run_id, state=dec.close_run, ended_at=now, error=dec.reason)
            if dec.incident_id:
                self.store.append(dec.incident_id, now, "approval", dec.reason)
            if dec.close_run == "expired" and dec.incident_id:
                run = await self.astore.get_run(dec.run_id)
                playbook = run.playbook if run else "the playbook"
                await self.effects.page_incident(
                    dec.incident_id, f"expired-{dec.run_id}", f"approval for {playbook} expired"
                )
        if not await self._move(
            dec.service,
            dec.frm,
            dec.to,
            dec.version,
            dec.run_id,
            dec.incident_id,
            dec.reason,
            dec.checks,
            now,
        ):
            return
        if dec.launch and dec.run_id:
            run = await self.astore.get_run(dec.run_id)
            if run is not None:
                await self.astore.update_run(run.id, state="running")
                self._launch(dec.service, run.playbook, run.incident_id, run.id)

    async def _freeze(self, dec: d.Transition, fz: d.Freeze, now: float) -> None:
        """A failed run: freeze the playbook for the service, raise the incident to critical, page.
        Done before the transition is persisted, so a crash in between decides it again (every
        step here is idempotent)."""
        await self.astore.set_flag(f"frozen:{dec.service}", dec.run_id or "?")
        inc = await self.astore.get_incident(dec.incident_id) if dec.incident_id else None
        if inc is None:
            return
        what = "a guard stopped the recovery" if fz.blocked else "automatic recovery failed"
        if inc.status == "open":
            self.floors[inc.id] = "critical"
            await self.astore.update_incident(
                inc.id,
                severity="critical",
                data={**inc.data, "severity_floor": "critical", "playbook_error": fz.error},
            )
            self.store.append(
                inc.id,
                now,
                "incident",
                f"raised to critical: {what} ({fz.error}); {fz.playbook} is frozen for {dec.service} "
                f"until `continuity ack {dec.service}`; a human must take over",
                {"severity": "critical"},
            )
        await self.effects.page_incident(inc.id, "blocked" if fz.blocked else "playbook-failed", what)

    async def _resume_run(self, dec: d.ResumeRun, now: float) -> None:
        """Take a run over from an owner that stopped (compare-and-swap on the owner) and continue
        it from its journal: done steps are skipped, the step in hand is checked before re-applying."""
        if dec.playbook not in self.config.playbooks:
            return
        if not await self.astore.claim_run(dec.run_id, self.identity, dec.owner):
            log.warning("run taken by another owner; not resuming", run=dec.run_id)
            return
        if dec.incident_id:
            self.store.append(dec.incident_id, now, "playbook", dec.reason, {"run_id": dec.run_id})
        log.warning("resuming playbook run", run=dec.run_id, playbook=dec.playbook, reason=dec.reason)
        self._launch(dec.service, dec.playbook, dec.incident_id, dec.run_id)

    def _launch(self, service: str, playbook: str, incident_id: str | None, run_id: str) -> None:
        task = asyncio.create_task(self._run_playbook(service, playbook, incident_id, run_id))
        self.running[service] = task
        self._live[run_id] = task

        def forget(_: asyncio.Task[RunResult]) -> None:
            self._live.pop(run_id, None)

        task.add_done_callback(forget)

    async def _context(self, incident_id: str | None, service: str) -> ActionContext:
        def record(kind: str, message: str, data: dict[str, Any]) -> None:
            if incident_id:
                self.store.append(incident_id, self.clock(), kind, message, data)
            self._emit(
                kind, message=message, **{k: v for k, v in data.items() if k in ("step", "duration_s")}
            )

        async def notify(summary: str, details: dict[str, Any]) -> None:
            pd = self.config.notifiers.pagerduty
            if pd is not None:
                body = pagerduty.change(
                    pd, summary=summary, ts=self.clock(), details={"incident_id": incident_id, **details}
                )
                await self.effects.enqueue(
                    incident_id,
                    f"{incident_id}/pagerduty/change/{zlib.crc32(summary.encode())}",
                    body,
                    f"PagerDuty change event queued: {summary}",
                )
            elif incident_id:
                self.store.append(
                    incident_id, self.clock(), "notification", f"notify (no channel): {summary}"
                )

        inc = await self.astore.get_incident(incident_id) if incident_id else None
        return ActionContext(
            aws=self.aws,
            probe_healthy=self.detection.probe_healthy,
            may_act=self.may_act,
            record=record,
            notify=notify,
            variables={
                "incident_id": incident_id,
                "service": service,
                "severity": inc.severity if inc else None,
                # replica_lag guards without `max` use the service's RPO as their limit
                "rpo_s": svc.rpo if (svc := self.config.services.get(service)) else None,
            },
        )

    async def _run_playbook(
        self, service: str, playbook: str, incident_id: str | None, run_id: str
    ) -> RunResult:
        """Execute a run `decide` started (or resumed). What its outcome means for the service (the
        next failover state; a failed run's freeze, critical and page) is decided by `decide` from
        the run's state in the store, not here."""
        pb = self.config.playbooks[playbook]
        ctx = await self._context(incident_id, service)
        dry = self.config.controller.dry_run
        result = await self.engine.execute(run_id, playbook, pb, ctx, dry_run=dry)
        if result.state == "handed_over":
            self._emit(
                "playbook_done", playbook=playbook, ok=False, error=result.error, duration_s=result.duration
            )
            return result
        inc = await self.astore.get_incident(incident_id) if incident_id else None
        if result.ok and inc is not None and not dry:
            took = self.clock() - inc.opened_at
            self.metrics.failover_seconds.labels(playbook).observe(took)
            self.store.append(
                inc.id,
                self.clock(),
                "playbook",
                f"recovery done {format_duration(took)} after the incident opened",
            )
        self._emit(
            "playbook_done", playbook=playbook, ok=result.ok, error=result.error, duration_s=result.duration
        )
        self._kick.set()
        return result

    async def run_playbook_by_hand(self, playbook: str) -> RunResult:
        """A human started this run: no incident, no cooldown check, same journal and engine."""
        pb = self.config.playbooks[playbook]
        return await self.engine.run(
            playbook, pb, await self._context(None, "manual"), dry_run=self.config.controller.dry_run
        )
