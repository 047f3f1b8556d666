"""`continuity demo`: break checkout in the primary region and watch Continuity save it.

Prints a timeline as things happen, then checks every link of the chain from the outside
(Route 53 read back, the Aurora writer read back, what PagerDuty received, a shopper's checkout
through the record) and reports time to detect and time to recover against the RTO.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from controller.demo.environment import SECONDARY_IP, STANDBY, ZONE, DemoEnvironment
from controller.detect import PRIOR_MIN_RUNS
from controller.durations import format_duration
from controller.loop import Controller
from controller.stores import SQLiteStore


@dataclass
class DemoResult:
    ok: bool
    time_to_detect: float | None = None
    time_to_recover: float | None = None
    rto: float = 0.0
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    incident_id: str | None = None


class Printer:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.outage_at: float | None = None

    def line(self, text: str) -> None:
        t = time.monotonic() - (self.outage_at if self.outage_at is not None else self.t0)
        sign = "+" if t >= 0 else "-"
        self.out.write(f"[{sign}{abs(t):5.1f}s] {text}\n")
        self.out.flush()


async def _shopper_checkout(env: DemoEnvironment) -> tuple[bool, str]:
    """A shopper resolves the record, then browses, fills a cart and pays at that address."""
    ip, _ = await asyncio.to_thread(env.record)
    base = f"http://{ip}:{env.region_port}"
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(f"{base}/products") as r:
            sku = (await r.json())["items"][0]["sku"]
        async with s.post(f"{base}/cart", json={"sku": sku}) as r:
            cart = (await r.json())["cart"]["id"]
        async with s.post(f"{base}/checkout", json={"cart_id": cart}) as r:
            body = await r.json()
            ok = r.status == 200 and body.get("status") == "confirmed"
    return (
        ok,
        f"{ZONE} -> {ip}; order {body.get('order_id', '?')} {body.get('status', body)} "
        f"in {body.get('region')}",
    )


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except TimeoutError:
        pass


async def run_demo(out: TextIO = sys.stdout, deadline: float = 50.0) -> DemoResult:
    p = Printer(out)
    async with DemoEnvironment() as env:
        cfg = env.config
        rto = cfg.services["checkout"].rto
        p.line(
            f"simulated marketplace up: eu-west-1 at {env.primary.host}, eu-central-1 at "
            f"{env.secondary.host} (port {env.region_port}); edge on 127.0.0.1:{env.edge_port}"
        )
        p.line(
            f"moto on 127.0.0.1:{env.moto_port}: {ZONE} A -> {env.record()[0]}, "
            f"Aurora writer {env.writer()}; PagerDuty receiver on 127.0.0.1:{env.pd_port}"
        )
        store = SQLiteStore(cfg.controller.data_dir)
        controller = Controller(cfg, store)
        marks: dict[str, float] = {}
        resolved, resolve_paged = asyncio.Event(), asyncio.Event()

        def listen(kind: str, facts: dict[str, Any]) -> None:
            if p.outage_at is None:
                return
            now = time.monotonic()
            if (
                kind == "probe_failed"
                and facts["probe"] == "checkout-journey"
                and "first_failure" not in marks
            ):
                marks["first_failure"] = now
                p.line(f"first failed probe: {facts['probe']}: {facts['reason']}")
            elif kind in ("burst", "isolated"):
                p.line(facts["message"])
            elif kind == "probe_verdict":
                p.line(f"probe {facts['probe']} is {facts['status'].upper()}")
            elif kind == "incident_opened":
                marks["opened"] = now
                p.line(f"incident {facts['incident']} opened, severity {facts['severity'].upper()}")
            elif kind in ("step", "playbook", "error"):
                p.line(facts["message"])
                if "switch-dns done" in facts["message"]:
                    marks["traffic_moved"] = now
            elif kind == "incident_resolved":
                marks["resolved"] = now
                resolved.set()
                p.line(f"incident {facts['incident']} resolved")
            elif kind == "notification" and facts["outcome"] != "delivered":
                p.line(f"notification {facts['key']}: {facts['outcome']}")

        def on_page(event: dict[str, Any]) -> None:
            if p.outage_at is None:
                return
            action = event.get("event_action")
            if action == "resolve":
                resolve_paged.set()
            extra = f", severity {event['payload']['severity']}" if action == "trigger" else ""
            summary = event.get("payload", {}).get("summary", "") if action == "change" else ""
            key = event.get("dedup_key", "-")
            p.line(f"PagerDuty received {action}{extra} (dedup_key {key}) {summary}".rstrip())

        controller.listeners.append(listen)
        env.pagerduty.on_event = on_page
        await controller.start()
        result = DemoResult(ok=False, rto=rto)
        try:
            warm = time.monotonic()
            healthy = controller.detection.probe_healthy
            while not all(healthy(n) for n in ("checkout-journey", "checkout-secondary")):
                if time.monotonic() - warm > 15:
                    p.line("the marketplace never became healthy; giving up")
                    return result
                await asyncio.sleep(0.1)
            # A controller that has run a while knows each target's own failure rate; a fresh one
            # does not, and asks a longer failing streak of it (detect.prior_rate). The demo shows
            # the running case: it breaks checkout once the journey has PRIOR_MIN_RUNS runs behind it.
            states = controller.detection.states
            while len(states["checkout-journey"].runs) < PRIOR_MIN_RUNS:
                if time.monotonic() - warm > 30:
                    p.line("the checkout journey never ran enough times; giving up")
                    return result
                await asyncio.sleep(0.1)
            p.line("all probes healthy; shoppers are checking out in eu-west-1")
            p.outage_at = time.monotonic()
            env.primary.broken = {"checkout"}
            p.line("OUTAGE INJECTED: checkout returns 503 in eu-west-1")
            await _wait(resolved, deadline)
            await _wait(resolve_paged, 5.0)  # the outbox sends a resolution at once
        finally:
            await controller.stop()

        incident = next(iter(store.list_incidents()), None)
        result.incident_id = incident.id if incident else None
        ip, _ = env.record()
        writer = env.writer()
        triggers = [e for e in env.pagerduty.events if e["event_action"] == "trigger"]
        resolves = [e for e in env.pagerduty.events if e["event_action"] == "resolve"]
        dedup = incident.dedup_key if incident else None
        shopper_ok, shopper_text = await _shopper_checkout(env)
        result.checks = [
            (
                "incident opened as critical",
                bool(
                    incident
                    and incident.data.get("tier") == "critical"
                    and triggers
                    and triggers[0]["payload"]["severity"] == "critical"
                ),
                f"{incident.id} ({incident.title})" if incident else "no incident",
            ),
            ("Route 53 record points at the secondary", ip == SECONDARY_IP, f"{ZONE} A -> {ip}"),
            ("Aurora writer moved", writer == STANDBY, f"writer is {writer}"),
            (
                "PagerDuty trigger received",
                bool(triggers) and triggers[0].get("dedup_key") == dedup,
                f"{len(triggers)} trigger(s), dedup_key {triggers[0].get('dedup_key') if triggers else '-'}",
            ),
            ("shopper checkout through the record", shopper_ok, shopper_text),
            (
                "incident resolved",
                bool(incident and incident.status == "resolved"),
                incident.status if incident else "no incident",
            ),
            (
                "PagerDuty resolve received",
                bool(resolves) and resolves[0].get("dedup_key") == dedup,
                f"{len(resolves)} resolve(s)",
            ),
            (
                "nothing rejected by PagerDuty",
                not env.pagerduty.rejected,
                f"{len(env.pagerduty.rejected)} rejected",
            ),
        ]
        if "opened" in marks and p.outage_at is not None:
            result.time_to_detect = marks["opened"] - p.outage_at
        if "resolved" in marks and p.outage_at is not None:
            result.time_to_recover = marks["resolved"] - p.outage_at
        result.ok = (
            all(ok for _, ok, _ in result.checks)
            and result.time_to_recover is not None
            and result.time_to_recover <= rto
        )

        out.write("\nChecks (read back from the systems themselves):\n")
        for name, ok, detail in result.checks:
            out.write(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}\n")
        if incident is not None:
            out.write(f"\nIncident timeline ({incident.id}), as stored:\n")
            for ev in store.timeline(incident.id):
                rel = ev.ts - incident.started_at
                out.write(f"  {rel:+6.1f}s  {ev.kind:<12} {ev.message}\n")
        journey = cfg.probes["checkout-journey"]
        n = journey.failure_threshold or cfg.detection.failure_threshold
        burst = cfg.detection.confirm
        low, high = (n - 1) * journey.interval, n * journey.interval
        ttd = format_duration(result.time_to_detect) if result.time_to_detect is not None else "never"
        ttr = format_duration(result.time_to_recover) if result.time_to_recover is not None else "never"
        out.write(
            f"\nTime to detect:  {ttd} (expected {format_duration(low)} to {format_duration(high)} for "
            f"failure_threshold {n} x interval {format_duration(journey.interval)}, plus the confirmation "
            f"burst of {burst.probes} runs {format_duration(burst.spacing)} apart, plus probe time)\n"
        )
        if "traffic_moved" in marks and p.outage_at is not None:
            out.write(
                f"Traffic moved:   {format_duration(marks['traffic_moved'] - p.outage_at)} after the outage\n"
            )
        out.write(f"Time to recover: {ttr} against an RTO of {format_duration(rto)}\n")
        out.write(
            f"\nDemo {'PASSED' if result.ok else 'FAILED'}: "
            f"{'the whole chain worked' if result.ok else 'see the checks above'}.\n"
        )
        store.close()
        return result
