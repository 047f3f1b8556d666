"""The promises, checked after every simulated run; each violation names the promise it breaks.

Bounds are derived from the scenario's own config (thresholds, intervals, timeouts, the burst), so
a change of defaults moves them with it. Truth comes from the world (tests/sim/world.py); what the
controller did comes from the world's call logs and the store.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tests.sim.world import HARD, PROBER_FAULTS, World

STALL_BOUND = 5.0
FLAKY_BOUND = 0.35
"""The documented bound (README, "False alarms, measured"): requests failing at random at up to this
rate never fail a region over (a three-step journey then fails up to 73% of its runs; it opens a
moderate incident stating the rate). Above it (the simulation draws 60%: 94% of journeys fail) the
region is as good as down, and a failover is allowed, not required."""
"""The control loop never stalls longer than this (seconds), outside stalls the world injected."""
SETTLE_GRACE = 450.0


@dataclass(frozen=True)
class Violation:
    invariant: str
    at: float
    message: str

    def __str__(self) -> str:
        return f"[{self.invariant}] t={self.at:.1f}s: {self.message}"


def detection_bound(cfg: Any, probe: str) -> float:
    """Failure streak + the last run's timeout + the confirmation burst, run one after another."""
    p = cfg.probes[probe]
    d = cfg.detection
    thr = p.failure_threshold or d.failure_threshold
    return (
        thr * p.interval
        + p.timeout
        + d.confirm.probes * (d.confirm.spacing + p.timeout)
        + cfg.controller.tick
    )


def sight_bound(cfg: Any, probe: str) -> float:
    """How long a fault can exist before the controller can have seen it at all: one probe period
    (the last run may have started just before the fault), that run's timeout, and a tick. A
    resolve inside this bound of a fault's start is made on results that all predate the fault:
    the controller cannot know about it, so it is not a resolve "while failing"."""
    p = cfg.probes[probe]
    return p.interval + p.timeout + cfg.controller.tick


def _overlaps(a0: float, a1: float, b0: float, b1: float) -> bool:
    return a0 < b1 and b0 < a1


def check(out: Any) -> tuple[list[Violation], list[str]]:
    s = out.scenario
    w: World = out.world
    cfg = out.cfg
    t0 = w.t0
    v: list[Violation] = []
    skipped: list[str] = []
    wanted = set(s.checks) if s.checks else None
    if wanted == {"figures-only"}:
        return v, skipped  # a measurement run (bench/sim_figures.py): counted by the caller

    def add(name: str, at: float, msg: str) -> None:
        if wanted is None or name in wanted:
            v.append(Violation(name, at, msg))

    end = s.duration
    api_bound = detection_bound(cfg, "checkout-api")
    journey_bound = detection_bound(cfg, "checkout-journey")
    catalog_bound = detection_bound(cfg, "catalog-api")
    incidents = sorted(out.incidents, key=lambda i: i.opened_at)
    by_service: dict[str, list[Any]] = {}
    for inc in incidents:
        by_service.setdefault(inc.service, []).append(inc)

    def rel(x: float | None) -> float | None:
        return None if x is None else x - t0

    def hard_since(region: str, t: float, horizon: float) -> bool:
        """A hard fault on `region` overlapping [t - horizon, t]; for the failover promise, random
        failure above FLAKY_BOUND counts too (the README's documented bound: past it, most runs of a
        journey fail, which no controller can tell from an outage at its onset)."""
        return any(
            (f.kind in HARD or (f.kind == "flaky" and f.rate > FLAKY_BOUND))
            and f.region == region
            and f.start <= t
            and f.end >= t - horizon
            for f in w.faults
        )

    def downtime(a: float, b: float, bound: float) -> float:
        """Time in [a, b) when no controller could act: crashes (a restarted process starts its
        failure streaks from nothing, so a crash costs its downtime plus a whole detection bound),
        leader gaps, store errors, injected stalls."""
        lost = 0.0
        for e in w.events:
            if e.kind == "crash":
                back = e.at + e.value  # the restarted process detects from scratch
                if e.at < b and back + bound > a:
                    lost += max(0.0, back - max(a, e.at)) + bound
            elif e.kind == "leader_change":
                lost += max(0.0, min(b, e.at + e.value) - max(a, e.at))
            elif e.kind in ("store_error", "loop_stall"):
                until = e.until or e.at + e.value
                lost += max(0.0, min(b, until) - max(a, e.at))
        return lost

    blind = [f for f in w.faults if f.kind in (*PROBER_FAULTS, "isolation")]

    # ---------------------------------------------------------------- failover only when really down
    for call in w.calls:
        if call.kind not in ("route53", "rds") or not call.applied:
            continue
        region = call.detail.get("region")
        if region == "us":  # a failover
            horizon = journey_bound + 600.0
            if not hard_since("eu", call.t, horizon):
                causes = [f.describe() for f in w.faults if f.start <= call.t and f.end >= call.t - horizon]
                add(
                    "failover-only-when-primary-down",
                    call.t,
                    f"{call.kind} moved checkout to us ({call.detail.get('op')}) by {call.actor}, "
                    "but eu was not "
                    f"down in the {horizon:.0f}s before; faults then: {causes or 'none'}",
                )
        if region in ("us", "eu"):
            for f in w.faults:
                # only faults the guard's direct probe can see (a broken journey step is invisible to it)
                visible = f.kind in ("refused", "hang", "http5xx")
                if visible and f.region == region and f.start + api_bound + 10 <= call.t < f.end:
                    add(
                        "never-into-down-region",
                        call.t,
                        f"{call.kind} moved checkout into {region} ({call.detail.get('op')}) while {region} "
                        f"had been down for {call.t - f.start:.0f}s ({f.describe()})",
                    )

    # ---------------------------------------------------------------- outages: detected, once, one page
    def outages(service: str) -> list[tuple[float, float]]:
        if service == "checkout":
            raw = w.failing_intervals(end, w.service_failing)
        else:  # catalog has no journey: a broken checkout step does not touch it
            raw = w.failing_intervals(end, lambda t: bool(w.active(("refused", "hang", "http5xx"), t, "eu")))
        merged: list[tuple[float, float]] = []
        for a, b in raw:
            # A gap shorter than two successful runs cannot resolve an incident: one outage.
            if merged and a - merged[-1][1] < 20.0:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged

    def bound_for(service: str, a: float, b: float) -> float:
        """How long after `a` the incident may open: the earliest fault in [a, b) on the region
        serving the service, plus the detection bound of the probe that sees that kind of fault."""
        best: float | None = None
        for f in w.faults:
            if f.kind not in HARD or not _overlaps(f.start, f.end, a, b):
                continue
            start = max(f.start, a)
            region = w.serving(start) if service == "checkout" else "eu"
            if f.region != region or (service == "catalog" and f.kind == "step"):
                continue
            if service == "catalog":
                bound = catalog_bound
            else:
                bound = journey_bound if f.kind == "step" else api_bound
            best = start + bound if best is None else min(best, start + bound)
        return (best - a) if best is not None else journey_bound

    for service in ("checkout", "catalog"):
        mine = by_service.get(service, [])
        for a, b in outages(service):
            base = bound_for(service, a, b)
            bound = base + downtime(a, b, base)
            if b - a <= bound + 30.0:
                continue
            if any(_overlaps(f.start, f.end, a - 60, b) for f in blind):
                continue  # the controller could not see it: holding is right
            opened = [
                i
                for i in mine
                if (rel(i.opened_at) or 0) < b
                and (i.resolved_at is None or (rel(i.resolved_at) or 0) > a + bound)
            ]
            if not opened:
                add(
                    "outage-opens-an-incident",
                    a,
                    f"{service} was really down [{a:.0f}s, {b:.0f}s) ({b - a:.0f}s > bound {bound:.0f}s) "
                    "and no incident was open",
                )
            elif len(opened) > 1:
                ids = ", ".join(f"{i.id} opened {rel(i.opened_at):.0f}s" for i in opened)
                add(
                    "one-incident-per-outage",
                    a,
                    f"{service} outage [{a:.0f}s, {b:.0f}s) opened {len(opened)} incidents: {ids}",
                )
            else:
                late = (rel(opened[0].opened_at) or 0) - a
                if late > bound and (rel(opened[0].opened_at) or 0) > a:
                    add(
                        "outage-opens-an-incident",
                        a,
                        f"{service} outage from {a:.0f}s: incident opened only after {late:.0f}s "
                        f"(bound {bound:.0f}s)",
                    )

    # ---------------------------------------------------------------- never resolved while failing
    for inc in incidents:
        if inc.resolved_at is None or inc.service not in ("checkout", "catalog"):
            continue
        t = rel(inc.resolved_at) or 0.0
        if inc.service == "checkout":
            region = w.serving(t)
        else:
            region = "eu"
        for f in w.faults:
            if f.kind == "step" and inc.service != "checkout":
                continue
            # the fault can be seen first by the fastest probe of the service that notices its kind
            seeing = [n for n in cfg.services[inc.service].probes if n in cfg.probes]
            if f.kind == "step":
                seeing = [n for n in seeing if cfg.probes[n].kind == "transaction"]
            if not seeing:
                continue
            sight = min(sight_bound(cfg, n) for n in seeing)
            if f.kind in HARD and f.region == region and f.start + sight <= t < f.end:
                bad_probe = "checkout-journey" if f.kind == "step" else "the service's probes"
                add(
                    "no-resolve-while-failing",
                    t,
                    f"{inc.id} ({inc.service}) resolved while {region} was down since {f.start:.0f}s "
                    f"({f.describe()}; seen by {bad_probe})",
                )

    # ---------------------------------------------------------------- pages: one trigger, one resolve
    deliveries = [d for d in w.deliveries if d.detail.get("channel") == "pagerduty"]
    per_key: dict[str, list[Any]] = {}
    for d in deliveries:
        body = d.detail["body"]
        per_key.setdefault(body.get("dedup_key", ""), []).append(d)
    for inc in incidents:
        got = per_key.get(inc.dedup_key, [])
        triggers = [d for d in got if d.detail["body"]["event_action"] == "trigger"]
        resolves = [d for d in got if d.detail["body"]["event_action"] == "resolve"]
        opened = rel(inc.opened_at) or 0.0
        if not triggers and opened < end - SETTLE_GRACE:
            add("one-page-per-incident", opened, f"{inc.id} never paged (no PagerDuty trigger delivered)")
        if len(resolves) > 1:
            add("one-page-per-incident", resolves[1].t, f"{inc.id}: {len(resolves)} resolves delivered")
        if resolves:
            after = [d for d in triggers if d.t > resolves[0].t]
            if after:
                add(
                    "one-page-per-incident",
                    after[0].t,
                    f"{inc.id}: a trigger delivered after its resolve (re-pages a closed alert)",
                )
        if inc.resolved_at is not None and not resolves and (rel(inc.resolved_at) or 0) < end - SETTLE_GRACE:
            add(
                "one-page-per-incident",
                rel(inc.resolved_at) or 0,
                f"{inc.id} resolved but the resolve never reached PagerDuty",
            )

    # ---------------------------------------------------------------- each change at most once per step
    counts = Counter(c.key for c in w.calls if c.applied)
    for key, n in counts.items():
        if n > 1:
            first = next(c for c in w.calls if c.key == key)
            add(
                "change-applied-once",
                first.t,
                f"{first.kind} change {key!r} applied {n} times "
                f"(actors {sorted({c.actor for c in w.calls if c.key == key})})",
            )
    for c in w.calls:
        if c.kind == "http" and not c.detail.get("idempotency_key"):
            add("idempotency-key", c.t, f"non-idempotent {c.key[:80]!r} sent without an Idempotency-Key")
            break
    steps = getattr(out, "steps", {})
    for run in out.runs:
        for st in steps.get(run.id, []):
            if st.state != "failed" or st.name != "purge-cdn":
                continue
            sent = [c for c in w.calls if c.kind == "http" and run.incident_id and run.incident_id in c.key]
            if sent:
                add(
                    "unknown-outcome-not-failed",
                    rel(st.ended_at) or 0.0,
                    f"run {run.id} step {st.name} journaled failed ({st.detail}) but the world received it "
                    f"{len(sent)} time(s): its outcome was unknown, not failed",
                )

    # ---------------------------------------------------------------- one run per service at a time
    active_states = {"awaiting_approval", "rejected", "expired"}
    runs = [r for r in out.runs if r.state not in active_states and not r.dry_run]
    for i, r1 in enumerate(runs):
        for r2 in runs[i + 1 :]:
            if r1.service != r2.service:
                continue
            e1 = r1.ended_at if r1.ended_at is not None else t0 + end
            e2 = r2.ended_at if r2.ended_at is not None else t0 + end
            if _overlaps(r1.started_at, e1, r2.started_at, e2) or r1.started_at == r2.started_at:
                add(
                    "one-run-per-service",
                    rel(max(r1.started_at, r2.started_at)) or 0.0,
                    f"{r1.service}: run {r1.id} ({r1.playbook}, {r1.state}) and run {r2.id} ({r2.playbook}, "
                    f"{r2.state}) overlap",
                )
    for r in runs:
        if r.state == "running" and r.ended_at is None:
            add("one-run-per-service", rel(r.started_at) or 0.0, f"run {r.id} ({r.playbook}) never finished")

    # ---------------------------------------------------------------- notifications exactly once
    # Exactly once per message, not per wording: Statuspage has no idempotency key, so the world only
    # sees the body, and two distinct messages may say the same thing (critical -> moderate twice,
    # with moderate -> critical between: simulation seeds 149 and 190). A body may arrive as often
    # as the outbox holds distinct messages with it; one message sent twice still breaks this.
    same_words = Counter(
        (m.payload.get("op"), json.dumps(m.payload.get("body"), sort_keys=True))
        for m in out.outbox
        if m.channel == "statuspage" and isinstance(m.payload, dict)
    )

    def allowed(channel: str | None, key: str) -> int:
        if channel != "statuspage":
            return 1
        op, _, rest = key.partition(" ")
        body = rest if op == "create" else rest.partition(" ")[2]
        return max(1, same_words[(op, body)])

    dup = Counter((d.detail.get("channel"), d.key) for d in w.deliveries)
    for (channel, key), n in dup.items():
        if n > allowed(channel, key):
            first = next(d for d in w.deliveries if d.key == key)
            add(
                "notification-exactly-once",
                first.t,
                f"{channel}: the same message delivered {n} times: {key[:120]}",
            )
    for msg in out.outbox:
        if msg.dead:
            add(
                "notification-exactly-once",
                rel(msg.created_at) or 0.0,
                f"{msg.channel} {msg.key} refused: {msg.last_error}",
            )
        elif msg.delivered_at is None and (rel(msg.created_at) or 0) < end - SETTLE_GRACE:
            add(
                "notification-exactly-once",
                rel(msg.created_at) or 0.0,
                f"{msg.channel} {msg.key} queued at {rel(msg.created_at):.0f}s never delivered "
                f"({msg.attempts} attempts, last error {msg.last_error})",
            )

    # ---------------------------------------------------------------- one actor at a time
    if s.replicas > 1:

        def leader_at(t: float) -> str | None:
            cur: str | None = None
            for at, who in w.leadership:
                if at <= t:
                    cur = who
            return cur

        for c in [*w.calls, *w.deliveries]:
            who = leader_at(c.t)
            # With the real elector the Lease is the truth: no holder means nobody may act.
            if (who is not None or s.lease) and who != c.actor:
                add(
                    "one-actor-at-a-time",
                    c.t,
                    f"{c.actor} made a {c.kind} call while {who} was the leader: {c.key[:100]}",
                )

    # ---------------------------------------------------------------- intermittent failure
    from tests.sim.scenarios import HAS_INTERMITTENT

    forced = wanted is not None and "intermittent-is-degraded" in wanted
    if not HAS_INTERMITTENT and not forced:
        skipped.append("intermittent-is-degraded (config has no detection.intermittent yet)")
    else:
        spec = getattr(cfg.detection, "intermittent", None)
        rate = float(getattr(spec, "rate", 0.3))
        window = float(getattr(spec, "window", 180.0))
        for f in w.faults:
            if f.kind != "flaky" or f.region != "eu":
                continue
            journey_rate = 1 - (1 - f.rate) ** 3
            if journey_rate < rate + 0.1 or f.end - f.start < window + journey_bound + 30:
                continue
            if any(_overlaps(g.start, g.end, f.start, f.end) for g in w.faults if g is not f):
                continue
            during = [
                i for i in by_service.get("checkout", []) if f.start <= (rel(i.opened_at) or 0) < f.end + 60
            ]
            stated = [
                i
                for i in during
                if i.severity == "moderate" and any("%" in m for m in out.timelines.get(i.id, [i.title]))
            ]
            if not stated:
                add(
                    "intermittent-is-degraded",
                    f.start,
                    f"{f.describe()} (journeys fail ~{journey_rate:.0%}) opened no moderate incident "
                    "stating the rate "
                    f"(incidents: {[(i.id, i.severity) for i in during]})",
                )

    # ---------------------------------------------------------------- prober faults are not the target's
    crashes = [e for e in w.events if e.kind == "crash"]
    for f in w.faults:
        if f.kind not in PROBER_FAULTS:
            continue
        for inc in incidents:
            t = rel(inc.opened_at) or 0.0
            if not (f.start <= t < f.end + 60) or inc.service not in ("checkout", "catalog"):
                continue
            region = w.serving(t) if inc.service == "checkout" else "eu"
            real = any(
                g.kind in (*HARD, "flaky", "slow")
                and g.region == region
                and _overlaps(g.start, g.end, t - journey_bound - 60, t + 1)
                for g in w.faults
            )
            if not real:
                add(
                    "prober-fault-not-target",
                    t,
                    f"{inc.id} ({inc.service}, {inc.severity}) opened during a prober-side fault "
                    f"({f.describe()}) "
                    "while every target was healthy",
                )

        # ... and the controller raised its own alert: the prober-error event and its metric.
        if f.end - f.start < 40.0 or any(
            _overlaps(e.at, e.at + e.value + 5, f.start, f.end) for e in crashes
        ):
            continue  # too short for a probe to have run in it, or no process alive through it
        raised = [a for a in w.own_alerts if a[2] == f.kind and f.start <= a[0] <= f.end + 15]
        counted = getattr(out, "prober_metric", {}).get(f.kind, 0.0)
        if not raised or counted <= 0:
            add(
                "prober-fault-not-target",
                f.start,
                f"{f.describe()}: the controller raised no alert of its own "
                f"(prober_error events of kind {f.kind} during it: {len(raised)}; "
                f"continuity_prober_errors_total{{kind={f.kind!r}}} = {counted:g})",
            )

    _pushed_inputs(out, add, incidents, downtime)
    _approvals(out, add)

    # ---------------------------------------------------------------- the loop never stalls
    injected = list(getattr(out, "stalls", []))
    for t, late in w.samples:
        if late > STALL_BOUND and not any(a - 1 <= t <= b + 2 for a, b in injected):
            add("loop-never-stalls", t, f"a 2s timer fired {late:.1f}s late (bound {STALL_BOUND:g}s)")
            break
    return v, skipped


def _pushed_inputs(out: Any, add: Any, incidents: list[Any], downtime: Any) -> None:
    """Alertmanager, heartbeats and agents' results, pushed through the real API app.

    - no-action-from-unauthenticated-push: an attacker's push without the token (or with a wrong
      one) is refused, and no incident opens nor run starts for `payments` unless its provider was
      really failing (Alertmanager, with the token, said so);
    - pushed-outage-detected: a payments outage (alert firing) or a worker outage (heartbeats
      missed), longer than its bound, opens an incident, forged heartbeats notwithstanding;
    - no-vote-from-stale-or-future-results: a result stamped further in the future than the
      allowed clock skew, or older than its probe's freshness, is never admitted.
    """
    s = out.scenario
    if not s.pushes:
        return
    w: World = out.world
    cfg = out.cfg
    t0 = w.t0
    for t, endpoint, who, status in w.pushes:
        if who == "attacker" and status < 400:
            add(
                "no-action-from-unauthenticated-push",
                t,
                f"a push to {endpoint} without a valid token was accepted (HTTP {status})",
            )
    forged = [t for t, _, who, _ in w.pushes if who == "attacker"]

    def windows(kind: str, lag: float) -> list[tuple[float, float]]:
        return [(f.start, f.end + lag) for f in w.faults if f.kind == kind]

    truth = {"payments": windows("payments_down", 120.0), "worker": windows("worker_down", 120.0)}
    for inc in incidents:
        if inc.service not in truth:
            continue
        t = inc.opened_at - t0
        if any(a <= t <= b for a, b in truth[inc.service]):
            continue
        near = [x for x in forged if t - 120 <= x <= t]
        add(
            "no-action-from-unauthenticated-push",
            t,
            f"{inc.id} ({inc.service}) opened while {inc.service} was fine in the world "
            f"({len(near)} forged push(es) in the 120 s before)",
        )
    for run in out.runs:
        if run.service != "payments":
            continue
        t = run.started_at - t0
        if not any(a <= t <= b for a, b in truth["payments"]):
            add(
                "no-action-from-unauthenticated-push",
                t,
                f"run {run.id} ({run.playbook}, {run.state}) started while payments was fine in the world",
            )
    hb = cfg.probes["worker-heartbeat"]
    bounds = {
        "payments": 30.0 + detection_bound(cfg, "payments-alerts"),
        "worker": hb.period + hb.grace + 30.0 + detection_bound(cfg, "worker-heartbeat"),
    }
    for service, kind in (("payments", "payments_down"), ("worker", "worker_down")):
        for f in w.faults:
            if f.kind != kind:
                continue
            bound = bounds[service] + downtime(f.start, f.end, bounds[service])
            if f.end - f.start <= bound + 30.0:
                continue
            mine = [
                i
                for i in incidents
                if i.service == service
                and f.start <= i.opened_at - t0 <= f.start + bound
                and (i.resolved_at is None or i.resolved_at - t0 > f.start + bound)
            ]
            if not mine:
                add(
                    "pushed-outage-detected",
                    f.start,
                    f"{service} was really down ({f.describe()}; bound {bound:.0f}s) and no incident "
                    f"was open within the bound (forged pushes during it: "
                    f"{sum(1 for x in forged if f.start <= x <= f.end)})",
                )
    for t, actor, vantage, ahead, may_vote, accepted in w.result_posts:
        if not may_vote and accepted:
            add(
                "no-vote-from-stale-or-future-results",
                t,
                f"{actor} admitted a result from {vantage} stamped {ahead:+.0f}s from its clock "
                "(beyond the allowed skew or older than its freshness)",
            )


def _approvals(out: Any, add: Any) -> None:
    """A failover that needs a human: nothing applies before the approval; a rejected or expired
    approval never runs; an unanswered one expires."""
    s = out.scenario
    if not s.approval:
        return
    from tests.sim.scenarios import APPROVAL_TIMEOUT

    w: World = out.world
    t0 = w.t0
    approved = {run_id: t for t, run_id, verb in w.approvals if verb == "approve"}
    steps = getattr(out, "steps", {})
    for run in out.runs:
        if run.playbook != "region-failover" or run.dry_run:
            continue
        started = [st for st in steps.get(run.id, []) if st.started_at is not None]
        if run.state in ("rejected", "expired") and started:
            add(
                "rejected-approval-never-runs",
                started[0].started_at - t0,
                f"run {run.id} was {run.state}, yet step {started[0].name} ran ({started[0].state})",
            )
        for st in started:
            at = approved.get(run.id)
            if at is None or st.started_at - t0 < at:
                add(
                    "no-step-before-approval",
                    st.started_at - t0,
                    f"run {run.id} step {st.name} started "
                    + (f"before its approval at {at:.0f}s" if at is not None else "with no approval given"),
                )
                break
        if (
            s.approval == "never"
            and run.state == "awaiting_approval"
            and run.started_at - t0 < s.duration - APPROVAL_TIMEOUT - 60.0
        ):
            add(
                "approval-expires",
                run.started_at - t0,
                f"run {run.id} still awaits an approval asked {s.duration - (run.started_at - t0):.0f}s ago "
                f"(expires after {APPROVAL_TIMEOUT:g}s)",
            )
    if s.approval in ("reject", "never"):
        for c in w.calls:
            moving = c.kind in ("route53", "rds") and c.detail.get("region") == "us"
            if moving or (c.kind == "http" and "purge" in c.key):
                add(
                    "rejected-approval-never-runs",
                    c.t,
                    f"{c.kind} {c.key[:80]!r} applied, but every failover's approval was "
                    f"{'rejected' if s.approval == 'reject' else 'never given'}",
                )
                break
