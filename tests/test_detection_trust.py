"""Can detection be trusted? False alarms, time to detect, quorum, isolation, flapping, dependencies,
silences and windows.

The first part measures false alarms and time to detect on the real Controller in the
deterministic simulation (tests/sim); the rest runs the Controller against local aiohttp targets
the test flips, with the local PagerDuty receiver checking what is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from controller.config import Config, load_config
from controller.decide import (
    Hold,
    OpenIncident,
    StartPlaybook,
    decide,
)
from controller.demo.marketplace import serve
from controller.demo.pagerduty import PagerDutyReceiver
from controller.detect import (
    Health,
    ProbeState,
    Rules,
    ServiceState,
    combine,
    observe,
)
from controller.loop import Controller
from controller.stores import SQLiteStore
from probes.base import ProbeResult
from probes.http import TransactionProbe
from probes.runner import run_probe
from tests.sim.figures import false_alarms, time_to_detect
from tests.sim.invariants import detection_bound
from tests.sim.scenarios import Scenario, config

DAY = 86_400.0
MONTH = 30 * DAY

# ====================================================================== figures from the real controller
# The production Controller in the deterministic simulation (tests/sim): detection, decide, the
# playbook engine, the outbox and the SQLite store, in virtual time. bench/sim_figures.py prints the
# README's table from longer runs of the same functions.


@pytest.mark.timeout(300)
def test_five_percent_failures_open_no_incident() -> None:
    days, incidents, failovers = false_alarms(0.05, 0.25)
    print(
        f"\np=0.05, {days:g} simulated days (real controller): {incidents} incidents, {failovers} failovers"
    )
    assert incidents == 0, f"{incidents} false incidents in {days:g} days at 5% random failures"
    assert failovers == 0


@pytest.mark.timeout(300)
def test_twenty_percent_failures_do_not_fail_over() -> None:
    days, incidents, failovers = false_alarms(0.20, 0.25, seed=20)
    print(
        f"\np=0.20, {days:g} simulated days (real controller): {incidents} incidents, {failovers} failovers"
    )
    assert failovers == 0, f"{failovers} false failovers in {days:g} days at 20% random failures"


@pytest.mark.timeout(300)
def test_a_hard_outage_opens_its_incident_within_the_bound() -> None:
    cfg = config(Scenario(seed=0))
    bound = detection_bound(cfg, "checkout-api")
    delays = [time_to_detect("refused", phase) for phase in (0.0, 3.3, 6.7, 9.1)]
    assert all(d is not None for d in delays), f"an outage was never declared: {delays}"
    got = [d for d in delays if d is not None]
    print(f"\nrefused: incident opened after {min(got):.1f}s .. {max(got):.1f}s (bound {bound:.1f}s)")
    assert max(got) <= bound, f"worst time to detect {max(got):.1f}s over the bound {bound:.1f}s"
    d = cfg.detection
    assert min(got) >= (d.failure_threshold - 1) * cfg.probes["checkout-api"].interval, (
        "faster than the streak"
    )


# ====================================================================== controller helpers

KEY = "trust0test0routing0key0000000000"  # 32 characters


@dataclass
class Target:
    """A local HTTP server: every path answers 200 unless the test set another status for it."""

    status: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    default: int = 200

    def set(self, code: int, *paths: str) -> None:
        for path in paths:
            self.status[path] = code

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            self.hits[name] = self.hits.get(name, 0) + 1
            code = self.status.get(name, self.default)
            return web.json_response({"ok": code == 200}, status=code)

        async def login(request: web.Request) -> web.Response:
            return web.json_response({"token": SECRET})

        async def cart(request: web.Request) -> web.Response:
            self.hits["cart"] = self.hits.get("cart", 0) + 1
            return web.json_response({"error": "cart service down"}, status=self.status.get("cart", 200))

        app = web.Application()
        app.router.add_get("/login", login)
        app.router.add_get("/cart/{token}", cart)
        app.router.add_get("/{name}", handle)
        return app


SECRET = "tok-5ecret-7731"


@dataclass
class Env:
    target: Target
    port: int
    pd: PagerDutyReceiver
    pd_port: int
    tmp: Path

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def load(self, text: str) -> Config:
        text += f"""
notifiers:
  pagerduty:
    routing_key_env: TRUST_TEST_PD_KEY
    events_url: "http://127.0.0.1:{self.pd_port}/v2/enqueue"
aws:
  endpoint_url: "http://127.0.0.1:9"
controller:
  data_dir: "{self.tmp / "state"}"
  tick: 100ms
  outbox_retry: 300ms
"""
        path = self.tmp / "continuity.yaml"
        path.write_text(text, encoding="utf-8")
        return load_config(path)

    def triggers(self) -> list[dict[str, Any]]:
        return [e for e in self.pd.events if e["event_action"] == "trigger"]

    def resolves(self) -> list[dict[str, Any]]:
        return [e for e in self.pd.events if e["event_action"] == "resolve"]


@asynccontextmanager
async def environment(tmp: Path) -> AsyncIterator[Env]:
    target, pd = Target(), PagerDutyReceiver()
    t_runner, t_port = await serve(target.app(), "127.0.0.1", 0)
    p_runner, p_port = await serve(pd.app(), "127.0.0.1", 0)
    try:
        yield Env(target, t_port, pd, p_port, tmp)
    finally:
        await t_runner.cleanup()
        await p_runner.cleanup()


def controller(cfg: Config, clock: Callable[[], float] = time.time) -> Controller:
    return Controller(cfg, SQLiteStore(cfg.controller.data_dir), env=lambda name: KEY, clock=clock)


async def until(cond: Callable[[], Any], timeout: float = 8.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.03)


def metric(c: Controller, name: str, **labels: str) -> float | None:
    return c.metrics.registry.get_sample_value(name, labels)


def messages(c: Controller, incident_id: str) -> list[str]:
    return [e.message for e in c.store.timeline(incident_id)]


def fake(probe: str, ok: bool, at: float, vantage: str = "local", **details: Any) -> ProbeResult:
    return ProbeResult(
        probe,
        ok,
        at,
        0.01,
        error="" if ok else "expected status 200, found 503",
        vantage=vantage,
        details=details,
    )


PLAYBOOK = """
playbooks:
  recover:
    cooldown: 0s
    steps:
      - {name: pause, action: wait, with: {duration: 50ms}}
"""


# ====================================================================== quorum


def test_quorum_pure_two_of_three_fresh_votes() -> None:
    rules = Rules(confirm=False)

    def down(at: float) -> ProbeState:
        s = ProbeState()
        for i in range(3):
            s = observe(s, fake("p", False, at + i), rules=rules)
        return s

    up = observe(ProbeState(), fake("p", True, 100.0), rules=rules)
    assert down(98.0).status is Health.DOWN and up.status is Health.UP
    one = combine([up, down(98.0), up], quorum=2, freshness=30.0, now=101.0)
    assert one.status is Health.UP, "one vantage point cut off is not an outage"
    two = combine([up, down(98.0), down(90.0)], quorum=2, freshness=30.0, now=101.0)
    assert two.status is Health.DOWN
    assert two.first_failure_at == 90.0, "the outage started at the earliest agreeing vantage point"
    stale = combine([up, down(98.0), down(10.0)], quorum=2, freshness=30.0, now=101.0)
    assert stale.status is not Health.DOWN, "a result older than freshness does not vote"
    assert combine([down(10.0)], quorum=1, freshness=30.0, now=101.0).status is Health.UNKNOWN


QUORUM = """
services:
  shop: {tier: critical, rto: 5m, probes: [web]}
probes:
  web: {kind: http, url: "http://127.0.0.1:9/web", interval: 10s, timeout: 1s}
detection: {quorum: 2, freshness: 30s, confirm: {probes: 0}}
"""


def test_quorum_through_the_controller(tmp_path: Path) -> None:
    async def main() -> None:
        now = [1000.0]
        cfg = Config.model_validate(yaml.safe_load(QUORUM))
        cfg.controller.data_dir = str(tmp_path / "state")
        c = controller(cfg, clock=lambda: now[0])
        try:

            def tick(**votes: bool) -> None:
                for vantage, ok in votes.items():
                    c.detection.ingest(fake("web", ok, now[0], vantage=vantage))
                now[0] += 10

            for _ in range(2):
                tick(local=True, eu=True, us=True)
            for _ in range(5):  # eu is cut off: one of three
                tick(local=True, eu=False, us=True)
            await c.reconcile()
            assert c.detection.vstates["web"]["eu"].status is Health.DOWN
            assert c.detection.states["web"].status is Health.UP
            assert c.store.list_incidents() == [], "one vantage point failing must not open an incident"

            # us stops reporting after three failures; 30 s later its DOWN is stale and cannot vote
            for _ in range(3):
                tick(local=True, eu=False, us=False)
            assert c.detection.states["web"].status is Health.DOWN
            assert c.store.list_incidents() == []  # decided on the next reconcile, not yet
            now[0] += 31
            tick(local=True, eu=False)
            assert c.detection.vstates["web"]["us"].status is Health.DOWN, "us last said DOWN ..."
            assert c.detection.states["web"].status is not Health.DOWN, "... but too long ago to vote"
            await c.reconcile()
            assert c.store.list_incidents() == [], "a stale vote must not make the quorum"

            tick(local=True, eu=False, us=False)  # us is back and agrees with eu: two of three
            assert c.detection.states["web"].status is Health.DOWN
            await c.reconcile()
            [inc] = c.store.list_incidents()
            assert inc.service == "shop" and inc.severity == "critical"
            assert inc.data["failing"] == ["web"]
        finally:
            c.store.close()

    asyncio.run(main())


# ====================================================================== isolation


def http(env: Env, name: str, interval: str = "100ms") -> str:
    return f'  {name}: {{kind: http, url: "{env.url(name)}", interval: {interval}, timeout: 500ms}}\n'


def test_isolation_holds_every_failover_and_pages_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path) as env:
            cfg = env.load(
                "services:\n"
                "  shop: {tier: critical, rto: 5m, probes: [web], playbook: recover}\n"
                "probes:\n"
                + http(env, "web")
                + http(env, "ref-a")
                + http(env, "ref-b")
                + PLAYBOOK
                + "detection: {reference_probes: [ref-a, ref-b], confirm: {probes: 2, spacing: 50ms}}\n"
            )
            c = controller(cfg)
            await c.start()
            try:
                await until(lambda: all(c.detection.probe_healthy(p) for p in cfg.probes), what="all up")
                assert metric(c, "continuity_isolated") == 0
                env.target.set(503, "web", "ref-a", "ref-b")  # the controller's own network is cut
                await until(lambda: c.effects.isolated_since is not None, what="isolated")
                await until(lambda: env.triggers(), what="isolation alert")
                await asyncio.sleep(1.0)  # many ticks while cut off
                assert c.store.runs() == [], "no failover while the controller may be the one cut off"
                assert c.store.list_incidents() == [], "no incident while the references fail"
                # Runs made while cut off are no evidence: web is not DOWN from them, so nothing
                # is even held for it; only the controller's own alert speaks.
                assert c.detection.states["web"].status is not Health.DOWN
                assert not [x for x in decide(c.observer.observation(), c.config) if not isinstance(x, Hold)]
                assert metric(c, "continuity_isolated") == 1
                [alert] = env.triggers()
                assert "isolated" in alert["payload"]["summary"]
                assert alert["payload"]["severity"] == "critical"

                env.target.set(200, "ref-a", "ref-b")  # our view is trusted again; web is still down
                await until(lambda: env.resolves(), what="isolation resolved")
                assert [r["dedup_key"] for r in env.resolves()] == [alert["dedup_key"]]
                assert metric(c, "continuity_isolated") == 0
                inc = await until(lambda: c.store.open_incident_for("shop"), what="the real incident")
                await until(lambda: c.store.runs(), what="the failover, now trusted")
                assert [r.incident_id for r in c.store.runs()] == [inc.id]
                await until(lambda: len(env.triggers()) == 2, what="the incident's page")
                assert env.triggers()[1]["dedup_key"] == inc.dedup_key and env.pd.rejected == []
            finally:
                await c.stop()
                c.store.close()

    asyncio.run(main())


# ====================================================================== flapping


def test_flapping_holds_the_playbook_and_keeps_the_incident_open(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path) as env:
            cfg = env.load(
                "services:\n"
                "  shop: {tier: critical, rto: 5m, probes: [web], playbook: recover}\n"
                "probes:\n"
                + http(env, "web")
                + PLAYBOOK
                + "detection: {confirm: {probes: 2, spacing: 50ms}, flapping: {changes: 3, within: 10m}}\n"
            )
            c = controller(cfg)
            await c.start()
            try:

                async def flip(code: int, status: Health) -> None:
                    env.target.set(code, "web")
                    await until(lambda: c.detection.states["web"].status is status, what=f"web {status}")

                await flip(200, Health.UP)
                await flip(503, Health.DOWN)  # change 1: incident, failover
                first = await until(lambda: c.store.open_incident_for("shop"), what="first incident")
                await until(lambda: [r for r in c.store.runs() if r.state == "succeeded"], what="run")
                await flip(200, Health.UP)  # change 2: not flapping yet, resolved
                await until(lambda: c.store.open_incident_for("shop") is None, what="resolved")
                assert metric(c, "continuity_probe_flapping", probe="web") == 0
                await flip(503, Health.DOWN)  # change 3: flapping
                assert metric(c, "continuity_probe_flapping", probe="web") == 1
                second = await until(lambda: c.store.open_incident_for("shop"), what="second incident")
                assert second.id != first.id
                await until(
                    lambda: any("flapping" in m for m in messages(c, second.id)), what="flapping hold"
                )
                assert len(c.store.runs()) == 1, "no second failover while web flaps (cooldown is 0)"
                await flip(200, Health.UP)  # change 4: passes, but flapping keeps the incident open
                await until(
                    lambda: any("stays open until it is stable" in m for m in messages(c, second.id)),
                    what="stays-open hold",
                )
                await asyncio.sleep(0.5)
                still = c.store.get_incident(second.id)
                assert still is not None and still.status == "open"
                assert len(c.store.runs()) == 1
                holds = [m for m in messages(c, second.id) if "flapping" in m]
                assert holds[0] == "not running recover: web is flapping; waiting until it is stable"
                assert len(holds) == 2, f"each hold once on the timeline, not every tick: {holds}"
            finally:
                await c.stop()
                c.store.close()

    asyncio.run(main())


# ====================================================================== dependencies


def test_a_dependency_outage_is_one_incident_and_one_page(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path) as env:
            cfg = env.load(
                "services:\n"
                "  checkout: {tier: critical, rto: 5m, probes: [checkout-api], depends_on: [payments]}\n"
                "  payments: {tier: critical, rto: 5m, probes: [payments-api]}\n"
                "probes:\n"
                + http(env, "checkout-api")
                + http(env, "payments-api")
                + "detection: {confirm: {probes: 2, spacing: 50ms}}\n"
            )
            c = controller(cfg)
            await c.start()
            try:
                await until(lambda: all(c.detection.probe_healthy(p) for p in cfg.probes), what="all up")
                env.target.set(503, "checkout-api", "payments-api")
                inc = await until(lambda: c.store.open_incident_for("payments"), what="payments incident")
                await until(
                    lambda: c.detection.states["checkout-api"].status is Health.DOWN, what="checkout down"
                )
                await until(
                    lambda: any("part of payments's incident" in m for m in messages(c, inc.id)),
                    what="checkout joined",
                )
                await until(lambda: env.triggers(), what="page")
                await asyncio.sleep(0.6)
                assert [i.service for i in c.store.list_incidents()] == ["payments"]
                [joined] = [e for e in c.store.timeline(inc.id) if e.data.get("joined_service")]
                assert joined.data["joined_service"] == "checkout"
                assert joined.message.startswith("checkout is down: checkout-api")
                assert len(env.triggers()) == 1 and env.triggers()[0]["dedup_key"] == inc.dedup_key
            finally:
                await c.stop()
                c.store.close()

    asyncio.run(main())


# ====================================================================== silences and maintenance

SILENCE = """
services:
  checkout: {{tier: critical, rto: 5m, probes: [web], playbook: recover}}
probes:
  web: {{kind: http, url: "http://127.0.0.1:9/web", interval: 10s, timeout: 1s}}
detection: {{confirm: {{probes: 0}}}}
maintenance:
  - {{services: [checkout], start: "{start}", end: "{end}", reason: "db upgrade"}}
"""


def silence_config(tmp: Path, start: datetime, end: datetime) -> Config:
    text = SILENCE.format(start=start.isoformat(), end=end.isoformat()) + PLAYBOOK
    cfg = Config.model_validate(yaml.safe_load(text))
    cfg.controller.data_dir = str(tmp / "state")
    return cfg


def test_maintenance_window_silences_then_the_incident_opens(tmp_path: Path) -> None:
    async def main() -> None:
        t0 = datetime(2026, 6, 1, 2, 0, tzinfo=UTC)
        now = [t0.timestamp()]
        c = controller(
            silence_config(tmp_path, t0 - timedelta(minutes=5), t0 + timedelta(minutes=2)),
            clock=lambda: now[0],
        )
        try:
            for i in range(5):
                c.detection.ingest(fake("web", i == 0, now[0]))
                now[0] += 10
            assert c.detection.states["web"].status is Health.DOWN
            out = await c.reconcile()
            assert c.store.list_incidents() == [] and c.store.runs() == []
            assert [type(x) for x in out] == [Hold] and "maintenance until" in out[0].reason
            assert "db upgrade" in out[0].reason
            assert metric(c, "continuity_silenced", service="checkout") == 1
            now[0] = (t0 + timedelta(minutes=2)).timestamp()  # the window's end is exclusive
            c.detection.ingest(fake("web", False, now[0]))  # a fresh result: a stale one is unknown, not down
            out = await c.reconcile()
            assert [type(x) for x in out] == [OpenIncident, StartPlaybook]
            assert metric(c, "continuity_silenced", service="checkout") == 0
            assert c.store.open_incident_for("checkout") is not None
        finally:
            for task in c.runs.running.values():
                await task
            c.store.close()

    asyncio.run(main())


def test_a_silence_flag_holds_until_it_expires(tmp_path: Path) -> None:
    async def main() -> None:
        now = [1_900_000_000.0]
        past = datetime(2020, 1, 1, tzinfo=UTC)
        c = controller(silence_config(tmp_path, past, past + timedelta(hours=1)), clock=lambda: now[0])
        try:
            until_at = now[0] + 600
            c.store.set_flag("silence:checkout", f"{until_at}|rolling the payment keys")  # as the CLI will
            for _ in range(4):
                c.detection.ingest(fake("web", False, now[0]))
                now[0] += 10
            out = await c.reconcile()
            assert c.store.list_incidents() == [] and c.store.runs() == []
            assert [type(x) for x in out] == [Hold]
            assert "silenced until" in out[0].reason and "rolling the payment keys" in out[0].reason
            assert metric(c, "continuity_silenced", service="checkout") == 1
            now[0] = until_at - 1
            await c.reconcile()
            assert c.store.list_incidents() == []
            now[0] = until_at + 1
            c.detection.ingest(fake("web", False, now[0]))  # a fresh result: a stale one is unknown, not down
            out = await c.reconcile()
            assert [type(x) for x in out] == [OpenIncident, StartPlaybook]
            assert metric(c, "continuity_silenced", service="checkout") == 0
        finally:
            for task in c.runs.running.values():
                await task
            c.store.close()

    asyncio.run(main())


# ====================================================================== windows and degraded results


def test_a_window_catches_failures_that_are_not_consecutive() -> None:
    cfg = Config.model_validate(
        {
            "services": {"shop": {"tier": "critical", "rto": "5m", "probes": ["web"]}},
            "probes": {
                "web": {"kind": "http", "url": "http://127.0.0.1:9/", "window": {"failures": 3, "of": 5}}
            },
        }
    )
    rules = cfg.rules("web")
    assert (rules.window_failures, rules.window_size, rules.confirm) == (3, 5, True)
    state = ProbeState()
    seen = []
    for i, ok in enumerate([True, False, True, False, True, False]):
        state = observe(state, fake("web", ok, 10.0 * i), rules=rules)
        seen.append(state.status)
    assert state.failures == 1, "never two failures in a row ..."
    assert seen[-1] is Health.SUSPECT, "... yet three of the last five failed"
    assert Health.SUSPECT not in seen[:-1]
    plain = ProbeState()
    for i, ok in enumerate([True, False, True, False, True, False]):
        plain = observe(plain, fake("web", ok, 10.0 * i), rules=Rules(confirm=True))
    assert plain.status is Health.UP, "without the window the same results are healthy"


def test_degraded_results_open_a_moderate_incident_and_never_start_a_playbook(tmp_path: Path) -> None:
    async def main() -> None:
        now = [5000.0]
        past = datetime(2020, 1, 1, tzinfo=UTC)
        c = controller(silence_config(tmp_path, past, past + timedelta(hours=1)), clock=lambda: now[0])
        try:
            for i in range(6):
                c.detection.ingest(fake("web", i == 0, now[0], degraded=True))
                now[0] += 10
                await c.reconcile()
            assert c.detection.states["web"].status is Health.DEGRADED
            [inc] = c.store.list_incidents()
            assert inc.severity == "moderate", "critical tier, degraded -> moderate"
            assert c.detection.health()["checkout"].state is ServiceState.DEGRADED
            assert c.store.runs() == [] and c.runs.running == {}, "degraded never starts a failover"
        finally:
            c.store.close()

    asyncio.run(main())


def test_transaction_allow_failure_always_run_and_secret_masking(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path) as env:
            base = f"http://127.0.0.1:{env.port}"

            def journey(optional_status: int, cart_status: int) -> TransactionProbe:
                env.target.set(optional_status, "recommendations")
                env.target.set(cart_status, "cart")
                return TransactionProbe.model_validate(
                    {
                        "kind": "transaction",
                        "steps": [
                            {
                                "name": "login",
                                "url": f"{base}/login",
                                "extract": {"token": {"json": "token", "secret": True}},
                            },
                            {
                                "name": "recommendations",
                                "url": f"{base}/recommendations",
                                "allow_failure": True,
                            },
                            {"name": "cart", "url": f"{base}/cart/{{{{ token }}}}"},
                            {"name": "cleanup", "url": f"{base}/cleanup", "always_run": True},
                        ],
                    }
                )

            soft = await run_probe("journey", journey(503, 200))
            assert not soft.ok and soft.details == {"degraded": True}
            assert [s.name for s in soft.steps] == ["login", "recommendations", "cart", "cleanup"]
            assert observe(ProbeState(), soft, rules=Rules(failure_threshold=1)).status is Health.DEGRADED

            before = env.target.hits.get("cleanup", 0)
            hard = await run_probe("journey", journey(200, 500))
            assert not hard.ok and not hard.details.get("degraded")
            assert [(s.name, s.ok) for s in hard.steps] == [
                ("login", True),
                ("recommendations", True),
                ("cart", False),
                ("cleanup", True),
            ]
            assert env.target.hits["cleanup"] == before + 1, "the cleanup ran after the failed step"
            cart = hard.steps[2]
            assert cart.request == f"GET {base}/cart/***"
            assert "***" in hard.reason and SECRET not in hard.reason
            assert SECRET not in repr(hard.to_dict())
            assert env.target.hits["cart"] >= 1, "the real token did reach the target"
            assert observe(ProbeState(), hard, rules=Rules(failure_threshold=1)).status is Health.DOWN

    asyncio.run(main())
