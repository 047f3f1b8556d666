"""The controller: observe -> decide -> act -> record, on one asyncio loop.

Probes feed results in (`ingest`); `reconcile` builds an Observation and asks the pure `decide`
what to do; the decisions are acted on here, and every one of them is written to the incident's
timeline, the logs and the metrics. Only this module does I/O on behalf of the decision.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable
from typing import Any

import structlog

from controller import decide as d
from controller.aws import client_factory
from controller.config import Config, resolve_secret
from controller.detect import SERVICE_STATE_VALUE, Health, ProbeState, ServiceHealth, observe, service_health
from controller.durations import format_duration
from controller.leader import Elector
from controller.metrics import Metrics
from controller.notify import pagerduty
from controller.notify.outbox import Channel, Dispatcher
from controller.store import Incident, OutboxMessage, Run, Store
from playbooks.actions import ActionContext
from playbooks.engine import Engine, RunResult, render_plan
from probes.base import ProbeResult
from probes.runner import run_probe

log = structlog.get_logger("continuity.controller")


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
    ) -> None:
        self.config = config
        self.elector = elector
        self._elector_stop = asyncio.Event()
        self.store = store
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.aws = aws or client_factory(config.aws)
        self.engine = Engine(store, self.metrics, clock)
        self.states: dict[str, ProbeState] = {name: ProbeState() for name in config.probes}
        self.impact = {name: p.impact for name, p in config.probes.items()}
        self.running: dict[str, asyncio.Task[RunResult]] = {}
        self.last_run_started: dict[str, float] = {}
        self.incident_runs: dict[str, int] = {}
        self.run_starts: list[float] = []
        """When automatic runs started, for the cap on runs per hour."""
        self.floors: dict[str, str] = {}
        self._held: dict[str, str] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._probe_tasks: list[asyncio.Task[Any]] = []
        self._kick = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        """Observers of what the controller does (the demo prints them): (kind, facts)."""
        self.tick_hooks: list[Callable[[float], None]] = []
        """Called with the time at the end of each reconcile (the communicator speaks there)."""
        channels: dict[str, Channel] = {}
        pd = config.notifiers.pagerduty
        if pd is not None:
            key = env(pd.routing_key_env)
            channels["pagerduty"] = Channel(
                "pagerduty",
                lambda p, pd=pd, key=key: (
                    pagerduty.url_for(pd, p["kind"]),
                    {"routing_key": key, **p["body"]},
                ),
                rate_per_minute=pd.rate_per_minute,
            )
        self.dispatcher = Dispatcher(
            store, channels, clock, on_event=self._delivery_event, first_retry=config.controller.outbox_retry
        )
        self.dispatcher.may_send = self.may_act
        self._recover_from_restart()
        from controller.comms.communicator import attach

        self.communicator = attach(self)

    # ------------------------------------------------------------------ start-up

    def _recover_from_restart(self) -> None:
        """Pick up where a previous process stopped: cooldowns, runs per incident, runs to resume."""
        self._resume: list[Run] = []
        for run in self.store.runs():
            if run.service and run.service != "manual":
                self.last_run_started[run.service] = max(
                    self.last_run_started.get(run.service, 0), run.started_at
                )
                self.run_starts.append(run.started_at)
            if run.incident_id:
                self.incident_runs[run.incident_id] = self.incident_runs.get(run.incident_id, 0) + 1
            if run.state == "running":
                self._resume.append(run)
        for inc in self.store.list_incidents(status="open"):
            floor = inc.data.get("severity_floor")
            if floor:
                self.floors[inc.id] = floor

    # ------------------------------------------------------------------ observe

    def ingest(self, result: ProbeResult) -> None:
        """Fold a probe result into detection state; a change of verdict triggers a reconcile at once."""
        name = result.probe
        if name not in self.states:
            return
        fail_t, ok_t = self.config.thresholds(name)
        before = self.states[name]
        after = observe(before, result, fail_t, ok_t)
        self.states[name] = after
        self.metrics.probe_success.labels(name, result.vantage).set(1 if result.ok else 0)
        self.metrics.probe_duration.labels(name, result.vantage).observe(result.latency)
        if not result.ok and before.failures == 0:
            self._emit("probe_failed", probe=name, reason=result.reason, at=result.started_at)
        if after.status is not before.status:
            verdict = f"probe {name} is {after.status.value.upper()}" + (
                f" after {after.failures} consecutive failures: {result.reason}"
                if after.status is Health.DOWN
                else f" after {after.successes} consecutive successes"
                if before.status is Health.DOWN
                else ""
            )
            log.info("probe verdict", probe=name, status=after.status.value, reason=result.reason)
            self._emit("probe_verdict", probe=name, status=after.status.value, at=result.started_at)
            for svc, cfg in self.config.services.items():
                inc = self.store.open_incident_for(svc) if name in cfg.probes else None
                if inc is not None:
                    self.store.append(inc.id, result.started_at, "probe", verdict, result.to_dict())
            self._kick.set()

    def probe_healthy(self, name: str) -> bool | None:
        status = self.states[name].status if name in self.states else Health.UNKNOWN
        return None if status is Health.UNKNOWN else status is Health.UP

    def health(self) -> dict[str, ServiceHealth]:
        return {
            name: service_health(name, svc.probes, self.states, self.impact)
            for name, svc in self.config.services.items()
        }

    def observation(self) -> d.Observation:
        incidents = {}
        for name in self.config.services:
            inc = self.store.open_incident_for(name)
            if inc is not None:
                incidents[name] = d.OpenIncidentView(
                    inc.id, inc.severity, self.floors.get(inc.id), self.incident_runs.get(inc.id, 0)
                )
        running = frozenset(s for s, t in self.running.items() if not t.done())
        now = self.clock()
        return d.Observation(
            now,
            self.health(),
            incidents,
            running,
            dict(self.last_run_started),
            runs_last_hour=sum(1 for t in self.run_starts if now - t < 3600),
            paused=self.store.get_flag("paused"),
            frozen={k.removeprefix("frozen:"): v for k, v in self.store.flags("frozen:").items()},
        )

    # ------------------------------------------------------------------ decide + act

    async def reconcile(self) -> list[d.Decision]:
        obs = self.observation()
        for name, h in obs.health.items():
            self.metrics.service_state.labels(name).set(SERVICE_STATE_VALUE[h.state])
        self.metrics.paused.set(1 if obs.paused is not None else 0)
        decisions = d.decide(obs, self.config)
        for decision in decisions:
            await self._act(decision, obs)
        self._approvals(obs.now)
        for hook in self.tick_hooks:
            hook(self.clock())
        self.metrics.last_tick.set(self.clock())
        self._update_incident_gauge()
        return decisions

    async def _act(self, decision: d.Decision, obs: d.Observation) -> None:
        now = self.clock()
        if isinstance(decision, d.OpenIncident):
            self._open(decision, now)
        elif isinstance(decision, d.ChangeSeverity):
            self.store.update_incident(decision.incident_id, severity=decision.new)
            self.store.append(decision.incident_id, now, "incident", f"severity changed: {decision.reason}")
            log.warning(
                "incident severity changed", incident=decision.incident_id, old=decision.old, new=decision.new
            )
            inc = self.store.get_incident(decision.incident_id)
            if inc is not None:
                self._page(inc, f"severity-{decision.new}")
            self._emit("severity_changed", incident=decision.incident_id, severity=decision.new)
        elif isinstance(decision, d.ResolveIncident):
            self._resolve(decision, now)
        elif isinstance(decision, d.StartPlaybook):
            self._start_playbook(decision, now)
        elif isinstance(decision, d.Hold):
            key = decision.key or decision.reason
            if self._held.get(decision.service) != key and decision.incident_id:
                self._held[decision.service] = key
                self.store.append(decision.incident_id, now, "decision", decision.reason)
                log.info("holding", service=decision.service, reason=decision.reason)

    def _open(self, dec: d.OpenIncident, now: float) -> None:
        svc = self.config.services[dec.service]
        h = dec.health
        started = h.since or now
        data = {
            "tier": svc.tier,
            "rto_s": svc.rto,
            "rpo_s": svc.rpo,
            "owners": svc.owners,
            "failing": list(h.failing),
            "reasons": dict(h.reasons),
        }
        title = f"{dec.service} {h.state.value}: " + "; ".join(f"{p}: {r}" for p, r in h.reasons)
        inc = self.store.open_incident(dec.service, dec.severity, title[:500], now, started, data)
        for probe in h.failing:
            st = self.states[probe]
            if st.first_failure_at is not None:
                self.store.append(
                    inc.id,
                    st.first_failure_at,
                    "probe",
                    f"probe {probe} first failed",
                    {"probe": probe, "outage_start_estimate": True},
                )
            if st.last is not None:
                self.store.append(
                    inc.id,
                    st.changed_at or now,
                    "probe",
                    f"probe {probe} is DOWN after {st.failures} consecutive failures: {st.last.reason}",
                    st.last.to_dict(),
                )
        self.store.append(
            inc.id,
            now,
            "incident",
            f"incident opened, severity {dec.severity}: {dec.reason}",
            {"severity": dec.severity},
        )
        log.error(
            "incident opened", incident=inc.id, service=dec.service, severity=dec.severity, reason=dec.reason
        )
        self.metrics.incidents_total.labels(dec.service, dec.severity).inc()
        self._page(inc, "trigger")
        self._emit(
            "incident_opened",
            incident=inc.id,
            service=dec.service,
            severity=dec.severity,
            reason=dec.reason,
            at=now,
            started_at=started,
        )

    def _page(self, inc: Incident, event: str, note: str = "") -> None:
        pd = self.config.notifiers.pagerduty
        if pd is None:
            return
        svc = self.config.services[inc.service]
        details = {
            "incident_id": inc.id,
            "service": inc.service,
            "tier": svc.tier,
            "failing_probes": inc.data.get("failing", []),
            "reasons": inc.data.get("reasons", {}),
            "rto": format_duration(svc.rto),
            "owners": svc.owners,
        }
        payload = pagerduty.trigger(
            pd,
            dedup_key=inc.dedup_key,
            summary=f"[{inc.severity}] {note + ': ' if note else ''}{inc.title}",
            severity=inc.severity,
            service=inc.service,
            tier=svc.tier,
            ts=self.clock(),
            details=details,
        )
        note = "PagerDuty trigger queued" if event == "trigger" else f"PagerDuty trigger queued ({event})"
        self._enqueue(inc.id, f"{inc.id}/pagerduty/{event}", payload, note)

    def _enqueue(self, incident_id: str | None, key: str, payload: dict[str, Any], note: str) -> None:
        if self.store.enqueue("pagerduty", key, payload, incident_id, self.clock()):
            if incident_id:
                self.store.append(incident_id, self.clock(), "notification", note, {"key": key})
            self.dispatcher.wake.set()

    def _resolve(self, dec: d.ResolveIncident, now: float) -> None:
        inc = self.store.get_incident(dec.incident_id)
        if inc is None:
            return
        self.store.update_incident(inc.id, status="resolved", resolved_at=now)
        took = now - inc.started_at
        svc = self.config.services[inc.service]
        verdict = "within" if took <= svc.rto else "OVER"
        self.store.append(
            inc.id,
            now,
            "incident",
            f"incident resolved: {dec.reason}; outage lasted {format_duration(took)}, "
            f"{verdict} the RTO of {format_duration(svc.rto)}",
        )
        self._held.pop(inc.service, None)
        if self.config.notifiers.pagerduty is not None:
            self._enqueue(
                inc.id,
                f"{inc.id}/pagerduty/resolve",
                pagerduty.resolve(inc.dedup_key),
                "PagerDuty resolve queued",
            )
        log.info("incident resolved", incident=inc.id, service=inc.service, duration_s=round(took, 1))
        self._emit("incident_resolved", incident=inc.id, service=inc.service, at=now)

    # ------------------------------------------------------------------ playbooks

    def _start_playbook(self, dec: d.StartPlaybook, now: float) -> None:
        if dec.incident_id is None:  # decided in the same cycle that opened the incident
            inc = self.store.open_incident_for(dec.service)
            if inc is not None:
                dec = d.StartPlaybook(dec.service, dec.playbook, inc.id, dec.reason, dec.approval)
        self.last_run_started[dec.service] = now
        self.run_starts.append(now)
        if dec.incident_id:
            self.incident_runs[dec.incident_id] = self.incident_runs.get(dec.incident_id, 0) + 1
            self.store.append(dec.incident_id, now, "decision", dec.reason)
        pb = self.config.playbooks[dec.playbook]
        if dec.approval:
            run = self.engine.create(
                dec.playbook,
                pb,
                incident_id=dec.incident_id,
                service=dec.service,
                dry_run=self.config.controller.dry_run,
                state="awaiting_approval",
            )
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
                self._page_incident(
                    dec.incident_id,
                    f"approval-{run.id}",
                    f"approval needed for {dec.playbook} (run {run.id})",
                )
            log.warning("playbook awaits approval", service=dec.service, playbook=dec.playbook, run=run.id)
            self._emit("approval_requested", run_id=run.id, playbook=dec.playbook, plan=plan)
            return
        log.warning("starting playbook", service=dec.service, playbook=dec.playbook, reason=dec.reason)
        self._launch(dec.service, dec.playbook, dec.incident_id, None)

    def _launch(self, service: str, playbook: str, incident_id: str | None, run_id: str | None) -> None:
        self.running[service] = asyncio.create_task(
            self._run_playbook(service, playbook, incident_id, run_id)
        )

    def _approvals(self, now: float) -> None:
        """Act on humans' answers to approval requests, and on their silence."""
        for run in self.store.runs():
            if run.state != "awaiting_approval" or run.playbook not in self.config.playbooks:
                continue
            pb = self.config.playbooks[run.playbook]
            answer = self.store.get_flag(f"approval:{run.id}")
            escalated = self.store.get_flag(f"escalated:{run.id}") is not None
            verdict = d.approval_state(now - run.started_at, answer, escalated, pb)
            note = run.incident_id
            if verdict == "approve":
                self.store.update_run(run.id, state="running")
                if note:
                    self.store.append(note, now, "approval", f"run {run.id} {answer}; starting it")
                self._launch(run.service or "manual", run.playbook, run.incident_id, run.id)
            elif verdict == "reject":
                self.store.update_run(run.id, state="rejected", ended_at=now, error=answer)
                if note:
                    self.store.append(note, now, "approval", f"run {run.id} {answer}; nothing was changed")
            elif verdict == "expire":
                self.store.update_run(run.id, state="expired", ended_at=now, error="nobody approved in time")
                if note:
                    self.store.append(
                        note,
                        now,
                        "approval",
                        f"run {run.id} expired: nobody answered within "
                        f"{format_duration(pb.approval_timeout)}; nothing was changed",
                    )
                    self._page_incident(note, f"expired-{run.id}", f"approval for {run.playbook} expired")
            elif verdict == "escalate":
                self.store.set_flag(f"escalated:{run.id}", str(now))
                if note:
                    self.store.append(
                        note,
                        now,
                        "approval",
                        f"run {run.id} still unanswered after "
                        f"{format_duration(pb.escalate_after)}: paging again",
                    )
                    self._page_incident(
                        note, f"escalate-{run.id}", f"STILL waiting for approval of {run.playbook}"
                    )

    def _context(self, incident_id: str | None, service: str) -> ActionContext:
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
                self._enqueue(
                    incident_id,
                    f"{incident_id}/pagerduty/change/{zlib.crc32(summary.encode())}",
                    body,
                    f"PagerDuty change event queued: {summary}",
                )
            elif incident_id:
                self.store.append(
                    incident_id, self.clock(), "notification", f"notify (no channel): {summary}"
                )

        inc = self.store.get_incident(incident_id) if incident_id else None
        return ActionContext(
            aws=self.aws,
            probe_healthy=self.probe_healthy,
            may_act=self.may_act,
            record=record,
            notify=notify,
            variables={
                "incident_id": incident_id,
                "service": service,
                "severity": inc.severity if inc else None,
            },
        )

    async def _run_playbook(
        self, service: str, playbook: str, incident_id: str | None, run_id: str | None
    ) -> RunResult:
        pb = self.config.playbooks[playbook]
        ctx = self._context(incident_id, service)
        dry = self.config.controller.dry_run
        if run_id is None:
            result = await self.engine.run(
                playbook, pb, ctx, incident_id=incident_id, service=service, dry_run=dry
            )
        else:
            result = await self.engine.execute(run_id, playbook, pb, ctx, dry_run=dry)
        if result.state == "handed_over":
            self._emit(
                "playbook_done", playbook=playbook, ok=False, error=result.error, duration_s=result.duration
            )
            return result
        inc = self.store.get_incident(incident_id) if incident_id else None
        if result.ok and inc is not None and not dry:
            took = self.clock() - inc.opened_at
            self.metrics.failover_seconds.labels(playbook).observe(took)
            self.store.append(
                inc.id,
                self.clock(),
                "playbook",
                f"recovery done {format_duration(took)} after the incident opened",
            )
        if not result.ok and not dry:
            self.store.set_flag(f"frozen:{service}", result.run_id)
        if not result.ok and inc is not None:
            self.floors[inc.id] = "critical"
            what = "a guard stopped the recovery" if result.blocked else "automatic recovery failed"
            self.store.update_incident(
                inc.id,
                severity="critical",
                data={**inc.data, "severity_floor": "critical", "playbook_error": result.error},
            )
            self.store.append(
                inc.id,
                self.clock(),
                "incident",
                f"raised to critical: {what} ({result.error}); {playbook} is frozen for {service} "
                f"until `continuity ack {service}`; a human must take over",
                {"severity": "critical"},
            )
            self._page_incident(inc.id, "blocked" if result.blocked else "playbook-failed", what)
        self._emit(
            "playbook_done", playbook=playbook, ok=result.ok, error=result.error, duration_s=result.duration
        )
        self._kick.set()
        return result

    def _page_incident(self, incident_id: str, event: str, note: str) -> None:
        inc = self.store.get_incident(incident_id)
        if inc is not None:
            self._page(inc, event, note)

    async def run_playbook_by_hand(self, playbook: str) -> RunResult:
        """A human started this run: no incident, no cooldown check, same journal and engine."""
        pb = self.config.playbooks[playbook]
        return await self.engine.run(
            playbook, pb, self._context(None, "manual"), dry_run=self.config.controller.dry_run
        )

    # ------------------------------------------------------------------ record

    def _delivery_event(self, msg: OutboxMessage, outcome: str, text: str) -> None:
        self.metrics.notifications.labels(msg.channel, outcome).inc()
        if msg.incident_id:
            verb = {"delivered": "delivered", "retrying": "not delivered yet", "refused": "REFUSED"}[outcome]
            self.store.append(
                msg.incident_id,
                self.clock(),
                "notification",
                f"{msg.channel} {_what(msg.payload)} {verb}" + (f": {text}" if text else ""),
                {"key": msg.key},
            )
        self._emit("notification", channel=msg.channel, outcome=outcome, key=msg.key)

    def _update_incident_gauge(self) -> None:
        counts = {"critical": 0, "moderate": 0, "low": 0}
        for inc in self.store.list_incidents(status="open"):
            counts[inc.severity] = counts.get(inc.severity, 0) + 1
        for sev, n in counts.items():
            self.metrics.incidents_open.labels(sev).set(n)
        depth: dict[str, int] = {}
        for msg in self.store.outbox():
            if not msg.dead:
                depth[msg.channel] = depth.get(msg.channel, 0) + 1
        for channel in self.dispatcher.channels:
            self.metrics.outbox_depth.labels(channel).set(depth.get(channel, 0))

    def kick(self) -> None:
        """Re-evaluate now (a human answered an approval, paused, acknowledged)."""
        self._kick.set()

    def _emit(self, kind: str, **facts: Any) -> None:
        for listener in self.listeners:
            listener(kind, facts)

    # ------------------------------------------------------------------ the loop

    async def _probe_loop(self, name: str) -> None:
        cfg = self.config.probes[name]
        loop = asyncio.get_running_loop()
        # A stable offset per probe spreads starts over the interval instead of all in one second.
        offset = (zlib.crc32(name.encode()) % 1000) / 1000 * cfg.interval
        next_at = loop.time() + offset
        while not self.stop_event.is_set():
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self.ingest(await run_probe(name, cfg))
            next_at += cfg.interval
            late = loop.time() - next_at
            if late > 0:  # a run longer than the interval skips the slots it missed
                next_at += (late // cfg.interval + 1) * cfg.interval

    def may_act(self) -> bool:
        """Only the leader decides, runs playbooks and sends notifications; standbys only probe."""
        return self.elector is None or self.elector.is_leader()

    async def _tick_loop(self) -> None:
        was_leader = False
        while not self.stop_event.is_set():
            try:
                leader = self.may_act()
                if leader and not was_leader and self.elector is not None:
                    self._became_leader()
                was_leader = leader
                if leader:
                    await self.reconcile()
                else:
                    for name, h in self.health().items():
                        self.metrics.service_state.labels(name).set(SERVICE_STATE_VALUE[h.state])
                    self.metrics.last_tick.set(self.clock())
            except Exception:  # a bug in one cycle must not stop the controller
                log.exception("reconcile failed")
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=self.config.controller.tick)
            except TimeoutError:
                pass

    async def start(self, decide: bool = True) -> None:
        """Start probing; with `decide=False` (a run by hand) nothing is decided automatically."""
        self._start_probes()
        self._tasks = []
        if decide:
            self._tasks.append(asyncio.create_task(self._tick_loop(), name="reconcile"))
        self._tasks.append(
            asyncio.create_task(self.dispatcher.run(self.stop_event, period=0.5), name="outbox")
        )
        if self.elector is not None:
            # Its own stop event: the lease is released only after the step in hand has finished.
            self._elector = asyncio.create_task(self.elector.run(self._elector_stop), name="leader")
        elif decide:
            self._resume_interrupted()
        log.info(
            "controller started",
            probes=len(self.config.probes),
            services=len(self.config.services),
            dry_run=self.config.controller.dry_run,
        )

    def _became_leader(self) -> None:
        """A new leader reads what the previous one left: cooldowns, runs per incident, runs to resume."""
        log.warning("became leader", identity=getattr(self.elector, "identity", None))
        self.last_run_started.clear()
        self.incident_runs.clear()
        self.run_starts.clear()
        self.floors.clear()
        self._recover_from_restart()
        mine = {t for t in self.running.values() if not t.done()}
        if not mine:
            self._resume_interrupted()

    async def reload(self, new: Config) -> None:
        """Swap in a validated config. Probes whose settings did not change keep their history, so a
        reload never resets a failure streak; runs in progress finish with the playbook they started."""
        old = self.config
        for t in self._probe_tasks:
            t.cancel()
        await asyncio.gather(*self._probe_tasks, return_exceptions=True)
        self.config = new
        self.states = {
            name: self.states[name] if name in old.probes and old.probes[name] == cfg else ProbeState()
            for name, cfg in new.probes.items()
        }
        self.impact = {name: p.impact for name, p in new.probes.items()}
        self._start_probes()
        self._kick.set()

    def _start_probes(self) -> None:
        self._probe_tasks = [
            asyncio.create_task(self._probe_loop(name), name=f"probe:{name}") for name in self.config.probes
        ]

    def _resume_interrupted(self) -> None:
        """Runs the previous process left `running` continue from their journal: done steps are not
        repeated, and the step in hand is `check`ed before it is applied again."""
        for run in self._resume:
            if run.playbook not in self.config.playbooks:
                continue
            if run.incident_id:
                self.store.append(
                    run.incident_id,
                    self.clock(),
                    "playbook",
                    f"resuming run {run.id} of {run.playbook} after a controller restart",
                )
            log.warning("resuming playbook run", run=run.id, playbook=run.playbook)
            self._launch(run.service or "manual", run.playbook, run.incident_id, run.id)
        self._resume = []

    async def stop(self) -> None:
        self.stop_event.set()
        self.dispatcher.wake.set()
        running = [t for t in self.running.values() if not t.done()]
        if running:  # let a playbook step in hand finish rather than cut it in half
            await asyncio.wait(running, timeout=30)
        for t in [*self._probe_tasks, *self._tasks]:
            t.cancel()
        await asyncio.gather(*self._probe_tasks, *self._tasks, return_exceptions=True)
        if self.elector is not None:
            self._elector_stop.set()  # the elector releases the lease so a standby takes over at once
            await asyncio.gather(self._elector, return_exceptions=True)
        log.info("controller stopped")


def _what(payload: dict[str, Any]) -> str:
    """A few words for the timeline about a queued message, whatever its channel's shape."""
    body = payload.get("body")
    action = body.get("event_action") if isinstance(body, dict) else None
    return str(action or payload.get("kind") or payload.get("op") or payload.get("event") or "message")
