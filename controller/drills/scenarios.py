"""The built-in disasters, as data plus small functions: how to bend the demo config, how to inject
the fault, when the drill has seen enough, and the checks particular to the scenario.

The generic objectives (outcome, RTO, RPO, nothing done wrongly) are in `runner.py`, the `Scenario`
and `Drill` types in `drill.py`; a scenario only adds what is special about it (one isolation alert,
the second outage paged, the run resumed once).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from controller.drills.drill import Drill, Objective, Scenario
from controller.drills.names import SCENARIOS

ALL_FEATURES = {"health", "products", "cart", "checkout"}


# ---------------------------------------------------------------- done predicates


def _failover_done(drill: Drill) -> bool:
    """The first incident is resolved and no playbook run is still going."""
    inc = drill.first_incident()
    return bool(inc and inc.status == "resolved" and not drill.runs_in_progress())


def _page_only_done(drill: Drill) -> bool:
    return bool(drill.triggers()) and not drill.runs_in_progress() and drill.since_injection() >= 6.0


def _quiet_done(drill: Drill) -> bool:
    return drill.since_injection() >= 10.0


# ---------------------------------------------------------------- injections


async def _lose_primary(drill: Drill) -> None:
    assert drill.env is not None
    drill.env.primary.broken = set(ALL_FEATURES)
    drill.note("eu-west-1 lost: every request to 127.0.0.2 answers 503")


async def _lose_database(drill: Drill) -> None:
    assert drill.env is not None
    drill.env.primary.broken = {"cart", "checkout"}
    drill.note("primary database lost: browsing works in eu-west-1, every write (cart, checkout) fails")


async def _payment_down(drill: Drill) -> None:
    assert drill.env is not None
    for region in (drill.env.primary, drill.env.secondary):
        region.broken = {"checkout"}
    drill.note("payment provider down: the checkout step fails in both regions; browsing and carts work")


def _slo(raw: dict[str, Any], drill: Drill) -> None:
    raw["probes"]["checkout-journey"]["latency_slo"] = "800ms"


async def _creep(drill: Drill) -> None:
    assert drill.env is not None
    drill.note("eu-west-1 slows down: +100ms per request every second, up to 600ms (journey SLO 800ms)")
    for step in range(1, 7):
        drill.env.primary.delay = 0.1 * step
        await asyncio.sleep(1.0)
    await asyncio.Event().wait()


async def _flap(drill: Drill) -> None:
    assert drill.env is not None
    drill.note("the network to eu-west-1 drops for 2s out of every 4s")
    while True:
        drill.env.primary.broken = set(ALL_FEATURES)
        await asyncio.sleep(2.0)
        drill.env.primary.broken = set()
        await asyncio.sleep(2.0)


class _Reference:
    """A target that should always be up (a big public site stands in); `stop` makes it unreachable."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        from controller.demo.marketplace import serve

        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/", ok)
        self.runner, self.port = await serve(app, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def _start_references(drill: Drill) -> None:
    refs = [_Reference(), _Reference()]
    for ref in refs:
        await ref.start()
        drill.cleanups.append(ref.stop)
    drill.extra["references"] = refs


def _with_references(raw: dict[str, Any], drill: Drill) -> None:
    for n, ref in enumerate(drill.extra["references"]):
        raw["probes"][f"reference-{n + 1}"] = {
            "kind": "http",
            "url": f"http://127.0.0.1:{ref.port}/",
            "interval": "1s",
            "timeout": "1s",
        }
    raw.setdefault("detection", {})["reference_probes"] = ["reference-1", "reference-2"]


async def _cut_off(drill: Drill) -> None:
    assert drill.env is not None
    for ref in drill.extra["references"]:
        await ref.stop()
    for region in (drill.env.primary, drill.env.secondary):
        region.broken = set(ALL_FEATURES)
    drill.note("controller cut off: both reference targets unreachable, and the shop fails from here")


def _no_page(drill: Drill) -> list[Objective]:
    n = len(drill.triggers())
    return [Objective("no page for a blip", "0 pages", f"{n} page(s)", n == 0)]


def _isolation_alerts(drill: Drill) -> list[dict[str, Any]]:
    return [e for e in drill.triggers() if str(e.get("dedup_key", "")).startswith("continuity/isolated/")]


def _cut_off_done(drill: Drill) -> bool:
    return bool(_isolation_alerts(drill)) and drill.since_injection() >= 8.0


def _cut_off_checks(drill: Drill) -> list[Objective]:
    alerts = _isolation_alerts(drill)
    incidents = drill.incidents()
    return [
        Objective("one isolation alert", "exactly 1", f"{len(alerts)}", len(alerts) == 1),
        Objective("no incident opened", "0", f"{len(incidents)}", not incidents),
    ]


async def _second_outage(drill: Drill) -> None:
    assert drill.env is not None
    drill.env.primary.broken = {"checkout"}
    drill.note("first outage: checkout fails in eu-west-1")
    while not _failover_done(drill):  # noqa: ASYNC110 - the store has no change notification
        await asyncio.sleep(0.1)
    drill.env.secondary.broken = {"checkout"}
    drill.mark("second_outage")
    drill.note("second outage, inside the cooldown: checkout now fails in eu-central-1 too")
    await asyncio.Event().wait()


def _second_done(drill: Drill) -> bool:
    at = drill.marks.get("second_outage")
    if at is None:
        return False
    second = [i for i in drill.incidents() if i.opened_at >= at]
    return bool(second) and len(drill.triggers()) >= 2 and drill.now() - at >= 8.0


def _second_checks(drill: Drill) -> list[Objective]:
    at = drill.marks.get("second_outage")
    second = [i for i in drill.incidents() if at is not None and i.opened_at >= at]
    held = any(
        "cooldown" in e.message for i in second for e in drill.store.timeline(i.id) if e.kind == "decision"
    )
    return [
        Objective("second outage opened and paged", "an incident", f"{len(second)}", bool(second)),
        Objective("second failover held by the cooldown", "held", "held" if held else "not held", held),
    ]


def _drain_step(raw: dict[str, Any], drill: Drill) -> None:
    """A slow step to be killed in: the controller holds while connections drain."""
    steps = raw["playbooks"]["region-failover"]["steps"]
    at = next(i for i, s in enumerate(steps) if s["name"] == "switch-dns")
    steps.insert(at, {"name": "drain-connections", "action": "wait", "with": {"duration": "3s"}})


def _killed_checks(drill: Drill) -> list[Objective]:
    runs = drill.store.runs()
    ok = len(runs) == 1 and runs[0].state == "succeeded"
    states = [s.state for s in drill.store.steps(runs[0].id)] if runs else []
    killed = drill.extra.get("killed", False)
    resumed = any("resuming run" in e.message for i in drill.incidents() for e in drill.store.timeline(i.id))
    return [
        Objective("killed during a step", "kill -9", "killed" if killed else "not killed", killed),
        Objective(
            "exactly one completed run",
            "1 run, succeeded",
            f"{len(runs)} run(s): {', '.join(r.state for r in runs)}; steps {', '.join(states)}",
            ok and all(s == "done" for s in states),
        ),
        Objective("run resumed by the new process", "resumed", "resumed" if resumed else "no", resumed),
    ]


def _one_page(drill: Drill) -> list[Objective]:
    """A region outage is one outage: one incident pages once, whatever number of services it took."""
    keys = sorted({str(e.get("dedup_key")) for e in drill.triggers()})
    return [
        Objective(
            "one page for the outage", "1 paged incident", f"{len(keys)} paged incident(s)", len(keys) == 1
        )
    ]


BUILTIN: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "region-lost",
            "Primary region lost",
            "eu-west-1 disappears: no page of the shop loads",
            "failover",
            "fail over: database writer and DNS move to eu-central-1; checkout recovers within the RTO",
            _lose_primary,
            _failover_done,
            target_faults="service",
            checks=_one_page,
        ),
        Scenario(
            "database-lost",
            "Database primary lost",
            "the primary database dies: carts and payments fail while browsing works",
            "failover",
            "fail over: the Aurora writer moves to the standby; data lost stays within the RPO",
            _lose_database,
            _failover_done,
            replica_lag=2.0,
            target_faults="service",
        ),
        Scenario(
            "payment-down",
            "Payment provider down",
            "the payment provider fails in every region: a transaction step fails while the site is up",
            "page_only",
            "page only: moving regions cannot fix a shared provider, so nothing is changed",
            _payment_down,
            _page_only_done,
            database=False,
        ),
        Scenario(
            "slow-degradation",
            "Slow degradation",
            "latency creeps up until checkout is slower than its SLO",
            "page_only",
            "page only: degraded is not down; a moderate incident, no failover",
            _creep,
            _page_only_done,
            tweak=_slo,
            database=False,
        ),
        Scenario(
            "flapping-network",
            "Flapping network",
            "the link to the primary region drops for seconds at a time, again and again",
            "no_failover",
            "do not fail over: blips are confirmed away; no incident, no change",
            _flap,
            _quiet_done,
            checks=lambda drill: _no_page(drill),
            database=False,
            target_faults="flap",
        ),
        Scenario(
            "controller-cut-off",
            "The controller itself cut off",
            "the controller's own network fails: everything looks down from where it stands",
            "no_failover",
            "do not fail over: one 'controller isolated' alert, nothing changed",
            _cut_off,
            _cut_off_done,
            tweak=_with_references,
            prepare=_start_references,
            checks=_cut_off_checks,
            database=False,
            target_faults="all",
        ),
        Scenario(
            "second-outage",
            "A second outage during the cooldown",
            "the region we failed over to breaks too, minutes after the failover",
            "failover",
            "exactly one failover: the second outage is paged, the cooldown holds a second run",
            _second_outage,
            _second_done,
            deadline=60.0,
            checks=_second_checks,
        ),
        Scenario(
            "killed-mid-failover",
            "The controller killed mid-failover",
            "the controller's process dies (OOM, node loss) in the middle of a failover",
            "failover",
            "exactly one completed run: a new process resumes the journal; no step is applied twice",
            _lose_primary,
            _failover_done,
            deadline=60.0,
            tweak=_drain_step,
            checks=_killed_checks,
            subprocess=True,
        ),
    ]
}
assert set(BUILTIN) == set(SCENARIOS)
