"""Playbook safety: guards that block, rollback, parallel groups, approvals, resume after kill -9,
and malformed playbooks. Real boto3 -> recording proxy -> moto, real aiohttp targets, the real
Controller, store and engine; nothing of ours is mocked."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controller import commands
from controller.api import app as api_app
from controller.aws import client_factory
from controller.config import Aws, ConfigError, Playbook, load_config
from controller.demo.marketplace import serve
from controller.demo.pagerduty import PagerDutyReceiver
from controller.loop import Controller
from controller.stores import Run, SQLiteStore
from playbooks.engine import Engine, RunResult, make_context
from tests.conftest import World, aws_client
from tests.fakes.awsproxy import AwsProxy, Recorded, matcher

KEY = "safety00test00routing00key000000"  # 32 characters
PRIMARY, SWITCHED = "127.0.0.2", "127.0.0.3"
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers


@dataclass
class Target:
    """Local HTTP target: each path answers the status the test sets (200 by default)."""

    status: dict[str, int] = field(default_factory=dict)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            code = self.status.get(request.match_info["name"], 200)
            return web.json_response({"ok": code == 200}, status=code)

        application = web.Application()
        application.router.add_get("/{name}", handle)
        return application


@dataclass
class Env:
    tmp: Path
    target: Target
    target_port: int
    pd: PagerDutyReceiver
    pd_port: int

    def config_text(
        self,
        world: World,
        endpoint: str,
        *,
        steps: str,
        tier: str = "critical",
        rpo: str = "0s",
        playbook_extra: str = "",
        data_dir: Path | None = None,
        failure_threshold: int = 3,
        listen: str = "127.0.0.1:0",
        pagerduty: bool = True,
    ) -> str:
        probes = "".join(
            f"""
  {name}:
    kind: http
    url: "http://127.0.0.1:{self.target_port}/{name}"
    interval: 100ms
    timeout: 1s"""
            for name in ("primary", "secondary")
        )
        pd = (
            f"""
notifiers:
  pagerduty:
    routing_key_env: SAFETY_TEST_PD_KEY
    events_url: "http://127.0.0.1:{self.pd_port}/v2/enqueue"
"""
            if pagerduty
            else ""
        )
        return f"""
services:
  shop:
    tier: {tier}
    rto: 5m
    rpo: {rpo}
    probes: [primary]
    playbook: recover
probes:{probes}
detection:
  {{failure_threshold: {failure_threshold}, success_threshold: 1, confirm: {{probes: 2, spacing: 50ms}}}}
playbooks:
  recover:
    cooldown: 0s{playbook_extra}
    steps:{steps}
{pd}
aws:
  region: eu-west-1
  endpoint_url: "{endpoint}"
  read_timeout: 10s
controller:
  data_dir: "{data_dir or self.tmp / "state"}"
  listen: "{listen}"
  tick: 100ms
  outbox_retry: 300ms
"""

    def controller(self, world: World, endpoint: str, **kw: Any) -> Controller:
        path = self.tmp / "continuity.yaml"
        path.write_text(self.config_text(world, endpoint, **kw), encoding="utf-8")
        cfg = load_config(path)
        return Controller(cfg, SQLiteStore(cfg.controller.data_dir), env=lambda name: KEY)

    def triggers(self) -> list[dict[str, Any]]:
        return [e for e in self.pd.events if e["event_action"] == "trigger"]


@asynccontextmanager
async def environment(tmp: Path) -> AsyncIterator[Env]:
    target, pd = Target(), PagerDutyReceiver()
    t_runner, t_port = await serve(target.app(), "127.0.0.1", 0)
    p_runner, p_port = await serve(pd.app(), "127.0.0.1", 0)
    try:
        yield Env(tmp, target, t_port, pd, p_port)
    finally:
        await t_runner.cleanup()
        await p_runner.cleanup()


@asynccontextmanager
async def running(c: Controller) -> AsyncIterator[Controller]:
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
        c.store.close()


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def runs_in(store: SQLiteStore, *states: str) -> list[Run]:
    return [r for r in store.runs() if r.state in states]


def messages(store: SQLiteStore, incident_id: str) -> list[str]:
    return [e.message for e in store.timeline(incident_id)]


def simple_changes(proxy: AwsProxy, world: World) -> list[Recorded]:
    """ChangeResourceRecordSets requests for the zone's simple (non-weighted) A record."""
    return [
        r
        for r in proxy.calls()
        if r.method == "POST"
        and "/rrset" in r.path
        and f"<Name>{world.zone}</Name>".encode() in r.body
        and b"<SetIdentifier>" not in r.body
    ]


def rrset_posts(proxy: AwsProxy) -> list[Recorded]:
    return [r for r in proxy.calls() if r.method == "POST" and "/rrset" in r.path]


def switch(world: World, values: list[str], name: str = "switch-dns", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "action": "aws.route53.switch_record",
        "with": {"zone": world.zone, "record": world.zone, "type": "A", "values": values},
        **extra,
    }


def switch_yaml(world: World, extra: str = "") -> str:
    return f"""
      - name: switch-dns
        action: aws.route53.switch_record
        with: {{zone: "{world.zone}", record: "{world.zone}", type: A, values: ["{SWITCHED}"]}}
        retries: 0{extra}"""


@dataclass
class Harness:
    """The engine alone, with its own store, for playbook-level tests."""

    tmp: Path
    endpoint: str
    timeline: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = SQLiteStore(self.tmp / "engine")
        self.engine = Engine(self.store, backoff=0.01)
        self.aws = client_factory(Aws(region="eu-west-1", endpoint_url=self.endpoint, read_timeout="10s"))

    async def arun(self, pb: Playbook, variables: dict[str, Any] | None = None) -> RunResult:
        async def notify(summary: str, details: dict[str, Any]) -> None:
            self.timeline.append(f"notify: {summary}")

        ctx = make_context(
            self.aws,
            lambda name: True,
            record=lambda kind, msg, data: self.timeline.append(msg),
            notify=notify,
            variables=variables or {"incident_id": "INC-test", "service": "shop", "severity": "critical"},
        )
        ctx.poll_interval = 0.05
        return await self.engine.run("safety", pb, ctx, service="shop")

    def run(self, pb: Playbook) -> RunResult:
        return asyncio.run(self.arun(pb))

    def journal(self, result: RunResult) -> list[tuple[str, str]]:
        return [(s.name, s.state) for s in self.store.steps(result.run_id)]


@pytest.fixture
def h(tmp_path: Path, proxy: AwsProxy) -> Any:
    harness = Harness(tmp_path, proxy.url)
    yield harness
    harness.store.close()


# ---------------------------------------------------------------- 1. a dead secondary blocks the switch


def test_dead_secondary_blocks_the_switch_freezes_and_ack_unfreezes(
    tmp_path: Path, world: World, proxy: AwsProxy
):
    async def main() -> None:
        async with environment(tmp_path) as env:
            env.target.status["secondary"] = 503
            steps = switch_yaml(world, "\n        guards: [{probes_healthy: [secondary]}]")
            c = env.controller(world, proxy.url, steps=steps, tier="important")
            async with running(c):
                await until(lambda: c.detection.probe_healthy("primary") is True, what="primary up")
                await until(lambda: c.detection.probe_healthy("secondary") is False, what="secondary down")
                env.target.status["primary"] = 503
                [run] = await until(lambda: runs_in(c.store, "blocked"), what="blocked run")
                # The run's end is an event decide consumes on the next cycle (freeze, critical, page).
                await until(lambda: c.store.get_flag("frozen:shop") == run.id, what="the freeze")
                inc = c.store.get_incident(run.incident_id)
                assert world.a_record() == [PRIMARY], "a blocked step must not touch the record"
                assert rrset_posts(proxy) == []
                [step] = c.store.steps(run.id)
                assert step.state == "blocked"
                assert step.detail == "guard failed: target not healthy: secondary is DOWN"
                assert run.error and "secondary is DOWN" in run.error
                assert inc.severity == "critical", "an important-tier (moderate) incident is raised"
                assert any(
                    m.startswith("raised to critical: a guard stopped the recovery")
                    for m in messages(c.store, inc.id)
                )
                assert c.store.get_flag("frozen:shop") == run.id
                blocked = await until(
                    lambda: [
                        t for t in env.triggers() if "a guard stopped the recovery" in t["payload"]["summary"]
                    ],
                    what="PagerDuty trigger for the block",
                )
                assert blocked[0]["payload"]["severity"] == "critical"
                assert env.triggers()[0]["payload"]["severity"] == "error", "first page was moderate"
                assert env.pd.rejected == []

                # The outage ends, then a second one: frozen, so no run until a human acknowledges.
                env.target.status["primary"] = 200
                await until(lambda: c.store.get_incident(inc.id).status == "resolved", what="resolved")
                env.target.status["primary"] = 503
                second = await until(lambda: c.store.open_incident_for("shop"), what="second incident")
                assert second.id != inc.id
                await until(
                    lambda: any(f"frozen since run {run.id}" in m for m in messages(c.store, second.id)),
                    what="frozen hold",
                )
                await asyncio.sleep(0.6)  # several more decision cycles
                assert len(c.store.runs()) == 1, "a frozen playbook must not run again"

                env.target.status["secondary"] = 200
                await until(lambda: c.detection.probe_healthy("secondary") is True, what="secondary up")
                assert len(c.store.runs()) == 1
                text = commands.ack(c.store, "shop", "tester")
                assert run.id in text
                c.kick()
                done = await until(lambda: runs_in(c.store, "succeeded"), what="run after ack")
                assert done[0].incident_id == second.id
                assert world.a_record() == [SWITCHED]
                assert c.store.get_flag("frozen:shop") is None
                with pytest.raises(commands.CommandError):
                    commands.ack(c.store, "shop", "tester")

    asyncio.run(main())


# ---------------------------------------------------------------- 2. replica lag above the RPO


def put_lag(world: World, seconds: float) -> None:
    aws_client("cloudwatch", world.moto_url).put_metric_data(
        Namespace="AWS/RDS",
        MetricData=[
            {
                "MetricName": "ReplicaLag",
                "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": world.replica_db}],
                # a minute old, as RDS publishes it (and moto compares whole seconds)
                "Timestamp": dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60),
                "Value": seconds,
                "Unit": "Seconds",
            }
        ],
    )


@pytest.mark.parametrize("lag, passes", [(120.0, False), (5.0, True)])
def test_replica_lag_from_cloudwatch_guards_the_promotion(
    tmp_path: Path, world: World, proxy: AwsProxy, lag: float, passes: bool
):
    """The limit is the service's RPO (30s), as the controller runs it: no `max` in the guard."""
    put_lag(world, lag)
    steps = f"""
      - name: promote
        action: aws.rds.promote_read_replica
        with: {{instance: "{world.replica_db}"}}
        retries: 0
        guards:
          - replica_lag: {{cloudwatch: {{dimensions: {{DBInstanceIdentifier: "{world.replica_db}"}}}}}}"""

    async def main() -> None:
        async with environment(tmp_path) as env:
            c = env.controller(world, proxy.url, steps=steps, rpo="30s")
            async with running(c):
                await until(lambda: c.detection.probe_healthy("primary") is True, what="primary up")
                env.target.status["primary"] = 503
                [run] = await until(lambda: runs_in(c.store, "blocked", "succeeded", "failed"), what="run")
                [step] = c.store.steps(run.id)
                guard_lines = [m for m in messages(c.store, run.incident_id) if m.startswith("guard before")]
                promotes = proxy.calls("PromoteReadReplica")
                lags = [
                    e.data["replica_lag_s"]
                    for e in c.store.timeline(run.incident_id)
                    if "replica_lag_s" in e.data
                ]
                assert lags == [lag], "the lag the guard read is on the timeline for the report's RPO line"
                if passes:
                    assert run.state == "succeeded", run.error
                    assert step.state == "done"
                    assert any("within the limit of 30" in m for m in guard_lines), guard_lines
                    assert len(promotes) == 1
                    assert promotes[0].params["DBInstanceIdentifier"] == world.replica_db
                else:
                    assert run.state == "blocked"
                    assert step.state == "blocked"
                    assert "OVER the limit of 30" in (step.detail or ""), step.detail
                    assert promotes == [], "no promotion while the replica is behind the RPO"
                    await until(lambda: c.store.get_flag("frozen:shop") == run.id, what="the freeze")
                reads = [r for r in proxy.calls() if b'"ReplicaLag"' in r.body]  # CloudWatch speaks JSON
                assert reads and world.replica_db.encode() in reads[0].body, "the guard read CloudWatch"

    asyncio.run(main())


@dataclass
class FakePrometheus:
    """A tiny server speaking Prometheus's /api/v1/query JSON."""

    value: float | None
    queries: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def query(request: web.Request) -> web.Response:
            self.queries.append(request.query.get("query", ""))
            result = [] if self.value is None else [{"metric": {}, "value": [time.time(), f"{self.value:g}"]}]
            return web.json_response(
                {"status": "success", "data": {"resultType": "vector", "result": result}}
            )

        application = web.Application()
        application.router.add_get("/api/v1/query", query)
        return application


@pytest.mark.parametrize("lag, passes", [(120.0, False), (5.0, True), (None, False)])
def test_replica_lag_from_prometheus_guards_the_promotion(
    h: Harness, world: World, proxy: AwsProxy, lag: float | None, passes: bool
):
    query = f'pg_replication_lag_seconds{{instance="{world.replica_db}"}}'

    async def main() -> RunResult:
        prom = FakePrometheus(lag)
        runner, port = await serve(prom.app(), "127.0.0.1", 0)
        try:
            pb = Playbook.model_validate(
                {
                    "steps": [
                        {
                            "name": "promote",
                            "action": "aws.rds.promote_read_replica",
                            "with": {"instance": world.replica_db},
                            "retries": 0,
                            "guards": [
                                {
                                    "replica_lag": {
                                        "prometheus": {"url": f"http://127.0.0.1:{port}", "query": query}
                                    }
                                }
                            ],
                        }
                    ]
                }
            )
            result = await h.arun(
                pb, {"incident_id": "INC-x", "service": "shop", "severity": "critical", "rpo_s": 30.0}
            )
        finally:
            await runner.cleanup()
        assert prom.queries == [query]
        return result

    result = asyncio.run(main())
    promotes = proxy.calls("PromoteReadReplica")
    [step] = h.store.steps(result.run_id)
    if passes:
        assert result.state == "succeeded" and step.state == "done"
        assert len(promotes) == 1
    else:
        assert result.state == "blocked" and step.state == "blocked"
        assert promotes == []
        expected = "OVER the limit of 30" if lag is not None else "returned no series"
        assert expected in (step.detail or ""), step.detail


# ---------------------------------------------------------------- 3. rollback


def rollback_playbook(world: World, target_instance: str, step2_retries: int = 0) -> Playbook:
    return Playbook.model_validate(
        {
            "on_failure": "rollback",
            "steps": [
                switch(world, [SWITCHED], rollback="switch-back", retries=2),
                {
                    "name": "move-writer",
                    "action": "aws.rds.failover_db_cluster",
                    "with": {
                        "cluster": world.cluster,
                        "target_instance": target_instance,
                        "wait_timeout": "5s",
                    },
                    "retries": step2_retries,
                },
                {"name": "never", "action": "wait", "with": {"duration": "10ms"}},
            ],
            "rollback_steps": [switch(world, [PRIMARY], name="switch-back")],
        }
    )


def test_permanent_failure_rolls_back_the_completed_steps(h: Harness, world: World, proxy: AwsProxy):
    result = h.run(rollback_playbook(world, f"{world.cluster}-nonexistent", step2_retries=2))
    assert result.state == "rolled_back" and result.rolled_back and not result.ok
    assert h.store.get_run(result.run_id).state == "rolled_back"
    assert world.a_record() == [PRIMARY], "the record is back at the primary"
    assert h.journal(result) == [
        ("switch-dns", "rolled_back"),
        ("move-writer", "failed"),
        ("never", "skipped"),
        ("rollback:switch-back", "done"),
    ]
    steps = h.store.steps(result.run_id)
    assert steps[1].attempts == 1, "a permanent failure is not retried"
    assert "is not a member of" in (steps[1].detail or "")
    assert "now 127.0.0.2 (was 127.0.0.3)" in (steps[3].detail or "")
    assert len(simple_changes(proxy, world)) == 2, "one change forward, one back"
    assert proxy.calls("FailoverDBCluster") == []
    assert world.cluster_writer() == world.writer
    assert any(m.startswith("rolling back step switch-dns with switch-back") for m in h.timeline)


def test_transient_route53_errors_are_retried_and_a_403_rolls_back(h: Harness, world: World, proxy: AwsProxy):
    proxy.fail(matcher(method="POST", path_contains="/rrset"), times=2, status=500, code="InternalError")
    proxy.fail(matcher(action="FailoverDBCluster"), times=5, status=403, code="AccessDenied")
    result = h.run(rollback_playbook(world, world.standby, step2_retries=3))
    assert result.state == "rolled_back", result.error
    steps = h.store.steps(result.run_id)
    assert (steps[0].state, steps[0].attempts) == ("rolled_back", 3)
    assert (steps[1].state, steps[1].attempts) == ("failed", 1)
    assert "AccessDenied" in (steps[1].detail or "")
    assert len(proxy.calls("FailoverDBCluster")) == 1, "a 403 is not retried"
    posts = rrset_posts(proxy)
    assert [r.status for r in posts] == [500, 500, 200, 200], "two injected 500s, the switch, the switch back"
    assert (steps[3].name, steps[3].state) == ("rollback:switch-back", "done")
    assert world.a_record() == [PRIMARY]
    assert world.cluster_writer() == world.writer


# ---------------------------------------------------------------- 4. parallel groups


def test_steps_of_a_group_run_in_parallel_and_the_next_step_waits_for_both(h: Harness):
    pb = Playbook.model_validate(
        {
            "steps": [
                {"name": "a", "action": "wait", "with": {"duration": "500ms"}, "group": "g"},
                {"name": "b", "action": "wait", "with": {"duration": "500ms"}, "group": "g"},
                {"name": "c", "action": "wait", "with": {"duration": "50ms"}},
            ]
        }
    )
    result = h.run(pb)
    assert result.ok, result.error
    a, b, c = h.store.steps(result.run_id)
    assert [s.state for s in (a, b, c)] == ["done", "done", "done"]
    assert b.started_at < a.ended_at and a.started_at < b.ended_at, "a and b overlap"
    assert c.started_at >= max(a.ended_at, b.ended_at), "c starts after both ended"
    assert result.duration < 0.95, f"two 500ms waits in parallel took {result.duration:.2f}s"


# ---------------------------------------------------------------- 5. approvals through the Controller

APPROVAL = """
    approval: manual
    escalate_after: 300ms
    approval_timeout: 1500ms"""


async def awaiting(c: Controller) -> Run:
    [run] = await until(lambda: runs_in(c.store, "awaiting_approval"), what="a run awaiting approval")
    return run


def test_approval_through_the_http_api(tmp_path: Path, world: World, proxy: AwsProxy, monkeypatch):
    monkeypatch.setenv("CONTINUITY_API_TOKEN", "s3cret-token")

    async def main() -> None:
        async with environment(tmp_path) as env:
            c = env.controller(world, proxy.url, steps=switch_yaml(world), playbook_extra=APPROVAL)
            runner, port = await serve(api_app(c), "127.0.0.1", 0)
            try:
                async with running(c), aiohttp.ClientSession() as http:
                    await until(lambda: c.detection.probe_healthy("primary") is True, what="primary up")
                    env.target.status["primary"] = 503
                    run = await awaiting(c)
                    assert world.a_record() == [PRIMARY], "nothing changes before approval"
                    url = f"http://127.0.0.1:{port}/runs/{run.id}/approve"
                    async with http.post(url, json={"by": "alice"}) as resp:
                        assert resp.status == 401
                    headers = {"Authorization": "Bearer wrong"}
                    async with http.post(url, json={"by": "alice"}, headers=headers) as resp:
                        assert resp.status == 401
                    assert c.store.get_run(run.id).state == "awaiting_approval"
                    headers = {"Authorization": "Bearer s3cret-token"}
                    async with http.post(url, json={"by": "alice"}, headers=headers) as resp:
                        assert resp.status == 200, await resp.text()
                    async with http.post(url, json={"by": "alice"}, headers=headers) as resp:
                        assert resp.status == 409, "a second answer is refused"
                    await until(lambda: c.store.get_run(run.id).state == "succeeded", what="approved run")
                    assert world.a_record() == [SWITCHED]
                    assert any("approved by alice" in m for m in messages(c.store, run.incident_id))
                    assert len(c.store.runs()) == 1
            finally:
                await runner.cleanup()

    asyncio.run(main())


def test_api_writes_are_refused_when_no_token_is_configured(tmp_path: Path, world: World, proxy, monkeypatch):
    monkeypatch.delenv("CONTINUITY_API_TOKEN", raising=False)

    async def main() -> None:
        async with environment(tmp_path) as env:
            c = env.controller(world, proxy.url, steps=switch_yaml(world), playbook_extra=APPROVAL)
            runner, port = await serve(api_app(c), "127.0.0.1", 0)
            try:
                async with aiohttp.ClientSession() as http:
                    for path in ("/runs/RUN-x/approve", "/pause", "/services/shop/ack"):
                        headers = {"Authorization": "Bearer anything"}
                        async with http.post(f"http://127.0.0.1:{port}{path}", headers=headers) as resp:
                            assert resp.status == 403, path
                            assert "CONTINUITY_API_TOKEN" in (await resp.json())["error"]
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        assert resp.status == 200, "reads stay open"
                assert c.store.get_flag("paused") is None
            finally:
                await runner.cleanup()
                c.store.close()

    asyncio.run(main())


def test_rejected_run_changes_nothing(tmp_path: Path, world: World, proxy: AwsProxy):
    async def main() -> None:
        async with environment(tmp_path) as env:
            c = env.controller(world, proxy.url, steps=switch_yaml(world), playbook_extra=APPROVAL)
            async with running(c):
                await until(lambda: c.detection.probe_healthy("primary") is True, what="primary up")
                env.target.status["primary"] = 503
                run = await awaiting(c)
                commands.reject(c.store, run.id, "bob", "the secondary is being patched")
                c.kick()
                await until(lambda: c.store.get_run(run.id).state == "rejected", what="rejected")
                await asyncio.sleep(0.5)
                assert c.store.get_run(run.id).state == "rejected"
                assert world.a_record() == [PRIMARY]
                assert rrset_posts(proxy) == []
                assert any(
                    "rejected by bob (the secondary is being patched); nothing was changed" in m
                    for m in messages(c.store, run.incident_id)
                )
                assert len(c.store.runs()) == 1

    asyncio.run(main())


def test_unanswered_approval_escalates_then_expires(tmp_path: Path, world: World, proxy: AwsProxy):
    async def main() -> None:
        async with environment(tmp_path) as env:
            c = env.controller(world, proxy.url, steps=switch_yaml(world), playbook_extra=APPROVAL)
            async with running(c):
                await until(lambda: c.detection.probe_healthy("primary") is True, what="primary up")
                env.target.status["primary"] = 503
                run = await awaiting(c)
                await until(lambda: c.store.get_run(run.id).state == "expired", timeout=5, what="expired")
                assert world.a_record() == [PRIMARY]
                assert rrset_posts(proxy) == []
                timeline = messages(c.store, run.incident_id)
                escalated = [i for i, m in enumerate(timeline) if "still unanswered" in m]
                expired = [i for i, m in enumerate(timeline) if f"run {run.id} expired" in m]
                assert escalated and expired and escalated[0] < expired[0], timeline
                summaries = await until(
                    lambda: [t["payload"]["summary"] for t in env.triggers()][3:] or None,
                    what="the expiry page",
                )
                summaries = [t["payload"]["summary"] for t in env.triggers()]
                asks = [i for i, s in enumerate(summaries) if "approval needed" in s]
                escalations = [i for i, s in enumerate(summaries) if "STILL waiting for approval" in s]
                expiries = [i for i, s in enumerate(summaries) if "approval for recover expired" in s]
                assert asks and escalations and expiries, summaries
                assert asks[0] < escalations[0] < expiries[0], summaries
                assert env.pd.rejected == []

    asyncio.run(main())


def test_auto_approve_critical_runs_without_waiting(tmp_path: Path, world: World, proxy: AwsProxy):
    async def main() -> None:
        async with environment(tmp_path) as env:
            extra = APPROVAL + "\n    auto_approve: [critical]"
            c = env.controller(world, proxy.url, steps=switch_yaml(world), playbook_extra=extra)
            async with running(c):
                await until(lambda: c.detection.probe_healthy("primary") is True, what="primary up")
                env.target.status["primary"] = 503
                # A run that waited for approval would end expired (approval_timeout 1.5s), never succeeded.
                [run] = await until(lambda: runs_in(c.store, "succeeded"), timeout=8.0, what="run")
                assert world.a_record() == [SWITCHED]
                timeline = messages(c.store, run.incident_id)
                assert not any("awaits approval" in m for m in timeline), timeline
                assert c.store.flags("approval:") == {}

    asyncio.run(main())


# ---------------------------------------------------------------- 6. kill -9 mid-step, then restart


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_9_during_a_step_then_restart_completes_the_run_exactly_once(
    tmp_path: Path, world: World, proxy: AwsProxy
):
    data_dir = tmp_path / "state"
    steps = f"""
      - name: switch-dns
        action: aws.route53.switch_record
        with: {{zone: "{world.zone}", record: "{world.zone}", type: A, values: ["{SWITCHED}"]}}
      - {{name: hold, action: wait, with: {{duration: 4s}}}}
      - name: weights
        action: aws.route53.set_weights
        with: {{zone: "{world.zone}", record: "{world.www}", weights: {{primary: 0, secondary: 100}}}}"""
    env_vars = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }

    async def main() -> None:
        async with environment(tmp_path) as env:
            env.target.status["primary"] = 503
            cfg = tmp_path / "continuity.yaml"
            cfg.write_text(
                env.config_text(
                    world, proxy.url, steps=steps, data_dir=data_dir, failure_threshold=2, pagerduty=False
                ),
                encoding="utf-8",
            )
            procs: list[subprocess.Popen[bytes]] = []

            def start(n: int) -> subprocess.Popen[bytes]:
                log = open(tmp_path / f"controller-{n}.log", "wb")
                cmd = [sys.executable, "-m", "controller.cli", "run", "-c", str(cfg)]
                cmd += ["--listen", f"127.0.0.1:{free_port()}", "--log-format", "json"]
                p = subprocess.Popen(cmd, env=env_vars, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                log.close()
                procs.append(p)
                return p

            store = SQLiteStore(data_dir)
            try:
                first = start(1)

                def hold_running() -> Run | None:
                    assert first.poll() is None, (tmp_path / "controller-1.log").read_text()
                    for run in store.runs():
                        if store.steps(run.id)[1].state == "running":
                            return run
                    return None

                run = await until(hold_running, timeout=20, what="step 2 running")
                os.kill(first.pid, signal.SIGKILL)
                assert first.wait(timeout=5) == -signal.SIGKILL
                assert [s.state for s in store.steps(run.id)] == ["done", "running", "pending"]
                assert store.get_run(run.id).state == "running"
                assert len(simple_changes(proxy, world)) == 1
                assert world.a_record() == [SWITCHED]

                second = start(2)

                def finished() -> bool:
                    assert second.poll() is None, (tmp_path / "controller-2.log").read_text()
                    return store.get_run(run.id).state not in ("running",)

                await until(finished, timeout=20, what="the resumed run to finish")
                assert store.get_run(run.id).state == "succeeded", store.get_run(run.id).error
                assert [s.state for s in store.steps(run.id)] == ["done", "done", "done"]
                assert len(simple_changes(proxy, world)) == 1, "step 1 was not applied again"
                assert world.weights() == {"primary": 0, "secondary": 100}
                assert world.a_record() == [SWITCHED]
                assert [r.id for r in store.runs() if r.incident_id == run.incident_id] == [run.id]
                timeline = messages(store, run.incident_id)
                assert any(m.startswith(f"resuming run {run.id}") for m in timeline), timeline
                assert any("step switch-dns already done in an earlier attempt" in m for m in timeline)
                await asyncio.sleep(0.5)
                assert len(store.runs()) == 1, "no second run for the same incident"
                second.send_signal(signal.SIGTERM)
                for _ in range(100):
                    if second.poll() is not None:
                        break
                    await asyncio.sleep(0.05)
                assert second.poll() == 0, "a clean stop on SIGTERM"
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait(timeout=5)
                store.close()

    asyncio.run(main())


# ---------------------------------------------------------------- 7. malformed playbooks


BASE = """
services:
  shop: {tier: critical, rto: 5m, probes: [web], playbook: P}
probes:
  web: {kind: http, url: "http://127.0.0.1:9/web"}
playbooks:
  P:
"""


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            "    steps:\n      - {name: s, action: dance}\n",
            "playbooks.P.steps[0].action: expected one of aws.elbv2.set_listener_weights, "
            "aws.rds.failover_db_cluster, ",
        ),
        (
            "    steps:\n      - {name: s, action: aws.route53.switch_record,\n"
            "         with: {zone: z., values: [1.2.3.4]}}\n",
            "playbooks.P.steps[0].with.record: expected a value (this field is required), found nothing",
        ),
        (
            "    steps:\n      - {name: s, action: wait, with: {duration: 1s}, rollback: nope}\n"
            "    rollback_steps:\n      - {name: undo, action: wait, with: {duration: 1s}}\n",
            "playbooks.P.steps[0].rollback: expected a step of rollback_steps (known: undo), found 'nope'",
        ),
        (
            "    steps:\n      - {name: s, action: wait, with: {duration: 1s}, rollback: nope}\n",
            "playbooks.P.steps[0].rollback: expected a step of rollback_steps (none are defined), "
            "found 'nope'",
        ),
        (
            "    steps:\n      - name: s\n        action: wait\n        with: {duration: 1s}\n"
            "        guards:\n          - probes_healthy: [web]\n"
            "            prometheus: {url: 'http://p:9090', query: up, lt: 1}\n",
            "playbooks.P.steps[0].guards[0]: expected exactly one of probes_healthy, replica_lag or "
            "prometheus per guard",
        ),
        (
            "    steps:\n      - {name: s, action: wait, with: {duration: 1s},\n"
            "         guards: [{probes_healthy: [ghost]}]}\n",
            "playbooks.P.steps[0].guards[0].probes_healthy: expected a defined probe, found 'ghost'",
        ),
    ],
    ids=[
        "unknown-action",
        "missing-parameter",
        "missing-rollback",
        "no-rollback-steps",
        "two-kinds",
        "ghost",
    ],
)
def test_malformed_playbooks_are_config_errors_with_the_exact_path(tmp_path: Path, body: str, expected: str):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + body, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert any(p.startswith(f"{path}: {expected}") for p in err.value.problems), err.value.problems
