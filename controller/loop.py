"""The controller: observe -> decide -> act -> record, on one asyncio loop.

Probes feed results in (`ingest`); `reconcile` builds an Observation and asks the pure `decide`
what to do; the decisions are acted on here, and every one of them is written to the incident's
timeline, the logs and the metrics. Only this module does I/O on behalf of the decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import socket
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from controller import decide as d
from controller import grouping
from controller.aws import client_factory
from controller.comms.communicator import attach
from controller.config import Config, resolve_secret
from controller.detect import (
    SERVICE_STATE_VALUE,
    Health,
    ProbeState,
    Rules,
    ServiceHealth,
    combine,
    discount,
    flapping,
    judge,
    observe,
    outcome,
    prior_rate,
    service_health,
)
from controller.durations import format_duration
from controller.leader import Elector
from controller.metrics import Metrics
from controller.notify import pagerduty
from controller.notify.outbox import Channel, Dispatcher
from controller.stores import Incident, OutboxMessage, Store
from playbooks.actions import ActionContext
from playbooks.engine import Engine, RunResult, render_plan
from probes import passive, resolve
from probes.base import ProbeResult
from probes.passive import PASSIVE_KINDS, Signals
from probes.runner import run_probe
from probes.scheduler import OVERLAP, Scheduler

log = structlog.get_logger("continuity.controller")


def new_identity() -> str:
    """A run owner's name when there is no elector: host, process and a random part (a restarted
    process is a new owner, so it takes over the runs of the one that died)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


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
        self.prober = prober
        """Runs one polled probe (the network edge): the simulation (tests/sim) passes its world's."""
        self.elector = elector
        self._elector_stop = asyncio.Event()
        self.store = store
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.aws = aws or client_factory(config.aws)
        self._aws_given = aws is not None
        self.identity = getattr(elector, "identity", None) or new_identity()
        """Who owns the runs this process executes (the elector's identity when there is one)."""
        self.engine = Engine(store, self.metrics, clock, owner=self.identity)
        self.states: dict[str, ProbeState] = {name: ProbeState() for name in config.probes}
        """The verdict per probe, all vantage points combined under the quorum."""
        self.vstates: dict[str, dict[str, ProbeState]] = {name: {} for name in config.probes}
        self._bursting: set[str] = set()
        self._burst_tasks: set[asyncio.Task[None]] = set()
        self._tries: dict[str, list[ProbeResult]] = {}
        """The burst's tries of each probe's current failing streak (detect.judge weighs them)."""
        self._cleared: dict[str, float] = {}
        """When a scheduled run of each probe last passed: a burst in flight stops there."""
        self.burst_notes: dict[str, tuple[float, str]] = {}
        self.isolated_since: float | None = None
        self._cut_since: float | None = None
        """While the reference targets fail together: since when the controller may have been cut off
        (the latest pass of a failing reference); None when not."""
        self._cut_windows: list[tuple[float, float]] = []
        """Recent closed [since, until) windows: a run started inside one is no evidence when it lands."""
        self._ref_passed: dict[str, float] = {}
        """When each reference target's latest passing local run started."""
        self.task_backoff: tuple[float, float] = (0.5, 30.0)
        """First and longest pause before a failed background task restarts (doubling between)."""
        self._prober_logged: dict[str, float] = {}
        resolve.configure(config.controller.resolver_nameservers)
        self.signals = Signals(started_at=clock())
        self._load_signals()
        self.impact = {name: p.impact for name, p in config.probes.items()}
        self.running: dict[str, asyncio.Task[RunResult]] = {}
        self._live: dict[str, asyncio.Task[RunResult]] = {}
        """Run id -> the task of this process executing it."""
        self.last_run_started: dict[str, float] = {}
        self.incident_runs: dict[str, int] = {}
        self.run_starts: list[float] = []
        """When automatic runs started, for the cap on runs per hour."""
        self.floors: dict[str, str] = {}
        self._held: dict[str, str] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._probe_tasks: list[asyncio.Task[Any]] = []
        self._probe_stop = asyncio.Event()
        self._kick = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        """Observers of what the controller does (the demo prints them): (kind, facts)."""
        self.tick_hooks: list[Callable[[float], None]] = []
        """Called with the time at the end of each reconcile (the communicator speaks there)."""
        self._env = env
        self._refresh_task: asyncio.Task[None] | None = None
        self.leadership_hooks: list[Callable[[bool], None]] = []
        """Called with True when this replica starts leading and False when it stops (pod label)."""
        self.dispatcher = Dispatcher(
            store,
            self._pagerduty_channel(config),
            clock,
            on_event=self._delivery_event,
            first_retry=config.controller.outbox_retry,
        )
        self.dispatcher.may_send = self.may_act
        self.dispatcher.on_error = self.metrics.task_restarts.labels("outbox").inc
        self._recover_from_restart()
        self.communicator = attach(self)

    # ------------------------------------------------------------------ start-up

    def _pagerduty_channel(self, config: Config) -> dict[str, Channel]:
        """PagerDuty is the controller's own channel (pages); the communicator adds the others."""
        pd = config.notifiers.pagerduty
        if pd is None:
            return {}
        key = self._env(pd.routing_key_env)
        return {
            "pagerduty": Channel(
                "pagerduty",
                lambda p: (
                    pagerduty.url_for(pd, p["kind"]),
                    {"routing_key": key, **p["body"]},
                ),
                rate_per_minute=pd.rate_per_minute,
            )
        }

    def _stored_signals(self) -> tuple[dict[str, str], dict[str, str]]:
        return self.store.flags("heartbeat:"), self.store.flags("alert:")

    async def _refresh_signals(self) -> None:
        """A standby's copy of the pushed signals, read off the loop (a sick API must not stall it)."""
        try:
            stored = await asyncio.to_thread(self._stored_signals)
        except Exception as exc:  # next tick tries again; the leader is unaffected
            log.debug("standby could not refresh pushed signals", error=f"{type(exc).__name__}: {exc}")
            return
        if not self.may_act():  # a leader's own copy is newer than a read that started before it led
            self._load_signals(stored)

    def _load_signals(self, stored: tuple[dict[str, str], dict[str, str]] | None = None) -> None:
        """Pushed signals kept in the store: heartbeats jobs sent and alerts still firing (each sent
        only once by Alertmanager). Read at start, by a standby every tick and again on becoming
        leader: pushes reach the leader only, and a standby whose passive probes judged from stale
        signals would, on taking over, resolve the open incident and reopen it (a second page)."""
        heartbeats, alerts = stored if stored is not None else self._stored_signals()
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

    def _recover_from_restart(self) -> None:
        """Pick up where a previous process stopped: cooldowns and runs per incident. Runs to resume
        are found by `decide` from the failover states and the runs' owners, not here."""
        self._left_running: set[str] = set()
        """Runs found running when this process started or became leader: the only runs by hand
        (no service state owns them) it may resume; a CLI run started later may be alive."""
        for run in self.store.runs():
            if run.state == "running":
                self._left_running.add(run.id)
            if run.service and run.service != "manual":
                self.last_run_started[run.service] = max(
                    self.last_run_started.get(run.service, 0), run.started_at
                )
                self.run_starts.append(run.started_at)
            if run.incident_id:
                self.incident_runs[run.incident_id] = self.incident_runs.get(run.incident_id, 0) + 1
        for inc in self.store.list_incidents(status="open"):
            floor = inc.data.get("severity_floor")
            if floor:
                self.floors[inc.id] = floor

    # ------------------------------------------------------------------ observe

    def ingest(self, result: ProbeResult) -> None:
        """Fold a probe result (local or from an agent) into detection state.

        Local results that make a probe SUSPECT start a confirmation burst; the per-vantage verdicts
        are then combined under the quorum, and a change of verdict triggers a reconcile at once.
        """
        name = result.probe
        if name not in self.states:
            return
        if result.prober_error:
            self._prober_error(result)
            return  # our trouble is no vote: the probe's state (and its freshness) stays as it was
        vantage = result.vantage
        local = vantage == "local"
        if local and name in self.config.detection.reference_probes:
            if result.ok:
                self._ref_passed[name] = max(self._ref_passed.get(name, result.started_at), result.started_at)
        elif local and not result.ok and self._cut_off(result.started_at):
            return  # run while the controller itself was cut off: no vote (the probe goes stale)
        rules = self.config.rules(name, confirm=local)
        before = self.vstates[name].get(vantage, ProbeState())
        after = observe(before, result, rules=rules)
        if local and rules.confirm:
            if after.first_failure_at is None:
                self._tries.pop(name, None)  # the streak is over, and its tries with it
                if result.ok:
                    self._cleared[name] = self.clock()
            else:
                after = judge(after, self._tries.get(name, ()), rules)
        self.vstates[name][vantage] = after
        self.metrics.probe_success.labels(name, vantage).set(1 if result.ok else 0)
        self.metrics.probe_duration.labels(name, vantage).observe(result.latency)
        if not result.ok and before.failures == 0 and before.degraded == 0:
            self._emit(
                "probe_failed", probe=name, reason=result.reason, at=result.started_at, vantage=vantage
            )
        # The first failed run starts the burst (its tries count; detect.judge): nothing waits for the
        # threshold. A failed run with no burst in flight starts one: a burst that could not decide
        # (its runs were prober errors, or it crashed) is retried, never left suspect for good.
        if local and rules.confirm and outcome(result) == "failed" and after.status is not Health.DOWN:
            self._start_burst(name)
        self._recombine(name, result)

    def _start_burst(self, name: str) -> None:
        if name not in self._bursting:
            self._bursting.add(name)
            task = asyncio.create_task(self._confirm(name))
            self._burst_tasks.add(task)
            task.add_done_callback(self._burst_tasks.discard)

    def _late(self, name: str) -> None:
        """The scheduler's word that a run of `name` is still in flight at its next slot: a suspicion
        (never a failure) that starts the burst now rather than a whole timeout later."""
        if name in self.states and self.config.rules(name).confirm:
            if self.vstates[name].get("local", ProbeState()).status is not Health.DOWN:
                self._start_burst(name)

    def _recombine(self, name: str, result: ProbeResult) -> None:
        before = self.states[name]
        after = combine(
            self.vstates[name].values(), self.config.quorum(name), self.config.freshness(name), self.clock()
        )
        self.states[name] = after
        if after.status is before.status:
            return
        rules = self.config.rules(name)
        self.metrics.probe_flapping.labels(name).set(1 if flapping(after, self.clock(), rules) else 0)
        votes = {v: s.status.value for v, s in self.vstates[name].items()}
        verdict = f"probe {name} is {after.status.value.upper()}"
        if after.status is Health.DOWN:
            verdict += f" after {after.failures} consecutive failures: {result.reason}"
        elif after.status is Health.DEGRADED:
            verdict += f" after {after.degraded} degraded runs: {result.reason}"
        elif before.status is Health.DOWN:
            verdict += f" after {after.successes} consecutive successes"
        if len(votes) > 1:
            verdict += f" (vantage points: {', '.join(f'{v} {s}' for v, s in sorted(votes.items()))})"
        log.info("probe verdict", probe=name, status=after.status.value, reason=result.reason, votes=votes)
        self._emit("probe_verdict", probe=name, status=after.status.value, at=result.started_at)
        # The timeline is the leader's to write: a standby appending its own verdicts would double
        # every entry, and would block its event loop on the store while the API is sick.
        try:
            for svc in self.config.services_of(name) if self.may_act() else ():
                inc = self.store.open_incident_for(svc)
                if inc is not None:
                    self.store.append(inc.id, result.started_at, "probe", verdict, result.to_dict())
        except Exception:  # a store error must not stop detection: the verdict stands, the loop is kicked
            log.exception("cannot record a probe verdict on the timeline", probe=name)
            self.metrics.task_restarts.labels("ingest").inc()
        self._kick.set()

    def _prober_error(self, result: ProbeResult) -> None:
        """Our own trouble (fd limit, resolver, stalled loop): counted, logged, and the controller's
        own alert (ContinuityProberErrors on continuity_prober_errors_total) fires; the target's
        state is untouched. Logged at most once a minute per kind: at the fd limit every probe fails."""
        kind = result.prober_error or "unknown"
        self.metrics.prober_errors.labels(kind).inc()
        now = self.clock()
        if now - self._prober_logged.get(kind, float("-inf")) >= 60.0:
            self._prober_logged[kind] = now
            log.error(
                "prober error: the controller itself cannot probe; the result counts as UNKNOWN, not as "
                "the target failing",
                kind=kind,
                probe=result.probe,
                error=result.reason,
            )
        # `kind` is _emit's own first parameter: the prober error's kind goes as `prober_error`.
        self._emit("prober_error", probe=result.probe, prober_error=kind, message=result.reason)

    async def run_once(self, name: str, cfg: Any) -> ProbeResult:
        """Run a probe once: polled kinds go out on the network, passive ones read pushed signals."""
        if cfg.kind in PASSIVE_KINDS:
            return passive.evaluate(name, cfg, self.signals, self.clock())
        return await self.prober(name, cfg)

    def heartbeat(self, name: str) -> None:
        now = self.clock()
        self.signals.heartbeats[name] = now
        self.store.set_flag(f"heartbeat:{name}", repr(now))

    def alertmanager(self, payload: Any) -> tuple[int, int]:
        """Apply an Alertmanager webhook; matching probes are re-evaluated at once."""
        before = dict(self.signals.alerts)
        applied, dupes = passive.apply_alertmanager(self.signals, payload, self.clock())
        for fp, alert in self.signals.alerts.items():
            if before.get(fp) is not alert:  # kept while firing: a restart must not forget it
                firing = alert.status == "firing"
                self.store.set_flag(f"alert:{fp}", json.dumps(dataclasses.asdict(alert)) if firing else None)
        if applied:
            for name, cfg in self.config.probes.items():
                if cfg.kind == "alertmanager":
                    self.ingest(passive.evaluate(name, cfg, self.signals, self.clock()))
        return applied, dupes

    async def _confirm(self, name: str) -> None:
        """Gather the evidence on a probe showing trouble (detect.judge decides): tries from the first
        sign of it, and a note for the timeline with what they found."""
        try:
            cfg = self.config.probes[name]
            spec = self.config.detection.confirm
            ran = await self._burst(name, cfg, self.config.rules(name), spec.spacing)
            if not ran:
                return
            new = self.vstates[name].get("local", ProbeState())
            failed = sum(1 for b in ran if not b.ok)
            outcome_text = {
                Health.DOWN: "confirmed: DOWN",
                Health.SUSPECT: f"all failed, but it failed {prior_rate(new):.0%} of its runs before this "
                "streak: not yet beyond chance, still SUSPECT",
            }.get(new.status, "not confirmed, back to UP")
            if new.status is Health.SUSPECT and failed < len(ran):
                outcome_text = "not confirmed"
            note = f"confirmation burst for {name}: {failed} of {len(ran)} runs failed, {outcome_text}"
            self.burst_notes[name] = (ran[-1].started_at, note)
            log.info(
                "confirmation burst", probe=name, failed=failed, runs=len(ran), down=new.status is Health.DOWN
            )
            self._emit("burst", probe=name, message=note)
        except Exception:  # supervised: logged and counted; the next failed run starts a new burst
            log.exception("confirmation burst failed", probe=name)
            self.metrics.task_restarts.labels("burst").inc()
        finally:
            self._bursting.discard(name)

    async def _burst(self, name: str, cfg: Any, rules: Rules, spacing: float) -> list[ProbeResult]:
        """Tries `spacing` apart until the streak holds threshold + probes failed runs (scheduled runs
        count), then one closing try once the failed runs can span `rules.confirm_span`. Tries do not
        wait for each other: a hanging target costs one timeout, not one per try. Each try is judged
        as it lands (detect.judge); the burst ends at DOWN, at a pass (a try's or a scheduled run's),
        or when nothing more can be learned. Returns the tries in start order."""
        loop = asyncio.get_running_loop()
        watch: Scheduler | None = getattr(self, "scheduler", None)  # its loop-stall watchdog
        reference = name in self.config.detection.reference_probes
        need = rules.failure_threshold + rules.confirm_probes
        cap = need + rules.confirm_probes  # tries in one burst at most; a failed run starts the next
        tries = self._tries.setdefault(name, [])
        ran: list[ProbeResult] = []
        flying: dict[asyncio.Task[ProbeResult], float] = {}  # task -> its start on self.clock
        began = self.clock()
        deadline = loop.time() + rules.confirm_span + 2 * cfg.timeout + cfg.interval + need * spacing
        next_at = loop.time()
        launched = 0
        passed = False

        async def one() -> ProbeResult:
            t0 = loop.time()
            r = await self.run_once(name, cfg)
            if (
                not r.ok
                and r.prober_error is None
                and (stalled := watch.stalled_during(t0, loop.time()) if watch else 0)
            ):
                r = dataclasses.replace(
                    r, prober_error="loop_stall", error=f"event loop blocked {stalled:.1f}s"
                )
            return r

        def land(r: ProbeResult) -> None:
            nonlocal passed
            ran.append(r)
            if r.prober_error:
                self._prober_error(r)  # our trouble is no evidence
                return
            if not r.ok and not reference and self._cut_off(r.started_at):
                return  # run while the controller may be cut off: no evidence (the references' own is)
            passed = passed or outcome(r) != "failed"
            tries.append(r)
            st = self.vstates[name].get("local", ProbeState())
            new = judge(st, self._tries.get(name, ()), rules)
            if new is not st:
                self.vstates[name]["local"] = new
                self._recombine(name, r)

        try:
            while loop.time() < deadline:
                st = self.vstates[name].get("local", ProbeState())
                if passed or st.status is Health.DOWN or self._cleared.get(name, float("-inf")) >= began:
                    break
                if self._tries.get(name) is not tries:  # the streak ended and a new one began
                    break
                first = st.first_failure_at
                streak = [t for t in tries if first is not None and t.started_at >= first]
                have = st.failures + len(streak) + len(flying)
                starts = [*flying.values(), *(t.started_at for t in streak)]
                if st.last is not None and first is not None:
                    starts.append(st.last.started_at)
                # Gather the count first, keeping one try back to close the span; with no failure yet
                # (a run in flight past its slot), that run will be one when it lands.
                quick = need - 1 if first is not None else need - 2
                launch_at: float | None = None
                if launched < cap and have < quick:
                    launch_at = next_at
                elif (
                    launched < cap
                    and first is not None
                    and (have < need or max(starts) - first < rules.confirm_span)
                ):
                    launch_at = max(next_at, loop.time() + first + rules.confirm_span - self.clock())
                elif not flying:
                    break  # nothing in flight and nothing more to launch: the evidence is in
                now = loop.time()
                if launch_at is not None and launch_at <= now:
                    task = asyncio.create_task(one())
                    flying[task] = self.clock()
                    launched += 1
                    next_at = now + spacing
                    continue
                wait = min(deadline, launch_at if launch_at is not None else now + max(spacing, 0.05)) - now
                if flying:
                    done, _ = await asyncio.wait(
                        set(flying), timeout=max(wait, 0.0), return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in sorted(done, key=lambda t: flying[t]):
                        del flying[task]
                        if not task.cancelled() and task.exception() is None:
                            land(task.result())
                else:
                    await asyncio.sleep(max(wait, 0.0))
        finally:
            for t in flying:
                t.cancel()
            await asyncio.gather(*flying, return_exceptions=True)
        ran.sort(key=lambda r: r.started_at)
        return ran

    def probe_healthy(self, name: str) -> bool | None:
        status = self.states[name].status if name in self.states else Health.UNKNOWN
        return None if status is Health.UNKNOWN else status is Health.UP

    def health(self) -> dict[str, ServiceHealth]:
        now = self.clock()
        # Only a probe that has changed verdict recently can be flapping: skip building rules for the rest.
        flaps = [p for p, st in self.states.items() if st.changes and flapping(st, now, self.config.rules(p))]
        rules, fresh = self._probe_settings()
        return {
            name: service_health(
                name, svc.probes, self.states, self.impact, flaps, now=now, freshness=fresh, rules=rules
            )
            for name, svc in self.config.services.items()
        }

    def _probe_settings(self) -> tuple[dict[str, Rules], dict[str, float]]:
        """Each probe's rules and freshness, built once per config (health() runs every tick)."""
        cached = getattr(self, "_settings_cache", None)
        if cached is None or cached[0] is not self.config:
            cfg = self.config
            cached = (
                cfg,
                {p: cfg.rules(p) for p in cfg.probes},
                {p: cfg.freshness(p) for p in cfg.probes},
            )
            self._settings_cache = cached
        return cached[1], cached[2]

    def references(self) -> tuple[bool, bool, str]:
        """(ok, isolated, note): ok while every reference target is UP with no failure in its current
        streak (unknown is not up); isolated when `isolation_quorum` of them (default: all) are DOWN."""
        det = self.config.detection
        refs = det.reference_probes
        if not refs:
            return True, False, ""
        seen = {r: self.states.get(r, ProbeState()) for r in refs}  # validate checks the names
        bad = {r: st for r, st in seen.items() if st.status is not Health.UP or st.failures}
        down = sum(1 for st in seen.values() if st.status is Health.DOWN)
        isolated = down >= (det.isolation_quorum or len(refs))
        note = ", ".join(f"{r} {st.status.value}" for r, st in bad.items())
        return not bad, isolated, note

    def _failover_observation(self) -> dict[str, Any]:
        """The persisted failover state of every service and the runs it needs to decide on: those
        a state names and every run still running or awaiting approval (one read of each)."""
        states = {
            name: d.FailoverView(r.state, r.run_id, r.incident_id, r.since, r.reason, r.version)
            for name, r in self.store.failover_states().items()
        }
        named = {fo.run_id for fo in states.values() if fo.run_id}
        answers = self.store.flags("approval:")
        escalated = self.store.flags("escalated:")
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
                live=r.id in self._live and not self._live[r.id].done(),
                answer=answers.get(f"approval:{r.id}"),
                escalated=f"escalated:{r.id}" in escalated,
            )
            for r in self.store.runs()
            if r.id in named
            or (
                r.state in d.LIVE_RUN_STATES
                and (r.service in self.config.services or r.id in self._left_running)
            )
        }
        failed_over = {n: fo.incident_id or "" for n, fo in states.items() if fo.state == "failed_over"}
        return {"failover": states, "runs": runs, "identity": self.identity, "failed_over": failed_over}

    def isolation_forming(self) -> bool:
        """True while `isolation_quorum` reference targets fail, confirmed or not: no incident opens
        until their bursts decide, so a cut-off controller whose service probes happen to be
        confirmed first does not page for an outage that is its own."""
        det = self.config.detection
        refs = det.reference_probes
        if not refs:
            return False
        failing = sum(
            1
            for r in refs
            if (st := self.states.get(r, ProbeState())).status in (Health.SUSPECT, Health.DOWN)
            or (st.status is not Health.UNKNOWN and st.failures)
        )
        return failing >= (det.isolation_quorum or len(refs))

    def _cut_off(self, at: float) -> bool:
        """Was the controller possibly cut off when a run started at `at`? (Reference probes' own
        runs are never asked: they are how isolation is seen.)"""
        if self._cut_since is not None and at >= self._cut_since:
            return True
        return any(a <= at < b for a, b in self._cut_windows)

    def _track_cut(self, now: float) -> None:
        """Open a cut-off window when the reference targets fail together; when they stop failing
        together, forget every failure the other probes saw inside it (detect.discount): a verdict
        built while isolated must not start a failover the moment the references pass again."""
        refs = self.config.detection.reference_probes
        if not refs:
            return
        forming = self.isolation_forming()
        if forming and self._cut_since is None:
            failing = [
                r
                for r in refs
                if (st := self.states.get(r, ProbeState())).status in (Health.SUSPECT, Health.DOWN)
                or st.failures
            ]
            # The cut began after the latest pass of a failing reference; none seen: since ever.
            self._cut_since = max((self._ref_passed.get(r, float("-inf")) for r in failing), default=now)
        elif not forming and self._cut_since is not None:
            since, self._cut_since = self._cut_since, None
            self._cut_windows = [*self._cut_windows[-3:], (since, now)]
            forgotten = []
            for name, per in self.vstates.items():
                if name in refs or "local" not in per:
                    continue
                before = per["local"]
                after = discount(before, since, now)
                if after is before:
                    continue
                per["local"] = after
                self.states[name] = combine(
                    per.values(), self.config.quorum(name), self.config.freshness(name), now
                )
                if after.status is not before.status:
                    forgotten.append(f"{name} {before.status.value} -> {after.status.value}")
            note = (
                "reference targets pass again: failures seen while they failed together are not "
                "evidence" + (f" ({', '.join(forgotten)})" if forgotten else "")
            )
            log.warning(note, since=since, until=now)
            self._emit("references", ok=True, message=note)

    def _isolation_count(self) -> str:
        det = self.config.detection
        refs = det.reference_probes
        down = sum(1 for r in refs if self.states.get(r, ProbeState()).status is Health.DOWN)
        return f"{down} of {len(refs)} (isolation quorum {det.isolation_quorum or len(refs)})"

    def _isolation(self, isolated: bool, note: str, now: float) -> None:
        """One 'controller isolated' alert while every reference target is down; resolved when one is back."""
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
                self.store.set_flag("isolation_key", key)
                body = pagerduty.trigger(
                    pd,
                    dedup_key=key,
                    summary=f"Continuity controller isolated: {self._isolation_count()} reference targets "
                    f"down ({note}); no incident opens and automatic failover is suspended",
                    severity="critical",
                    service="continuity",
                    tier="critical",
                    ts=now,
                    details={"reference_probes": self.config.detection.reference_probes, "note": note},
                )
                self._enqueue(None, f"{key}/trigger", body, "isolation alert")
        elif not isolated and self.isolated_since is not None:
            log.warning("controller no longer isolated", after_s=round(now - self.isolated_since, 1))
            self._emit("isolated", message="controller no longer isolated")
            self.isolated_since = None
            open_key = self.store.get_flag("isolation_key")
            if pd is not None and open_key:
                self._enqueue(None, f"{open_key}/resolve", pagerduty.resolve(open_key), "isolation resolved")
                self.store.set_flag("isolation_key", None)

    def silenced(self, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        for window in self.config.maintenance:
            if window.start.timestamp() <= now < window.end.timestamp():
                for svc in window.services:
                    out[svc] = f"maintenance until {window.end.isoformat()}" + (
                        f": {window.reason}" if window.reason else ""
                    )
        for key, value in self.store.flags("silence:").items():
            until, _, reason = value.partition("|")
            if float(until) > now:
                out[key.removeprefix("silence:")] = (
                    f"silenced until {time.strftime('%H:%M:%S UTC', time.gmtime(float(until)))}"
                    + (f": {reason}" if reason else "")
                )
        return out

    def observation(self) -> d.Observation:
        incidents = {}
        # One read for every open incident, not one per service (20,000 probes: 2,000 services).
        # Newest first, so if a service ever had two open, the newest is the one it acts on.
        for inc in reversed(self.store.list_incidents(status="open", limit=1_000_000)):
            if inc.service in self.config.services:
                incidents[inc.service] = d.OpenIncidentView(
                    inc.id, inc.severity, self.floors.get(inc.id), self.incident_runs.get(inc.id, 0)
                )
        running = frozenset(s for s, t in self.running.items() if not t.done())
        now = self.clock()
        self._track_cut(now)
        refs_ok, isolated, refs_note = self.references()
        self._isolation(isolated, refs_note, now)
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
        return d.Observation(
            now,
            self.health(),
            incidents,
            running,
            dict(self.last_run_started),
            runs_last_hour=sum(1 for t in self.run_starts if now - t < 3600),
            paused=self.store.get_flag("paused"),
            frozen={k.removeprefix("frozen:"): v for k, v in self.store.flags("frozen:").items()},
            silenced=self.silenced(now),
            **self._failover_observation(),
            up_since={p: s.changed_at or now for p, s in self.states.items() if s.status is Health.UP},
            references_ok=refs_ok,
            references_note=refs_note,
            isolated=isolated or self.isolation_forming(),
        )

    # ------------------------------------------------------------------ decide + act

    async def reconcile(self) -> list[d.Decision]:
        obs = self.observation()
        for name, h in obs.health.items():
            self.metrics.service_state.labels(name).set(SERVICE_STATE_VALUE[h.state])
        self.metrics.paused.set(1 if obs.paused is not None else 0)
        for name in self.config.services:
            self.metrics.silenced.labels(name).set(1 if name in obs.silenced else 0)
        decisions = d.decide(obs, self.config)
        for decision in decisions:
            await self._act(decision, obs)
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
        elif isinstance(decision, d.Transition):
            self._transition(decision, now)
        elif isinstance(decision, d.ResumeRun):
            self._resume_run(decision, now)
        elif isinstance(decision, d.AbandonRun):
            self.store.update_run(decision.run_id, state="abandoned", ended_at=now, error=decision.reason)
            if decision.incident_id:
                self.store.append(decision.incident_id, now, "playbook", decision.reason)
            log.warning("run abandoned", run=decision.run_id, reason=decision.reason)
        elif isinstance(decision, d.Escalate):
            self.store.set_flag(f"escalated:{decision.run_id}", str(now))
            if decision.incident_id:
                self.store.append(decision.incident_id, now, "approval", decision.reason)
                self._page_incident(
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
                grouping.record_join(self.store, self.config, decision.incident_id, decision.service)
                log.info("joined incident", service=decision.service, incident=decision.incident_id)
        elif isinstance(decision, d.Hold):
            key = decision.key or decision.reason
            iid = decision.incident_id
            if iid is None and key in ("references", "isolated"):  # opened in this same cycle
                inc = self.store.open_incident_for(decision.service)
                iid = inc.id if inc is not None else None
            if self._held.get(decision.service) != key and iid:
                self._held[decision.service] = key
                self.store.append(iid, now, "decision", decision.reason)
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
        title, data = grouping.on_open(self.config, dec.service, self.health(), title, data)
        inc = self.store.open_incident(dec.service, dec.severity, title[:500], now, started, data)
        for probe in h.failing:
            st = self.states[probe]
            at, note = self.burst_notes.get(probe, (0.0, ""))
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
        """Create the run, then move the service's state to it (compare-and-swap): a run whose state
        did not move is never executed. Stopping in between leaves a run no state owns, which the
        next `decide` adopts."""
        if dec.incident_id is None:  # decided in the same cycle that opened the incident
            inc = self.store.open_incident_for(dec.service)
            if inc is not None:
                dec = dataclasses.replace(dec, incident_id=inc.id)
        pb = self.config.playbooks[dec.playbook]
        run = self.engine.create(
            dec.playbook,
            pb,
            incident_id=dec.incident_id,
            service=dec.service,
            dry_run=self.config.controller.dry_run,
            state="awaiting_approval" if dec.approval else "running",
        )
        moved = self._move(
            dec.service, dec.frm, dec.to, dec.version, run.id, dec.incident_id, dec.reason, dec.checks, now
        )
        if not moved:
            self.store.update_run(
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
                self._page_incident(
                    dec.incident_id,
                    f"approval-{run.id}",
                    f"approval needed for {dec.playbook} (run {run.id})",
                )
            log.warning("playbook awaits approval", service=dec.service, playbook=dec.playbook, run=run.id)
            self._emit("approval_requested", run_id=run.id, playbook=dec.playbook, plan=plan)
            return
        log.warning("starting playbook", service=dec.service, playbook=dec.playbook, reason=dec.reason)
        self._launch(dec.service, dec.playbook, dec.incident_id, run.id)

    def _move(
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
        rec = self.store.transition_failover(service, version, to, run_id, incident_id, reason, now)
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

    def _transition(self, dec: d.Transition, now: float) -> None:
        if dec.freeze is not None:
            self._freeze(dec, dec.freeze, now)
        if dec.close_run is not None and dec.run_id:
            self.store.update_run(dec.run_id, state=dec.close_run, ended_at=now, error=dec.reason)
            if dec.incident_id:
                self.store.append(dec.incident_id, now, "approval", dec.reason)
            if dec.close_run == "expired" and dec.incident_id:
                run = self.store.get_run(dec.run_id)
                playbook = run.playbook if run else "the playbook"
                self._page_incident(
                    dec.incident_id, f"expired-{dec.run_id}", f"approval for {playbook} expired"
                )
        if not self._move(
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
            run = self.store.get_run(dec.run_id)
            if run is not None:
                self.store.update_run(run.id, state="running")
                self._launch(dec.service, run.playbook, run.incident_id, run.id)

    def _freeze(self, dec: d.Transition, fz: d.Freeze, now: float) -> None:
        """A failed run: freeze the playbook for the service, raise the incident to critical, page.
        Done before the transition is persisted, so a crash in between decides it again (every
        step here is idempotent)."""
        self.store.set_flag(f"frozen:{dec.service}", dec.run_id or "?")
        inc = self.store.get_incident(dec.incident_id) if dec.incident_id else None
        if inc is None:
            return
        what = "a guard stopped the recovery" if fz.blocked else "automatic recovery failed"
        if inc.status == "open":
            self.floors[inc.id] = "critical"
            self.store.update_incident(
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
        self._page_incident(inc.id, "blocked" if fz.blocked else "playbook-failed", what)

    def _resume_run(self, dec: d.ResumeRun, now: float) -> None:
        """Take a run over from an owner that stopped (compare-and-swap on the owner) and continue
        it from its journal: done steps are skipped, the step in hand is checked before re-applying."""
        if dec.playbook not in self.config.playbooks:
            return
        if not self.store.claim_run(dec.run_id, self.identity, dec.owner):
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
        ctx = self._context(incident_id, service)
        dry = self.config.controller.dry_run
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
        self._emit(
            "playbook_done", playbook=playbook, ok=result.ok, error=result.error, duration_s=result.duration
        )
        self._kick.set()
        return result

    def _page_incident(self, incident_id: str, event: str, note: str) -> None:
        """Page about an open incident; about a resolved one (a failback awaiting approval) send a
        PagerDuty change event instead, because a trigger with its dedup_key would reopen the alert."""
        inc = self.store.get_incident(incident_id)
        if inc is None:
            return
        if inc.status == "open":
            self._page(inc, event, note)
            return
        pd = self.config.notifiers.pagerduty
        if pd is not None:
            body = pagerduty.change(
                pd, summary=f"{inc.service}: {note}", ts=self.clock(), details={"incident_id": inc.id}
            )
            self._enqueue(
                inc.id, f"{inc.id}/pagerduty/change/{event}", body, f"PagerDuty change event queued: {note}"
            )

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

    def may_act(self) -> bool:
        """Only the leader decides, runs playbooks and sends notifications; standbys only probe."""
        return self.elector is None or self.elector.is_leader()

    async def _tick_loop(self) -> None:
        was_leader = False
        while not self.stop_event.is_set():
            try:
                leader = self.may_act()
                if leader != was_leader and self.elector is not None:
                    for hook in self.leadership_hooks:
                        hook(leader)
                if leader and not was_leader and self.elector is not None:
                    self._became_leader()
                was_leader = leader
                if leader:
                    await self.reconcile()
                else:
                    # At most one refresh in flight, never awaited here: a sick API must not slow the tick.
                    if self._refresh_task is None or self._refresh_task.done():
                        self._refresh_task = asyncio.create_task(self._refresh_signals(), name="signals")
                    for name, h in self.health().items():
                        self.metrics.service_state.labels(name).set(SERVICE_STATE_VALUE[h.state])
                    self.metrics.last_tick.set(self.clock())
            except Exception:  # a bug in one cycle must not stop the controller
                log.exception("reconcile failed; the next cycle retries")
                self.metrics.task_restarts.labels("reconcile").inc()
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
            self._tasks.append(self._supervise("reconcile", self._tick_loop, self.stop_event))
        self._tasks.append(
            self._supervise(
                "outbox", lambda: self.dispatcher.run(self.stop_event, period=0.5), self.stop_event
            )
        )
        if self.elector is not None:
            # Its own stop event: the lease is released only after the step in hand has finished.
            self._elector = asyncio.create_task(self.elector.run(self._elector_stop), name="leader")
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
        self._recover_from_restart()  # runs to take over are decided by the next reconcile
        try:
            self._load_signals()
        except Exception:  # the store is sick: the signals come back with the next push or tick
            log.exception("could not read pushed signals from the store")

    async def reload(self, new: Config) -> None:
        """Swap in a validated config. Probes whose settings did not change keep their history, so a
        reload never resets a failure streak; runs in progress finish with the playbook they started."""
        old = self.config
        channels = self._pagerduty_channel(new)  # a missing secret refuses the reload before any change
        self._probe_stop.set()
        for t in self._probe_tasks:
            t.cancel()
        await asyncio.gather(*self._probe_tasks, return_exceptions=True)
        self.config = new
        same = {name for name, cfg in new.probes.items() if name in old.probes and old.probes[name] == cfg}
        self.states = {name: self.states[name] if name in same else ProbeState() for name in new.probes}
        self.vstates = {name: self.vstates[name] if name in same else {} for name in new.probes}
        self.impact = {name: p.impact for name, p in new.probes.items()}
        self._rebuild_derived(old, new, channels)
        resolve.configure(new.controller.resolver_nameservers)
        self._start_probes()
        self._kick.set()

    def _rebuild_derived(self, old: Config, new: Config, channels: dict[str, Channel]) -> None:
        """Everything else built from the config: notifier channels (added, changed, removed; queued
        messages of a removed channel wait for its return) and the AWS client factory. Runs in
        progress keep the clients they started with."""
        self.dispatcher.channels.clear()
        self.dispatcher.channels.update(channels)
        self.communicator._add_channels()
        self.dispatcher.buckets.clear()
        if new.aws != old.aws and not self._aws_given:
            self.aws = client_factory(new.aws)
        self.dispatcher.wake.set()
        log.info("config reloaded", channels=sorted(self.dispatcher.channels), probes=len(new.probes))

    def _start_probes(self) -> None:
        """One scheduler for every probe: stable offsets spread over each interval, per-host limits,
        and never two runs of the same probe at once (probes/scheduler.py)."""
        self._probe_stop = asyncio.Event()
        self.scheduler = Scheduler(
            dict(self.config.probes), self.run_once, self.ingest, per_probe=OVERLAP, on_late=self._late
        )
        stop = self._probe_stop
        self._probe_tasks = [self._supervise("probes", lambda: self.scheduler.run(stop), stop)]

    def _supervise(
        self, name: str, run: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> asyncio.Task[None]:
        """Run a background task for as long as `stop` is unset: an error is logged, counted in
        continuity_task_restarts_total{task}, and the task restarts after a pause that doubles from
        task_backoff[0] to task_backoff[1] (reset once it has run a minute without failing). A full
        disk for 12 s must delay pages, never end paging until a restart."""

        async def supervised() -> None:
            loop = asyncio.get_running_loop()
            first, longest = self.task_backoff
            delay = first
            while not stop.is_set():
                began = loop.time()
                try:
                    await run()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if loop.time() - began >= 60.0:
                        delay = first
                    log.exception("background task failed; restarting it", task=name, in_s=round(delay, 2))
                    self.metrics.task_restarts.labels(name).inc()
                    try:
                        await asyncio.wait_for(stop.wait(), timeout=delay)
                    except TimeoutError:
                        pass
                    delay = min(delay * 2, longest)

        return asyncio.create_task(supervised(), name=name)

    async def stop(self) -> None:
        self.stop_event.set()
        self.dispatcher.wake.set()
        running = [t for t in self.running.values() if not t.done()]
        if running:  # let a playbook step in hand finish rather than cut it in half
            await asyncio.wait(running, timeout=30)
        self._probe_stop.set()
        refresh = [self._refresh_task] if self._refresh_task is not None else []
        for t in [*self._probe_tasks, *self._tasks, *self._burst_tasks, *refresh]:
            t.cancel()
        await asyncio.gather(
            *self._probe_tasks, *self._tasks, *self._burst_tasks, *refresh, return_exceptions=True
        )
        if self.elector is not None:
            self._elector_stop.set()  # the elector releases the lease so a standby takes over at once
            await asyncio.gather(self._elector, return_exceptions=True)
        log.info("controller stopped")


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
