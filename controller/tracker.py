"""The detection tracker: what the controller believes about each probe, and why.

It exists so that every rule that turns probe results into verdicts lives in one place, apart from
the decisions and the I/O that follow: results folded in per vantage point (`ingest`), combined
under the quorum, a SUSPECT target re-probed in a confirmation burst before it can be DOWN, a
prober's own failure kept out of the vote (it is our trouble, not the target's), and the
reference targets that tell a cut-off controller from an outage (the cut-off windows whose
failures are no evidence). The pure rules are in `detect`; this class keeps their state.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from controller.config import Config
from controller.detect import (
    Health,
    ProbeState,
    Rules,
    ServiceHealth,
    combine,
    discount,
    flapping,
    judge,
    needed,
    observe,
    outcome,
    prior_rate,
)
from controller.health_memo import HealthMemo
from controller.metrics import Metrics
from controller.stores import Store
from probes.base import ProbeResult
from probes.scheduler import Scheduler

log = structlog.get_logger("continuity.controller")


class DetectionHost(Protocol):
    """What the tracker reads from the controller that wires it, each time it needs it: the config
    (a reload swaps it), the scheduler (its loop-stall watchdog; rebuilt by a reload), whether this
    replica leads (only the leader writes the timeline) and how a probe runs once."""

    @property
    def config(self) -> Config: ...
    def may_act(self) -> bool: ...
    def run_once(self, name: str, cfg: Any) -> Awaitable[ProbeResult]: ...


class DetectionTracker:
    def __init__(
        self,
        host: DetectionHost,
        store: Store,
        clock: Callable[[], float],
        metrics: Metrics,
        emit: Callable[..., None],
        kick: asyncio.Event,
    ) -> None:
        self.host = host
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self._emit = emit
        self._kick = kick
        """Set when a verdict changes: the controller reconciles at once."""
        config = host.config
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
        self._cut_since: float | None = None
        """While the reference targets fail together: since when the controller may have been cut off
        (the latest pass of a failing reference); None when not."""
        self._cut_windows: list[tuple[float, float]] = []
        """Recent closed [since, until) windows: a run started inside one is no evidence when it lands."""
        self._ref_passed: dict[str, float] = {}
        """When each reference target's latest passing local run started."""
        self._prober_logged: dict[str, float] = {}
        self.impact: dict[str, str] = {name: p.impact for name, p in config.probes.items()}
        self._health_memo = HealthMemo()
        self.open_incidents: dict[str, str] = {}
        """Service -> its open incident's id, as the last observation read it (and effects since
        opened or resolved): where a verdict change is recorded, without a store read on the loop."""

    @property
    def config(self) -> Config:
        return self.host.config  # read each time: a reload takes effect at once

    @property
    def scheduler(self) -> Scheduler | None:
        return getattr(self.host, "scheduler", None)

    def may_act(self) -> bool:
        return self.host.may_act()

    def run_once(self, name: str, cfg: Any) -> Awaitable[ProbeResult]:
        return self.host.run_once(name, cfg)

    def reload(self, old: Config, new: Config) -> None:
        """Probes whose settings did not change keep their history: a reload never resets a streak."""
        same = {name for name, cfg in new.probes.items() if name in old.probes and old.probes[name] == cfg}
        self.states = {name: self.states[name] if name in same else ProbeState() for name in new.probes}
        self.vstates = {name: self.vstates[name] if name in same else {} for name in new.probes}
        self.impact = {name: p.impact for name, p in new.probes.items()}
        self.metrics.probes.forget(new.probes)

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
        self.metrics.probes.record(name, vantage, result.ok, result.latency)
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
                # The open incident as the last tick saw it (kept by the observation and effects):
                # no store read here; the append is queued for the tick's batch.
                iid = self.open_incidents.get(svc)
                if iid is not None:
                    self.store.append(iid, result.started_at, "probe", verdict, result.to_dict())
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
            prior = prior_rate(new, self.config.rules(name))
            outcome_text = {
                Health.DOWN: "confirmed: DOWN",
                Health.SUSPECT: f"all failed, but it failed {prior:.0%} of its runs before this "
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
        base = rules.failure_threshold + rules.confirm_probes
        need = needed(self.vstates[name].get("local", ProbeState()), rules)
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
                need = needed(st, rules)  # more than threshold + probes while the history is thin or flaky
                cap = max(cap, need + rules.confirm_probes)
                streak = [t for t in tries if first is not None and t.started_at >= first]
                have = st.failures + len(streak) + len(flying)
                starts = [*flying.values(), *(t.started_at for t in streak)]
                if st.last is not None and first is not None:
                    starts.append(st.last.started_at)
                # Gather the count first, keeping one try back to close the span; with no failure yet
                # (a run in flight past its slot), that run will be one when it lands.
                quick = need - 1 if first is not None else need - 2
                launch_at: float | None = None
                if len(flying) >= base:
                    pass  # at most threshold + probes tries in flight: a hang's tries never pile up
                elif launched < cap and have < quick:
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
        # = {name: service_health(name, svc.probes, self.states, ...)}, recomputed only where a probe's
        # state changed or time alone changes it (controller/health_memo.py).
        return self._health_memo.health(
            self._service_probes(), self.states, self.impact, flaps, now=now, freshness=fresh, rules=rules
        )

    def up_since(self, now: float) -> dict[str, float]:
        """= {p: s.changed_at or now for p, s in states.items() if s.status is UP}, as of the last
        `health()` (the observation calls it right after)."""
        return self._health_memo.up_since(now)

    def _service_probes(self) -> dict[str, list[str]]:
        cfg = self.config
        cached = getattr(self, "_service_probes_cache", None)
        if cached is None or cached[0] is not cfg:
            cached = (cfg, {name: svc.probes for name, svc in cfg.services.items()})
            self._service_probes_cache = cached
        return cached[1]

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

    def track_cut(self, now: float) -> None:
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

    def isolation_count(self) -> str:
        det = self.config.detection
        refs = det.reference_probes
        down = sum(1 for r in refs if self.states.get(r, ProbeState()).status is Health.DOWN)
        return f"{down} of {len(refs)} (isolation quorum {det.isolation_quorum or len(refs)})"
