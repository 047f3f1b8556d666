"""The Controller end to end, without the demo: real probes against a local target whose answers the
test flips, the real store, and PagerDuty events checked by the validating receiver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from controller.config import Config, load_config
from controller.demo.marketplace import serve
from controller.demo.pagerduty import PagerDutyReceiver
from controller.loop import Controller
from controller.stores import Incident, SQLiteStore

KEY = "controller0test0routing0key00000"  # 32 characters


@dataclass
class Target:
    """A local HTTP service whose paths answer 200 (healthy) or 503 (broken), as the test says."""

    status: int = 200
    hits: dict[str, int] = field(default_factory=dict)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits[request.path] = self.hits.get(request.path, 0) + 1
            return web.json_response({"ok": self.status == 200}, status=self.status)

        app = web.Application()
        app.router.add_get("/{name}", handle)
        return app


@dataclass
class Env:
    target: Target
    target_port: int
    pd: PagerDutyReceiver
    pd_port: int
    data_dir: Path

    def config(self, tmp: Path, *, tier: str, probes: int, playbook: str, extra: str = "") -> Config:
        probe_names = [f"web-{i}" for i in range(probes)]
        probe_yaml = "".join(
            f"""
  {name}:
    kind: http
    url: "http://127.0.0.1:{self.target_port}/{name}"
    interval: 200ms
    timeout: 1s
    expect: {{status: 200}}"""
            for name in probe_names
        )
        text = f"""
services:
  shop:
    tier: {tier}
    rto: 5m
    probes: [{", ".join(probe_names)}]
    playbook: recover{extra}
probes:{probe_yaml}
detection: {{failure_threshold: 3, success_threshold: 2}}
playbooks:
  recover:
    cooldown: 10m
    steps:{playbook}
  back:
    steps:
      - {{name: move-back, action: wait, with: {{duration: 50ms}}}}
notifiers:
  pagerduty:
    routing_key_env: CONTROLLER_TEST_PD_KEY
    events_url: "http://127.0.0.1:{self.pd_port}/v2/enqueue"
aws:
  endpoint_url: "http://127.0.0.1:9"
controller:
  data_dir: "{self.data_dir}"
  tick: 100ms
  outbox_retry: 500ms
"""
        path = tmp / "continuity.yaml"
        path.write_text(text, encoding="utf-8")
        return load_config(path)

    def triggers(self) -> list[dict[str, Any]]:
        return [e for e in self.pd.events if e["event_action"] == "trigger"]

    def resolves(self) -> list[dict[str, Any]]:
        return [e for e in self.pd.events if e["event_action"] == "resolve"]


WAIT_AND_NOTIFY = """
      - {name: pause, action: wait, with: {duration: 100ms}}
      - {name: tell, action: notify, with: {message: "recovered {{ service }} for {{ incident_id }}"}}"""

FAILING = """
      - {name: check-web, action: wait_healthy, with: {probes: [web-0], within: 300ms}, retries: 0}
      - {name: tell, action: notify, with: {message: "never sent"}}"""


@asynccontextmanager
async def environment(tmp: Path) -> AsyncIterator[Env]:
    target, pd = Target(), PagerDutyReceiver()
    t_runner, t_port = await serve(target.app(), "127.0.0.1", 0)
    p_runner, p_port = await serve(pd.app(), "127.0.0.1", 0)
    try:
        yield Env(target, t_port, pd, p_port, tmp / "state")
    finally:
        await t_runner.cleanup()
        await p_runner.cleanup()


def controller(cfg: Config) -> Controller:
    return Controller(cfg, SQLiteStore(cfg.controller.data_dir), env=lambda name: KEY)


async def until(cond: Callable[[], Any], timeout: float = 8.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def healthy(c: Controller) -> None:
    await until(lambda: all(c.detection.probe_healthy(p) for p in c.config.probes), what="probes up")


def only_incident(c: Controller) -> Incident:
    [inc] = c.store.list_incidents()
    return inc


def messages(c: Controller, incident_id: str) -> list[str]:
    return [e.message for e in c.store.timeline(incident_id)]


def test_one_incident_per_outage_paged_resolved_and_cooldown_respected(tmp_path: Path):
    async def main() -> None:
        async with environment(tmp_path) as env:
            c = controller(env.config(tmp_path, tier="critical", probes=2, playbook=WAIT_AND_NOTIFY))
            await c.start()
            try:
                await healthy(c)
                env.target.status = 503
                inc = await until(lambda: c.store.open_incident_for("shop"), what="incident")
                assert inc.severity == "critical"
                await until(lambda: env.triggers(), what="trigger")
                await until(lambda: [r for r in c.store.runs() if r.state != "running"], what="run")
                # keep failing for many more probe runs: still one incident, one trigger, one run
                await until(
                    lambda: all(c.detection.states[p].failures >= 8 for p in c.config.probes), what="failures"
                )
                assert len(c.store.list_incidents()) == 1
                [trig] = env.triggers()
                assert trig["dedup_key"] == inc.dedup_key
                assert trig["payload"]["severity"] == "critical"
                assert trig["payload"]["component"] == "shop"
                [run] = c.store.runs()
                assert run.state == "succeeded" and run.incident_id == inc.id
                await until(lambda: env.pd.changes, what="change event delivered by the outbox")
                assert [ch["payload"]["summary"] for ch in env.pd.changes] == [f"recovered shop for {inc.id}"]

                env.target.status = 200
                await until(lambda: env.resolves(), what="resolve")
                [res] = env.resolves()
                assert res["dedup_key"] == inc.dedup_key
                inc = c.store.get_incident(inc.id)
                assert inc.status == "resolved"

                # A second outage inside the playbook's cooldown: a new incident, but no second run.
                env.target.status = 503
                second = await until(lambda: c.store.open_incident_for("shop"), what="second incident")
                assert second.id != inc.id
                await until(
                    lambda: any("cooldown" in m for m in messages(c, second.id)), what="cooldown hold"
                )
                await asyncio.sleep(1.0)  # several more ticks of the decision loop
                assert len(c.store.runs()) == 1, "the playbook must not start again inside its cooldown"
                held = [m for m in messages(c, second.id) if "cooldown" in m]
                assert held[0].startswith("not running recover: it ran ")
                assert len(held) == 1, f"the hold is recorded once, not every tick: {held}"
                assert [t["dedup_key"] for t in env.triggers()] == [inc.dedup_key, second.dedup_key]
                assert env.pd.rejected == []
            finally:
                await c.stop()
                c.store.close()

    asyncio.run(main())


def test_supporting_tier_is_low_and_failed_playbook_raises_to_critical(tmp_path: Path):
    async def main() -> None:
        async with environment(tmp_path) as env:
            c = controller(env.config(tmp_path, tier="supporting", probes=1, playbook=FAILING))
            await c.start()
            try:
                await healthy(c)
                env.target.status = 503
                await until(lambda: [r for r in c.store.runs() if r.state == "failed"], what="failed run")
                await until(lambda: len(env.triggers()) == 2, what="second trigger")
                inc = only_incident(c)
                first, second = env.triggers()
                assert first["payload"]["severity"] == "warning", "supporting tier -> low -> warning"
                assert second["payload"]["severity"] == "critical"
                assert first["dedup_key"] == second["dedup_key"] == inc.dedup_key
                assert inc.severity == "critical"
                assert "step check-web failed" in inc.data["playbook_error"]
                timeline = c.store.timeline(inc.id)
                errors = [e.message for e in timeline if e.kind == "error"]
                assert any("still not up after 300ms: web-0" in m for m in errors)
                assert any(
                    m.startswith("raised to critical: automatic recovery failed") for m in messages(c, inc.id)
                )
                steps = c.store.steps(c.store.runs()[0].id)
                assert [(s.name, s.state) for s in steps] == [("check-web", "failed"), ("tell", "skipped")]
                assert env.pd.changes == [], "the notify step after the failure never ran"
                await asyncio.sleep(0.6)
                assert len(c.store.runs()) == 1, "a failed run waits for a human"
                assert only_incident(c).severity == "critical", "the floor holds"
            finally:
                await c.stop()
                c.store.close()

    asyncio.run(main())


def test_restart_keeps_the_open_incident_and_resolves_it_with_the_same_key(tmp_path: Path):
    async def main() -> None:
        async with environment(tmp_path) as env:
            cfg = env.config(tmp_path, tier="critical", probes=1, playbook=WAIT_AND_NOTIFY)
            c = controller(cfg)
            await c.start()
            await healthy(c)
            env.target.status = 503
            inc = await until(lambda: c.store.open_incident_for("shop"), what="incident")
            await until(lambda: env.triggers(), what="trigger")
            await until(lambda: [r for r in c.store.runs() if r.state == "succeeded"], what="run")
            await c.stop()
            before = [(e.kind, e.message) for e in c.store.timeline(inc.id)]
            c.store.close()

            c2 = controller(cfg)
            try:
                again = c2.store.open_incident_for("shop")
                assert again is not None and again.id == inc.id and again.dedup_key == inc.dedup_key
                after = [(e.kind, e.message) for e in c2.store.timeline(inc.id)]
                assert after[: len(before)] == before
                assert any(m.startswith("incident opened, severity critical") for _, m in after)
                assert c2.runs.incident_runs == {inc.id: 1}
                await c2.start()
                await until(lambda: c2.detection.states["web-0"].failures >= 3, what="down again")
                await asyncio.sleep(0.3)
                assert c2.store.list_incidents() == [c2.store.get_incident(inc.id)], "no second incident"
                assert len(c2.store.runs()) == 1, "no second run for the same incident"
                env.target.status = 200
                await until(lambda: env.resolves(), what="resolve")
                [res] = env.resolves()
                assert res["dedup_key"] == inc.dedup_key
                assert c2.store.get_incident(inc.id).status == "resolved"
                assert len(env.triggers()) == 1
                assert env.pd.rejected == []
            finally:
                await c2.stop()
                c2.store.close()

    asyncio.run(main())


def test_failback_after_the_primary_has_been_healthy_long_enough(tmp_path: Path):
    """A successful failover is followed, once the primary has been UP for `healthy_for`, by the
    failback playbook (approval auto here; manual is the default), exactly once, on the same incident."""
    fb = """
    failback: {playbook: back, healthy_probes: [web-0], healthy_for: 600ms, approval: auto}"""

    async def main() -> None:
        async with environment(tmp_path) as env:
            c = controller(
                env.config(tmp_path, tier="critical", probes=1, playbook=WAIT_AND_NOTIFY, extra=fb)
            )
            await c.start()
            try:
                await healthy(c)
                env.target.status = 503
                inc = await until(lambda: c.store.open_incident_for("shop"), what="incident")
                await until(lambda: [r for r in c.store.runs() if r.state == "succeeded"], what="failover")
                assert not [r for r in c.store.runs() if r.playbook == "back"], "no failback while still down"
                env.target.status = 200
                back = await until(
                    lambda: [r for r in c.store.runs() if r.playbook == "back"], what="failback"
                )
                resolved_at = c.store.get_incident(inc.id).resolved_at
                assert resolved_at is not None and back[0].started_at - resolved_at >= 0.5
                await until(
                    lambda: [r for r in c.store.runs() if r.playbook == "back" and r.state == "succeeded"],
                    what="failback done",
                )
                await asyncio.sleep(1.0)  # healthy for longer still: no second failback
                assert [r.playbook for r in c.store.runs()] == ["recover", "back"]
                assert any("failing shop back with back" in m for m in messages(c, inc.id))
                moves = [m.split(" (checks passed")[0] for m in messages(c, inc.id) if m.startswith("shop: ")]
                assert [m.split(":")[1].strip() for m in moves] == [
                    "primary -> failing_over",
                    "failing_over -> failed_over",
                    "failed_over -> failing_back",
                    "failing_back -> primary",
                ], moves
                start = next(m for m in messages(c, inc.id) if m.startswith("shop: primary -> failing_over"))
                assert "checks passed: shop is DOWN" in start and "approval: auto" in start
                assert not [e for e in env.pd.events if e["event_action"] == "trigger"][1:], "no re-page"
            finally:
                await c.stop()

    asyncio.run(main())
