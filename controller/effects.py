"""Effects: what the controller does about an incident, once `decide` has decided it.

It exists so that every write an incident causes is in one place: the incident opened with the
evidence that opened it (first failures, confirmation bursts, verdicts), its severity changed, its
resolution with the RTO kept or missed, holds and joins written once each, pages queued in the
durable outbox (idempotency key per incident and event), the controller's own isolation alert, and
what a delivery did to the timeline. The decisions themselves are `decide`'s; runs are in `runs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import structlog

from controller import decide as d
from controller import grouping
from controller.config import Config
from controller.detect import SERVICE_STATE_VALUE, Health, ProbeState
from controller.durations import format_duration
from controller.metrics import Metrics
from controller.notify import pagerduty
from controller.notify.outbox import Channel, Dispatcher
from controller.stores import Incident, OutboxMessage, Store
from controller.stores.aio import AsyncStore, Snapshot, read_snapshot
from controller.tracker import DetectionTracker

log = structlog.get_logger("continuity.controller")


class EffectsHost(Protocol):
    """What effects read from the controller each time: the config (a reload swaps it) and the
    outbox dispatcher (created after the effects, whose delivery events it reports)."""

    @property
    def config(self) -> Config: ...
    @property
    def dispatcher(self) -> Dispatcher: ...


class Effects:
    def __init__(
        self,
        host: EffectsHost,
        store: Store,
        clock: Callable[[], float],
        metrics: Metrics,
        detection: DetectionTracker,
        emit: Callable[..., None],
        astore: AsyncStore | None = None,
    ) -> None:
        self.host = host
        self.astore = astore or AsyncStore(store)
        """Every store call awaited off the loop; `store` (its batching view) only appends."""
        self.store = self.astore.batching
        self._isolation_alerts: list[tuple[str, dict[str, Any], str]] = []
        """Isolation pages decided while observing, queued by `send_isolation_alerts`."""
        self.clock = clock
        self.metrics = metrics
        self.detection = detection
        self._emit = emit
        self.isolated_since: float | None = None
        self._held: dict[str, str] = {}
        """The hold (or join) last written per service: each is written to the timeline once."""

    @property
    def config(self) -> Config:
        return self.host.config  # read each time: a reload takes effect at once

    @property
    def dispatcher(self) -> Dispatcher:
        return self.host.dispatcher

    async def act(self, decision: d.Decision, now: float) -> None:
        """Carry out an incident decision (open, severity, resolve, escalate, join, hold)."""
        if isinstance(decision, d.OpenIncident):
            await self._open(decision, now)
        elif isinstance(decision, d.ChangeSeverity):
            await self.astore.update_incident(decision.incident_id, severity=decision.new)
            self.store.append(decision.incident_id, now, "incident", f"severity changed: {decision.reason}")
            log.warning(
                "incident severity changed", incident=decision.incident_id, old=decision.old, new=decision.new
            )
            inc = await self.astore.get_incident(decision.incident_id)
            if inc is not None:
                await self._page(inc, f"severity-{decision.new}")
            self._emit("severity_changed", incident=decision.incident_id, severity=decision.new)
        elif isinstance(decision, d.ResolveIncident):
            await self._resolve(decision, now)
        elif isinstance(decision, d.Escalate):
            await self.astore.set_flag(f"escalated:{decision.run_id}", str(now))
            if decision.incident_id:
                self.store.append(decision.incident_id, now, "approval", decision.reason)
                await self.page_incident(
                    decision.incident_id,
                    f"escalate-{decision.run_id}",
                    f"STILL waiting for approval of {decision.playbook}",
                )
        elif isinstance(decision, d.JoinIncident):
            if self._held.get(decision.service) != f"join:{decision.incident_id}":
                self._held[decision.service] = f"join:{decision.incident_id}"
                self.store.append(
                    decision.incident_id,
                    now,
                    "decision",
                    decision.reason,
                    {"joined_service": decision.service},
                )
                await self.astore.call(
                    grouping.record_join, self.store, self.config, decision.incident_id, decision.service
                )
                log.info("joined incident", service=decision.service, incident=decision.incident_id)
        elif isinstance(decision, d.Hold):
            key = decision.key or decision.reason
            iid = decision.incident_id
            if iid is None and key in ("references", "isolated"):  # opened in this same cycle
                inc = await self.astore.open_incident_for(decision.service)
                iid = inc.id if inc is not None else None
            if self._held.get(decision.service) != key and iid:
                self._held[decision.service] = key
                self.store.append(iid, now, "decision", decision.reason)
                log.info("holding", service=decision.service, reason=decision.reason)

    def isolation(self, isolated: bool, note: str, now: float, snap: Snapshot) -> None:
        """One 'controller isolated' alert while every reference target is down; resolved when one is
        back. The open alert's key is read from the tick's snapshot (or a write still deferred)."""
        self.metrics.isolated.set(1 if isolated else 0)
        pd = self.config.notifiers.pagerduty
        if isolated and self.isolated_since is None:
            self.isolated_since = now
            log.error(
                "controller isolated: reference targets down; no incident opens, no failover starts",
                refs=note,
            )
            self._emit("isolated", message=f"controller isolated: {note}")
            if pd is not None:
                key = f"continuity/isolated/{int(now)}"
                self.astore.defer_flag("isolation_key", key)
                body = pagerduty.trigger(
                    pd,
                    dedup_key=key,
                    summary="Continuity controller isolated: "
                    f"{self.detection.isolation_count()} reference targets down ({note}); no incident opens "
                    "and automatic failover is suspended",
                    severity="critical",
                    service="continuity",
                    tier="critical",
                    ts=now,
                    details={"reference_probes": self.config.detection.reference_probes, "note": note},
                )
                self._isolation_alerts.append((f"{key}/trigger", body, "isolation alert"))
        elif not isolated and self.isolated_since is not None:
            log.warning("controller no longer isolated", after_s=round(now - self.isolated_since, 1))
            self._emit("isolated", message="controller no longer isolated")
            self.isolated_since = None
            deferred = self.astore.deferred_flags()
            open_key = (
                deferred["isolation_key"] if "isolation_key" in deferred else snap.flag("isolation_key")
            )
            if pd is not None and open_key:
                resolve = (f"{open_key}/resolve", pagerduty.resolve(open_key), "isolation resolved")
                self._isolation_alerts.append(resolve)
                self.astore.defer_flag("isolation_key", None)

    async def send_isolation_alerts(self) -> None:
        """Queue the isolation pages `isolation` decided while the tick observed (in order; one that
        the store refused stays for the next tick)."""
        while self._isolation_alerts:
            key, body, note = self._isolation_alerts[0]
            await self.enqueue(None, key, body, note)
            self._isolation_alerts.pop(0)

    async def _open(self, dec: d.OpenIncident, now: float) -> None:
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
        title, data = grouping.on_open(self.config, dec.service, self.detection.health(), title, data)
        inc = await self.astore.open_incident(dec.service, dec.severity, title[:500], now, started, data)
        self.detection.open_incidents[dec.service] = inc.id
        for probe in h.failing:
            st = self.detection.states[probe]
            at, note = self.detection.burst_notes.get(probe, (0.0, ""))
            if note and at >= (st.first_failure_at or started):  # not a burst of an earlier streak
                self.store.append(inc.id, at, "probe", note, {"probe": probe})
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
                    _verdict_line(probe, st, dict(h.reasons).get(probe, "")),
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
        await self._page(inc, "trigger")
        self._emit(
            "incident_opened",
            incident=inc.id,
            service=dec.service,
            severity=dec.severity,
            reason=dec.reason,
            at=now,
            started_at=started,
        )

    async def _page(self, inc: Incident, event: str, note: str = "") -> None:
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
        payload = pagerduty.page(pd, inc, tier=svc.tier, ts=self.clock(), details=details, note=note)
        note = "PagerDuty trigger queued" if event == "trigger" else f"PagerDuty trigger queued ({event})"
        await self.enqueue(inc.id, f"{inc.id}/pagerduty/{event}", payload, note)

    async def enqueue(self, incident_id: str | None, key: str, payload: dict[str, Any], note: str) -> None:
        if await self.astore.enqueue("pagerduty", key, payload, incident_id, self.clock()):
            if incident_id:
                self.store.append(incident_id, self.clock(), "notification", note, {"key": key})
            self.dispatcher.wake.set()

    async def _resolve(self, dec: d.ResolveIncident, now: float) -> None:
        inc = await self.astore.get_incident(dec.incident_id)
        if inc is None:
            return
        await self.astore.update_incident(inc.id, status="resolved", resolved_at=now)
        if self.detection.open_incidents.get(inc.service) == inc.id:
            del self.detection.open_incidents[inc.service]
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
            await self.enqueue(
                inc.id,
                f"{inc.id}/pagerduty/resolve",
                pagerduty.resolve(inc.dedup_key),
                "PagerDuty resolve queued",
            )
        log.info("incident resolved", incident=inc.id, service=inc.service, duration_s=round(took, 1))
        self._emit("incident_resolved", incident=inc.id, service=inc.service, at=now)

    async def page_incident(self, incident_id: str, event: str, note: str) -> None:
        """Page about an open incident; about a resolved one (a failback awaiting approval) send a
        PagerDuty change event instead, because a trigger with its dedup_key would reopen the alert."""
        inc = await self.astore.get_incident(incident_id)
        if inc is None:
            return
        if inc.status == "open":
            await self._page(inc, event, note)
            return
        pd = self.config.notifiers.pagerduty
        if pd is not None:
            body = pagerduty.change(
                pd, summary=f"{inc.service}: {note}", ts=self.clock(), details={"incident_id": inc.id}
            )
            await self.enqueue(
                inc.id, f"{inc.id}/pagerduty/change/{event}", body, f"PagerDuty change event queued: {note}"
            )

    def delivery_event(self, msg: OutboxMessage, outcome: str, text: str) -> None:
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

    def export(self, obs: d.Observation) -> None:
        """What the tick observed, as gauges: each service's state, paused, silenced."""
        for name, h in obs.health.items():
            self.metrics.set_labelled(self.metrics.service_state, name, SERVICE_STATE_VALUE[h.state])
        self.metrics.paused.set(1 if obs.paused is not None else 0)
        for name in self.config.services:
            self.metrics.set_labelled(self.metrics.silenced, name, 1 if name in obs.silenced else 0)

    def update_incident_gauge(self, snap: Snapshot | None = None) -> None:
        """From the tick's snapshot (no store call); without one, read (tests, tools)."""
        snap = snap or read_snapshot(self.astore.store)
        counts = {"critical": 0, "moderate": 0, "low": 0}
        for inc in snap.open_incidents:
            counts[inc.severity] = counts.get(inc.severity, 0) + 1
        for sev, n in counts.items():
            self.metrics.incidents_open.labels(sev).set(n)
        depth: dict[str, int] = {}
        for msg in snap.outbox:
            if not msg.dead:
                depth[msg.channel] = depth.get(msg.channel, 0) + 1
        for channel in self.dispatcher.channels:
            self.metrics.outbox_depth.labels(channel).set(depth.get(channel, 0))


def pagerduty_channels(config: Config, env: Callable[[str], str]) -> dict[str, Channel]:
    """PagerDuty is the controller's own channel (pages); the communicator adds the others. A
    missing secret raises here, so a reload that lacks it is refused before anything changes."""
    pd = config.notifiers.pagerduty
    if pd is None:
        return {}
    return {"pagerduty": pagerduty.channel(pd, env(pd.routing_key_env))}


def _verdict_line(probe: str, st: ProbeState, reason: str) -> str:
    """What the timeline says about a failing probe when its incident opens: DOWN with its streak,
    DEGRADED with its reason (slow, a non-critical step, a near expiry), or its failure rate."""
    if st.status is Health.DOWN:
        last = st.last.reason if st.last else ""
        return f"probe {probe} is DOWN after {st.failures} consecutive failures: {last}"
    if st.status is Health.DEGRADED:
        why = st.last.reason if st.last else reason
        return f"probe {probe} is DEGRADED after {st.degraded} degraded runs: {why}"
    return f"probe {probe} is DEGRADED: {reason}"


def _what(payload: dict[str, Any]) -> str:
    """A few words for the timeline about a queued message, whatever its channel's shape."""
    body = payload.get("body")
    action = body.get("event_action") if isinstance(body, dict) else None
    return str(action or payload.get("kind") or payload.get("op") or payload.get("event") or "message")
