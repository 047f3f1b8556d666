"""The Communicator: tells every audience what is happening, on every channel, on time.

It subscribes to the Controller (`listeners`) and is ticked at the end of each reconcile
(`tick_hooks`). Everything it knows about an incident's communication lives in the incident's
`data["comms"]` in the store (public status, roles, acknowledgement, ETA, updates sent), and every
message goes through the durable outbox with an idempotency key per incident, message and channel
(`{incident}/{channel}/{audience}/{event}-{n}`): a restart recomputes the same keys, so nothing is
sent twice and nothing queued is lost. The decisions (what is due, what the ETA is) are the pure
functions of `lifecycle`; this class reads state, calls them, and writes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from prometheus_client import Counter, Gauge, Histogram

from controller.comms import commands as requests_
from controller.comms import lifecycle as lc
from controller.comms.templates import Templates
from controller.config import Config, Service, display_name
from controller.durations import format_duration
from controller.notify import email, pagerduty, slack, statuspage, teams, webhook
from controller.notify.common import human_time
from controller.notify.outbox import Channel
from controller.stores import Incident, Store

if TYPE_CHECKING:
    from controller.detect import ServiceHealth
    from controller.metrics import Metrics
    from controller.notify.outbox import Dispatcher
    from controller.stores.aio import AsyncStore


class HealthSource(Protocol):
    def health(self) -> dict[str, ServiceHealth]: ...


class Host(Protocol):
    """What the communicator needs of the controller that creates it (`loop.Controller` is one). A
    protocol, not an import of the loop: the loop imports this module, and the reverse would be an
    import cycle."""

    @property
    def store(self) -> Store: ...
    @property
    def astore(self) -> AsyncStore: ...
    @property
    def config(self) -> Config: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def dispatcher(self) -> Dispatcher: ...
    @property
    def detection(self) -> HealthSource: ...
    @property
    def tick_hooks(self) -> list[Callable[[float], Awaitable[None] | None]]: ...
    def kick(self) -> None: ...


log = structlog.get_logger("continuity.comms")

CHAT = ("slack", "teams")
BUILDER_EVENT = {"opened": "opened", "update": "update", "resolved": "resolved", "followup": "resolved"}
"""The channel builders know opened/update/resolved; a follow-up is about a resolved incident."""
MAX_UPDATES_KEPT = 50


def default_roles(svc: Service | None) -> dict[str, Any]:
    """Configured roles, falling back to the owners: someone is always in charge."""
    owners = list(svc.owners) if svc else []
    roles = svc.roles if svc else None
    return {
        "incident_commander": (roles.incident_commander if roles else None)
        or (owners[0] if owners else None),
        "communications_lead": roles.communications_lead if roles else None,
        "technical_owners": list(roles.technical_owners) if roles and roles.technical_owners else owners,
    }


class Communicator:
    def __init__(self, controller: Host) -> None:
        self.c = controller
        self.store = controller.store
        self._templates_for: str | None = None
        self._templates = Templates(None)
        self._health: dict[str, ServiceHealth] = {}
        self._channels: frozenset[str] = frozenset()
        self._wake = False
        self._kick = False
        """The cycle's view of the loop's state, taken on the loop before the cycle runs on the
        STORE pool (`tick`), and whether the dispatcher should be woken (or the controller kicked: a
        resolve request waits for `decide`) once it is back."""
        r = controller.metrics.registry
        self.mtta = _metric(
            Histogram,
            "continuity_mtta_seconds",
            "From incident opened to a human's acknowledgement.",
            registry=r,
            buckets=(30, 60, 120, 300, 600, 900, 1800, 3600),
        )
        self.mttr = _metric(
            Histogram,
            "continuity_mttr_seconds",
            "From the outage's start to the incident's resolution.",
            registry=r,
            buckets=(60, 120, 300, 600, 900, 1800, 3600, 7200, 14400),
        )
        self.updates = _metric(
            Counter,
            "continuity_incident_updates_total",
            "Incident messages queued, by channel, event and origin (human, automatic).",
            ["channel", "event", "origin"],
            registry=r,
        )
        self.oldest = _metric(
            Gauge,
            "continuity_outbox_oldest_age_seconds",
            "Age of the oldest undelivered message, by channel (0 when none waits).",
            ["channel"],
            registry=r,
        )
        self._add_channels()

    # ------------------------------------------------------------------ wiring

    @property
    def config(self) -> Config:
        return self.c.config  # read each time: a config reload takes effect at once

    @property
    def templates(self) -> Templates:
        wanted = self.config.communications.templates_dir
        if wanted != self._templates_for:
            self._templates, self._templates_for = Templates(wanted), wanted
        return self._templates

    def _add_channels(self) -> None:
        """Register every configured notifier with the controller's dispatcher (PagerDuty is its own)."""
        n = self.config.notifiers
        made: dict[str, Channel] = {}
        if n.slack is not None:
            made["slack"] = slack.channel(n.slack)
        if n.teams is not None:
            made["teams"] = teams.channel(n.teams)
        if n.webhook is not None:
            made["webhook"] = webhook.channel(n.webhook)
        if n.email is not None:
            made["email"] = email.channel(n.email)
        if n.statuspage is not None:
            made["statuspage"] = statuspage.channel(n.statuspage, self.store)
        for name, ch in made.items():
            self.c.dispatcher.channels.setdefault(name, ch)

    # ------------------------------------------------------------------ the cycle

    async def tick(self, now: float) -> None:
        """Called by the controller after each reconcile. Never raises: a communication bug must not
        stop failover.

        The cycle reads and writes the store many times (incidents, runs, steps, the outbox) and
        renders templates: it runs as one piece of blocking work on the STORE pool, never on the
        loop. What it needs of the loop (service health, the channels) is taken here first, and
        what it does to the loop (waking the dispatcher, an asyncio.Event that is not thread-safe)
        is done here once it is back. Its timeline entries go to the tick's batch (thread-safe)."""
        try:
            self._health = self.c.detection.health()
            self._channels = frozenset(self.c.dispatcher.channels)
            self._wake = self._kick = False
            await self.c.astore.call(self.cycle, now)
        except Exception:
            log.exception("communications cycle failed")
        finally:
            if self._wake:
                self.c.dispatcher.wake.set()
            if self._kick:
                self.c.kick()

    def cycle(self, now: float) -> None:
        """The communications cycle (blocking: run it through `tick`)."""
        if self.config.communications.enabled:
            self._apply_requests(now)
            for inc in self.store.list_incidents(limit=50):
                self._incident(inc, now)
        self._gauges(now)

    def _incident(self, inc: Incident, now: float) -> None:
        comms = inc.data.get("comms")
        if inc.status == "open":
            if comms is None:
                self._opened(inc, now)
            else:
                self._ongoing(inc, comms, now)
        elif comms is not None:
            if not comms.get("resolved_sent"):
                self._resolved(inc, comms, now)
            elif (
                not comms.get("followup_sent")
                and inc.resolved_at is not None
                and now >= inc.resolved_at + self.config.communications.followup_after
            ):
                self._send(inc, comms, "followup", now)
                comms["followup_sent"] = True
                self._save(inc.id, comms)

    def _save(self, incident_id: str, comms: dict[str, Any]) -> None:
        fresh = self.store.get_incident(incident_id)
        if fresh is not None:  # re-read: the loop may have changed other keys of data meanwhile
            self.store.update_incident(incident_id, data={**fresh.data, "comms": comms})

    # ------------------------------------------------------------------ lifecycle

    def _opened(self, inc: Incident, now: float) -> None:
        svc = self.config.services.get(inc.service)
        roles = default_roles(svc)
        health = self._health.get(inc.service)
        comms: dict[str, Any] = {
            "public_status": "investigating",
            "roles": roles,
            "escalation_level": 0,
            "acked_at": None,
            "acked_by": None,
            "seq": 0,
            "last_update_at": now,
            "eta": None,
            "eta_basis": "unknown",
            "eta_announced": None,
            "eta_human": None,
            "health": "down" if health is None or health.state.value == "down" else "degraded",
            "severity_announced": inc.severity,
            "updates": [],
        }
        self._revise_eta(inc, comms, now)
        self.store.append(
            inc.id,
            now,
            "comms",
            f"roles assigned: incident commander {roles['incident_commander'] or 'nobody (no owner)'}"
            f", communications lead {roles['communications_lead'] or 'nobody'}"
            f", technical owners {', '.join(roles['technical_owners']) or 'nobody'}",
            {"roles": roles},
        )
        self._send(inc, comms, "opened", now)
        self._save(inc.id, comms)

    def _ongoing(self, inc: Incident, comms: dict[str, Any], now: float) -> None:
        changed = self._revise_eta(inc, comms, now)
        level = lc.escalation_level(
            inc.severity,
            comms.get("acked_at") is not None,
            inc.opened_at,
            now,
            self.config.communications.escalate_after,
            len(self._escalation(inc)),
            comms.get("escalation_level", 0),
        )
        if level > comms.get("escalation_level", 0):
            self._escalate(inc, comms, level, now)
            changed = True
        # The machine moves the public status only when what it observes changes, so a human who
        # set a status explicitly is not overruled by the same observation on every cycle.
        observed = self._observed_status(inc)
        status = comms["public_status"]
        if observed != comms.get("observed", "investigating"):
            comms["observed"] = observed
            status = lc.advance(status, observed)
            changed = True
        if inc.severity != comms.get("severity_announced"):
            old = comms.get("severity_announced")
            comms["severity_announced"] = inc.severity
            comms["public_status"] = status
            self._send(inc, comms, "update", now, message=f"Severity changed from {old} to {inc.severity}.")
            changed = True
        elif status != comms["public_status"]:
            comms["public_status"] = status
            self._send(inc, comms, "update", now, automatic=True)
            changed = True
        elif lc.update_due(inc.severity, comms["last_update_at"], now, self.config.communications.cadence):
            self._send(inc, comms, "update", now, automatic=True)
            self._remind(inc, comms, now)
            changed = True
        if changed:
            self._save(inc.id, comms)

    def _observed_status(self, inc: Incident) -> str:
        """What the machine can tell on its own: a recovery run started (identified), it succeeded
        or the probes are up again (monitoring)."""
        runs = [r for r in self.store.runs(service=inc.service) if r.incident_id == inc.id]
        health = self._health.get(inc.service)
        if any(r.state == "succeeded" for r in runs) or (health is not None and health.state.value == "up"):
            return "monitoring"
        if runs:
            return "identified"
        return "investigating"

    def _resolved(self, inc: Incident, comms: dict[str, Any], now: float) -> None:
        comms["public_status"] = "resolved"
        self._send(inc, comms, "resolved", now, message=comms.pop("resolve_message", "") or "")
        comms["resolved_sent"] = True
        self.mttr.observe(max((inc.resolved_at or now) - inc.started_at, 0.0))
        self._save(inc.id, comms)
        self._wake = True  # a resolution goes at once, not with the next batch

    # ------------------------------------------------------------------ ETA, escalation, reminders

    def _plan_left(self, inc: Incident, now: float) -> float | None:
        """Seconds of recovery plan left: the incident's run in hand, else the service's playbook
        in full if it has not started yet; None with no plan."""
        svc = self.config.services.get(inc.service)
        runs = [r for r in self.store.runs(service=inc.service) if r.incident_id == inc.id]
        active = [r for r in runs if r.state in ("running", "awaiting_approval")]
        name = active[-1].playbook if active else (svc.playbook if svc and not runs else None)
        pb = self.config.playbooks.get(name) if name else None
        if pb is None:
            return None
        history = [
            (s.name, s.started_at, s.ended_at)
            for r in self.store.runs(playbook=name)
            if not r.dry_run
            for s in self.store.steps(r.id)
            if s.state == "done"
        ]
        typical = lc.measured(history)
        timeouts = {s.name: s.timeout for s in pb.steps}
        if active:
            views = [
                lc.StepView(s.name, s.state, typical.get(s.name, timeouts.get(s.name, 60.0)), s.started_at)
                for s in self.store.steps(active[-1].id)
            ]
        else:
            views = [lc.StepView(s.name, "pending", typical.get(s.name, s.timeout)) for s in pb.steps]
        return lc.remaining(views, now)

    def _revise_eta(self, inc: Incident, comms: dict[str, Any], now: float) -> bool:
        if comms.get("eta_human") is not None and comms["eta_human"] > now:
            eta, basis = comms["eta_human"], "human"
        else:
            rto = self.config.services[inc.service].rto if inc.service in self.config.services else 0.0
            eta, basis = lc.estimate_eta(self._plan_left(inc, now), rto, inc.started_at, now)
        if eta == comms.get("eta") and basis == comms.get("eta_basis"):
            return False
        if comms.get("eta") is not None or eta is not None:
            text = human_time(eta) if eta is not None else "unknown"
            self.store.append(inc.id, now, "comms", f"ETA revised: {text} (from the {basis})", {"eta": eta})
        comms["eta"], comms["eta_basis"] = eta, basis
        return True

    def _escalation(self, inc: Incident) -> list[str]:
        svc = self.config.services.get(inc.service)
        return list(svc.roles.escalation) if svc else []

    def _escalate(self, inc: Incident, comms: dict[str, Any], level: int, now: float) -> None:
        contacts = self._escalation(inc)
        who = contacts[level - 1]
        before = comms["roles"].get("incident_commander")
        comms["roles"]["incident_commander"] = who
        comms["escalation_level"] = level
        waited = format_duration(now - inc.opened_at)
        text = f"escalated: nobody acknowledged for {waited}; incident commander is now {who} (was {before})"
        self.store.append(inc.id, now, "comms", text, {"ic": who, "level": level})
        pd = self.config.notifiers.pagerduty
        if pd is not None:
            svc = self.config.services[inc.service]
            body = pagerduty.page(
                pd,
                inc,
                tier=svc.tier,
                ts=now,
                details={"incident_id": inc.id, "incident_commander": who, "unacknowledged_for": waited},
                note=f"ESCALATED to {who}",
            )
            self._enqueue(
                inc, "pagerduty", f"{inc.id}/pagerduty/escalate-{level}", body, "escalate", now, who
            )
        self._chat(inc, f"escalate-{level}", f"{inc.id} ESCALATED to {who}: {text}", now)

    def _remind(self, inc: Incident, comms: dict[str, Any], now: float) -> None:
        ic = comms["roles"].get("incident_commander") or "incident commander"
        every = format_duration(lc.cadence_for(inc.severity, self.config.communications.cadence))
        text = (
            f"{ic}: no update on {inc.id} for {every}, so update #{comms['seq']} was posted automatically. "
            f"Post the next one: continuity incident update {inc.id} --status ... --message ..."
        )
        self.store.append(inc.id, now, "comms", f"reminded {ic}: no human update for {every}", {"ic": ic})
        self._chat(inc, f"reminder-{comms['seq']}", text, now)

    def _chat(self, inc: Incident, suffix: str, text: str, now: float) -> None:
        """An internal-only note (reminders, escalations) on the chat channels."""
        view = self._view(inc, "internal", "update", text, None)
        for ch in CHAT:
            if ch not in self._channels:
                continue
            payload = slack.message(view, "update") if ch == "slack" else teams.message(view, "update")
            self._enqueue(inc, ch, f"{inc.id}/{ch}/internal/{suffix}", payload, "update", now, "internal")

    # ------------------------------------------------------------------ human requests

    def _apply_requests(self, now: float) -> None:
        """Apply the humans' requests in order. A resolve is not ours to apply: `decide` reads the
        request and resolves the incident (`Effects`); here it is left until that is done, then its
        message is kept for the resolution this cycle announces."""
        waiting: set[str] = set()
        for name, req in requests_.pending(self.store):
            if str(req.get("incident")) in waiting:
                continue  # after a resolve still to be decided: applied (or dropped) in order, later
            inc = self.store.get_incident(str(req.get("incident")))
            if req.get("op") == "resolve" and inc is not None:
                if inc.status == "open":
                    waiting.add(inc.id)
                    self._kick = True  # the next reconcile resolves it: now, not a tick later
                    continue
                comms = inc.data.get("comms")
                if comms is not None and not comms.get("resolved_sent"):
                    comms["resolve_message"] = str(req.get("message") or "")
                    self._save(inc.id, comms)
            elif inc is not None and inc.status == "open":
                comms = inc.data.get("comms")
                if comms is None:  # opened this very cycle: set up first, then apply
                    self._opened(inc, now)
                    inc = self.store.get_incident(inc.id) or inc
                    comms = inc.data["comms"]
                self._apply(inc, comms, req, now)
            self.store.set_flag(name, None)

    def _apply(self, inc: Incident, comms: dict[str, Any], req: dict[str, Any], now: float) -> None:
        op, by = req.get("op"), str(req.get("by") or "someone")
        if op == "ack":
            if comms.get("acked_at") is None:
                comms["acked_at"], comms["acked_by"] = now, by
                self.mtta.observe(max(now - inc.opened_at, 0.0))
                self.store.append(inc.id, now, "comms", f"acknowledged by {by}", {"by": by})
                if self.config.notifiers.pagerduty is not None:
                    self._enqueue(
                        inc,
                        "pagerduty",
                        f"{inc.id}/pagerduty/acknowledge",
                        pagerduty.acknowledge(inc.dedup_key),
                        "acknowledge",
                        now,
                        "internal",
                    )
        elif op == "assign":
            before = comms["roles"].get("incident_commander")
            comms["roles"]["incident_commander"] = req["ic"]
            self.store.append(
                inc.id, now, "comms", f"incident commander handed over from {before} to {req['ic']} by {by}"
            )
            self._chat(inc, f"assign-{int(now)}", f"{inc.id}: {req['ic']} is now incident commander", now)
        elif op == "update":
            if req.get("status"):
                comms["public_status"] = req["status"]
            if req.get("eta_s") is not None:
                comms["eta_human"] = now + float(req["eta_s"])
            self._revise_eta(inc, comms, now)
            self.store.append(inc.id, now, "comms", f"update by {by}: {req.get('message', '')}", {"by": by})
            self._send(inc, comms, "update", now, message=str(req.get("message") or ""), by=by)
        self._save(inc.id, comms)

    # ------------------------------------------------------------------ messages

    def _context(
        self,
        inc: Incident,
        comms: dict[str, Any],
        event: str,
        now: float,
        message: str,
        automatic: bool,
        next_at: float | None,
    ) -> dict[str, Any]:
        svc = self.config.services.get(inc.service)
        rto = svc.rto if svc else 0.0
        end = inc.resolved_at or now
        eta = comms.get("eta") if event in ("opened", "update") else None
        announced = comms.get("eta_announced")
        runs = [r for r in self.store.runs(service=inc.service) if r.incident_id == inc.id]
        step = progress = playbook = None
        if runs:
            steps = self.store.steps(runs[-1].id)
            done = sum(1 for s in steps if s.state == "done")
            current = next((s.name for s in steps if s.state in ("running", "pending")), None)
            playbook, step, progress = runs[-1].playbook, current, f"{done} of {len(steps)} steps done"
        health = comms.get("health", "down")
        name = inc.data.get("display") or display_name(inc.service, svc)  # a regional group names all
        return {
            "incident": {
                "id": inc.id,
                "service": inc.service,
                "severity": inc.severity,
                "title": inc.title,
                "started_at": inc.started_at,
            },
            "service_name": name,
            "severity": inc.severity,
            "health": health,
            "impact": (
                svc.impact
                if svc and svc.impact
                else f"{name} is {'unavailable' if health == 'down' else 'slow or failing for some'}."
            ),
            "public_status": comms["public_status"],
            "status_words": lc.STATUS_WORDS[comms["public_status"]],
            "message": message,
            "automatic": automatic,
            "failing": list(inc.data.get("failing", [])),
            "reasons": dict(inc.data.get("reasons", {})),
            "playbook": playbook,
            "step": step,
            "progress": progress,
            "workaround": svc.workaround if svc else "",
            "eta": human_time(eta) if eta is not None else None,
            "eta_moved": event == "update" and lc.eta_moved(announced, eta),
            "previous_eta": human_time(announced) if announced is not None else None,
            "next_update": human_time(next_at) if next_at is not None else None,
            "duration": format_duration(max(end - inc.started_at, 0.0)),
            "started": human_time(inc.started_at),
            "now": human_time(now),
            "rto": format_duration(rto),
            "rto_verdict": "within" if end - inc.started_at <= rto else "over",
            "update_number": comms["seq"],
            "roles": dict(comms["roles"]),
        }

    def _view(
        self, inc: Incident, audience: str, event: str, text: str, next_at: float | None
    ) -> dict[str, Any]:
        """The incident-like dict the channel builders take (controller/notify/common.py)."""
        comms = inc.data.get("comms") or {}
        svc = self.config.services.get(inc.service)
        health = comms.get("health", "down")
        title = (
            inc.title
            if audience == "internal"
            else f"{inc.data.get('display') or display_name(inc.service, svc)} "
            f"{'is unavailable' if health == 'down' else 'is degraded'}"
        )
        return {
            "id": inc.id,
            "service": inc.service,
            "severity": inc.severity,
            "status": "resolved" if event == "resolved" else "open",
            "title": title,
            "started_at": inc.started_at,
            "public_status": comms.get("public_status", "investigating"),
            "message": text,
            "eta": next_at,
            "health": health,
        }

    def _send(
        self,
        inc: Incident,
        comms: dict[str, Any],
        event: str,
        now: float,
        message: str = "",
        automatic: bool = False,
        by: str | None = None,
    ) -> None:
        """One public message (opened, update, resolved, follow-up) to every channel, each in its
        audience's words. Keys are derived from the durable sequence number, so a crash before the
        state is saved re-queues the same keys, which the outbox ignores."""
        seq = comms["seq"] + (1 if event == "update" else 0)
        comms["seq"] = seq
        cadence = self.config.communications.cadence
        next_at = lc.next_update_at(inc.severity, now, cadence) if event in ("opened", "update") else None
        inc.data = {**inc.data, "comms": comms}
        tag = f"{event}-{seq}" if event == "update" else event
        texts: dict[str, str] = {}

        def words(audience: str) -> str:
            if audience not in texts:
                ctx = self._context(inc, comms, event, now, message, automatic, next_at)
                texts[audience] = self.templates.render(audience, event, ctx)
            return texts[audience]

        aud = self.config.communications.audiences
        notifiers = self.config.notifiers
        origin = "automatic" if automatic else ("human" if by else "controller")
        bevent = BUILDER_EVENT[event]
        for ch, audience in (("slack", aud.slack), ("teams", aud.teams)):
            if ch in self._channels:
                view = self._view(inc, audience, bevent, words(audience), next_at)
                payload = slack.message(view, bevent) if ch == "slack" else teams.message(view, bevent)
                self._enqueue(
                    inc, ch, f"{inc.id}/{ch}/{audience}/{tag}", payload, event, now, audience, origin
                )
        if "webhook" in self._channels:
            view = self._view(inc, aud.webhook, bevent, words(aud.webhook), next_at)
            payload = webhook.event(view, bevent, now)
            payload["event"] = f"incident.{event}"  # partners can tell a follow-up from the resolution
            payload["audience"] = aud.webhook
            self._enqueue(
                inc,
                "webhook",
                f"{inc.id}/webhook/{aud.webhook}/{tag}",
                payload,
                event,
                now,
                aud.webhook,
                origin,
            )
        if "email" in self._channels and notifiers.email is not None:
            for audience in aud.email:
                if not getattr(notifiers.email.to, audience):
                    continue
                view = self._view(inc, audience, bevent, words(audience), next_at)
                payload = email.message(view, bevent, audience)
                self._enqueue(
                    inc, "email", f"{inc.id}/email/{audience}/{tag}", payload, event, now, audience, origin
                )
        if "statuspage" in self._channels and notifiers.statuspage is not None and event != "followup":
            view = self._view(inc, aud.statuspage, bevent, words(aud.statuspage), next_at)
            sp = notifiers.statuspage
            payload = (
                statuspage.create(sp, view) if event == "opened" else statuspage.update(sp, view, bevent)
            )
            self._enqueue(
                inc,
                "statuspage",
                f"{inc.id}/statuspage/{aud.statuspage}/{tag}",
                payload,
                event,
                now,
                aud.statuspage,
                origin,
            )
        if event in ("opened", "update"):
            comms["last_update_at"] = now
            comms["eta_announced"] = comms.get("eta")
        comms["updates"] = [
            *comms.get("updates", []),
            {
                "at": now,
                "event": event,
                "status": comms["public_status"],
                "text": words("customers"),
                "eta": comms.get("eta") if event in ("opened", "update") else None,
                "next_update_at": next_at,
                "automatic": automatic,
                "by": by,
            },
        ][-MAX_UPDATES_KEPT:]
        self._wake = True

    def _enqueue(
        self,
        inc: Incident,
        channel: str,
        key: str,
        payload: dict[str, Any],
        event: str,
        now: float,
        audience: str,
        origin: str = "controller",
    ) -> None:
        if self.store.enqueue(channel, key, payload, inc.id, now):
            self.updates.labels(channel, event, origin).inc()
            self.store.append(
                inc.id,
                now,
                "notification",
                f"{channel} {event} queued for {audience}",
                {"key": key, "channel": channel, "audience": audience, "event": event},
            )

    # ------------------------------------------------------------------ metrics

    def _gauges(self, now: float) -> None:
        oldest: dict[str, float] = {}
        for msg in self.store.outbox():
            if not msg.dead:
                oldest[msg.channel] = min(oldest.get(msg.channel, msg.created_at), msg.created_at)
        for ch in self._channels:
            self.oldest.labels(ch).set(max(now - oldest[ch], 0.0) if ch in oldest else 0.0)


def _metric(kind: Any, name: str, doc: str, *args: Any, **kwargs: Any) -> Any:
    """Register on the controller's registry, or reuse the one already there: two controllers may
    share a Metrics (a restart inside one process, a test), and a duplicate would raise."""
    try:
        return kind(name, doc, *args, **kwargs)
    except ValueError:
        registry = kwargs["registry"]
        found = registry._names_to_collectors.get(name) or registry._names_to_collectors.get(name + "_total")
        if found is None:
            raise
        return found


def attach(controller: Host) -> Communicator:
    """Subscribe a Communicator to a controller: ticked after each reconcile."""
    comm = Communicator(controller)
    controller.tick_hooks.append(comm.tick)
    return comm
