"""Playbook actions and whole playbooks, through the real engine, store and boto3 -> proxy -> moto."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controller.aws import client_factory
from controller.config import Aws, Playbook
from controller.stores import SQLiteStore, StepRecord
from playbooks.engine import Engine, RunResult, make_context, render_plan
from tests.conftest import World
from tests.fakes.awsproxy import AwsProxy, matcher

SWITCHED = "127.0.0.3"


def playbook(*steps: dict[str, Any], cooldown: str = "30m") -> Playbook:
    return Playbook.model_validate({"steps": list(steps), "cooldown": cooldown})


def switch_step(world: World, **extra: Any) -> dict[str, Any]:
    return {
        "name": "switch-dns",
        "action": "aws.route53.switch_record",
        "with": {"zone": world.zone, "record": world.zone, "type": "A", "values": [SWITCHED]},
        **extra,
    }


def failover_step(world: World, cluster: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": "move-writer",
        "action": "aws.rds.failover_db_cluster",
        "with": {"cluster": cluster or world.cluster, "target_instance": world.standby},
        **extra,
    }


@dataclass
class Harness:
    """One engine with its own store; records what the context was told."""

    tmp: Path
    endpoint: str
    timeline: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    notes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = SQLiteStore(self.tmp)
        self.engine = Engine(self.store, backoff=0.01)
        self.aws = client_factory(Aws(region="eu-west-1", endpoint_url=self.endpoint, read_timeout="10s"))

    def run(
        self,
        pb: Playbook,
        *,
        dry_run: bool = False,
        probe_healthy: Any = None,
        variables: dict[str, Any] | None = None,
    ) -> RunResult:
        async def notify(summary: str, details: dict[str, Any]) -> None:
            self.notes.append((summary, details))

        ctx = make_context(
            self.aws,
            probe_healthy or (lambda name: True),
            record=lambda kind, msg, data: self.timeline.append((kind, msg, data)),
            notify=notify,
            variables=variables or {"incident_id": "INC-test", "service": "checkout", "severity": "critical"},
        )
        ctx.poll_interval = 0.05
        return asyncio.run(self.engine.run("test-pb", pb, ctx, dry_run=dry_run, service="checkout"))

    def steps(self, result: RunResult) -> list[StepRecord]:
        return self.store.steps(result.run_id)

    def messages(self) -> list[str]:
        return [m for _, m, _ in self.timeline]


@pytest.fixture
def h(tmp_path: Path, proxy: AwsProxy) -> Harness:
    harness = Harness(tmp_path, proxy.url)
    yield harness
    harness.store.close()


# ---------------------------------------------------------------- Route 53


def test_switch_record_changes_the_record_and_second_run_is_a_no_op(h: Harness, world: World, proxy):
    pb = playbook(switch_step(world))
    first = h.run(pb)
    assert first.ok, first.error
    assert world.a_record() == [SWITCHED]
    [step] = h.steps(first)
    assert step.state == "done" and step.attempts == 1
    assert "now 127.0.0.3 (was 127.0.0.2)" in step.detail
    changes = lambda: [r for r in proxy.calls() if r.method == "POST" and "/rrset" in r.path]  # noqa: E731
    assert len(changes()) == 1

    second = h.run(pb)
    assert second.ok
    [step] = h.steps(second)
    assert step.state == "done"
    assert "already in place" in step.detail
    assert len(changes()) == 1, "the second run must not send another change"
    assert world.a_record() == [SWITCHED]


def test_switch_record_keeps_the_ttl(h: Harness, world: World):
    assert h.run(playbook(switch_step(world))).ok
    sets = world.r53().list_resource_record_sets(
        HostedZoneId=world.zone_id, StartRecordName=world.zone, StartRecordType="A"
    )["ResourceRecordSets"]
    assert next(r for r in sets if r["Name"] == world.zone and r["Type"] == "A")["TTL"] == 60


def test_set_weights_shifts_traffic(h: Harness, world: World):
    assert world.weights() == {"primary": 100, "secondary": 0}
    step = {
        "name": "shift",
        "action": "aws.route53.set_weights",
        "with": {"zone": world.zone_id, "record": world.www, "weights": {"primary": 0, "secondary": 100}},
    }
    result = h.run(playbook(step))
    assert result.ok, result.error
    assert world.weights() == {"primary": 0, "secondary": 100}
    assert "primary=0, secondary=100 (was primary=100, secondary=0)" in h.steps(result)[0].detail


# ---------------------------------------------------------------- RDS


def test_failover_db_cluster_moves_the_writer(h: Harness, world: World):
    assert world.cluster_writer() == world.writer
    result = h.run(playbook(failover_step(world)))
    assert result.ok, result.error
    assert world.cluster_writer() == world.standby
    assert f"moved {world.writer} -> {world.standby}" in h.steps(result)[0].detail


def test_promote_read_replica_sends_the_request(h: Harness, world: World, proxy: AwsProxy):
    step = {
        "name": "promote",
        "action": "aws.rds.promote_read_replica",
        "with": {"instance": world.replica_db, "backup_retention_period": 7},
    }
    result = h.run(playbook(step))
    assert result.ok, result.error
    [call] = proxy.calls("PromoteReadReplica")
    assert call.params["DBInstanceIdentifier"] == world.replica_db
    assert call.params["BackupRetentionPeriod"] == "7"
    assert call.status == 200
    assert f"replica of {world.source_db}" in h.steps(result)[0].detail


# ---------------------------------------------------------------- dry run and plans


def test_dry_run_changes_nothing_and_journals_the_calls(h: Harness, world: World, proxy: AwsProxy):
    pb = playbook(switch_step(world), failover_step(world))
    result = h.run(pb, dry_run=True)
    assert result.ok
    assert world.a_record() == ["127.0.0.2"]
    assert world.cluster_writer() == world.writer
    assert proxy.calls() == [], "a dry run must not call AWS at all"
    dns, db = h.steps(result)
    assert dns.state == db.state == "skipped"
    assert dns.detail.startswith("dry run: would call ")
    assert "route53.list_hosted_zones_by_name" in dns.detail
    assert "route53.change_resource_record_sets" in dns.detail
    assert '"Value": "127.0.0.3"' in dns.detail
    assert "route53.get_change" in dns.detail
    assert (
        f'rds.failover_db_cluster({{"DBClusterIdentifier": "{world.cluster}", '
        f'"TargetDBInstanceIdentifier": "{world.standby}"}})' in db.detail
    )
    run = h.store.runs()[0]
    assert run.dry_run and run.state == "succeeded"


def test_render_plan_shows_every_call(world: World):
    pb = playbook(
        switch_step(world, timeout="45s", retries=4),
        failover_step(world),
        {"name": "tell", "action": "notify", "with": {"message": "moved {{ service }}"}},
    )
    text = render_plan("region-failover", pb)
    lines = text.splitlines()
    assert lines[0] == "playbook region-failover: 3 step(s), cooldown 30m00s, approval auto"
    assert "1. switch-dns (aws.route53.switch_record)  timeout 45.0s, retries 4" in text
    for call in (
        "route53.list_hosted_zones_by_name(",
        "route53.list_resource_record_sets(",
        "route53.change_resource_record_sets(",
        "route53.get_change(",
        "rds.describe_db_clusters(",
        "rds.failover_db_cluster(",
        "notifiers.send(",
    ):
        assert call in text, call
    assert text.count("rds.describe_db_clusters(") == 2


# ---------------------------------------------------------------- retries and failures


def test_throttling_is_retried_and_recorded(h: Harness, world: World, proxy: AwsProxy):
    proxy.throttle(matcher(method="POST", path_contains="/rrset"), times=2)
    result = h.run(playbook(switch_step(world, retries=3)))
    assert result.ok, result.error
    [step] = h.steps(result)
    assert step.state == "done" and step.attempts == 3
    posts = [r for r in proxy.calls() if r.method == "POST" and "/rrset" in r.path]
    assert [r.status for r in posts] == [400, 400, 200]
    retried = [m for m in h.messages() if "failed: ChangeResourceRecordSets: Throttling" in m]
    assert len(retried) == 2 and "attempt 1 failed" in retried[0] and "retrying" in retried[0]
    assert world.a_record() == [SWITCHED]


def test_server_errors_are_retried(h: Harness, world: World, proxy: AwsProxy):
    proxy.fail(matcher(action="FailoverDBCluster"), times=2, status=500, code="InternalFailure", sender=False)
    result = h.run(playbook(failover_step(world, retries=2)))
    assert result.ok, result.error
    assert h.steps(result)[0].attempts == 3
    assert [r.status for r in proxy.calls("FailoverDBCluster")] == [500, 500, 200]
    assert sum("FailoverDBCluster: InternalFailure" in m for m in h.messages()) == 2
    assert world.cluster_writer() == world.standby


def test_access_denied_is_not_retried_and_later_steps_are_skipped(h: Harness, world: World, proxy: AwsProxy):
    proxy.fail(matcher(action="FailoverDBCluster"), times=5, status=403, code="AccessDenied", message="nope")
    pb = playbook(
        failover_step(world, retries=3),
        switch_step(world),
        {"name": "tell", "action": "notify", "with": {"message": "done"}},
    )
    result = h.run(pb)
    assert not result.ok
    assert result.error.startswith("step move-writer failed: ")
    assert "AccessDenied" in result.error
    assert len(proxy.calls("FailoverDBCluster")) == 1, "a 403 must not be retried"
    states = [(s.name, s.state, s.attempts) for s in h.steps(result)]
    assert states == [("move-writer", "failed", 1), ("switch-dns", "skipped", 0), ("tell", "skipped", 0)]
    assert world.a_record() == ["127.0.0.2"], "a later step must not run after a failure"
    assert h.notes == []
    assert h.store.runs()[0].state == "failed"


def test_nonexistent_cluster_fails_at_once(h: Harness, world: World, proxy: AwsProxy):
    result = h.run(playbook(failover_step(world, cluster="no-such-cluster", retries=3), switch_step(world)))
    assert not result.ok
    assert "move-writer" in result.error and "no DB cluster named no-such-cluster" in result.error
    assert h.steps(result)[0].attempts == 1
    assert h.steps(result)[1].state == "skipped"
    assert len(proxy.calls("DescribeDBClusters")) == 1


def test_step_timeout_is_a_failure_after_retries(h: Harness, world: World, proxy: AwsProxy):
    proxy.delay(matcher(action="DescribeDBClusters"), seconds=1.0, times=2)
    t0 = time.monotonic()
    result = h.run(playbook(failover_step(world, timeout="300ms", retries=1)))
    assert not result.ok
    [step] = h.steps(result)
    assert step.state == "failed" and step.attempts == 2
    assert step.detail == "timed out (after 2 attempts)"
    assert "timed out" in result.error
    assert time.monotonic() - t0 < 5
    assert any("attempt 1 failed: timed out" in m for m in h.messages())


# ---------------------------------------------------------------- flow actions


def test_wait_healthy_succeeds_when_probe_comes_up(h: Harness):
    up_at = time.monotonic() + 0.3
    result = h.run(
        playbook({"name": "w", "action": "wait_healthy", "with": {"probes": ["db-probe"], "within": "5s"}}),
        probe_healthy=lambda name: name == "db-probe" and time.monotonic() >= up_at,
    )
    assert result.ok, result.error
    assert time.monotonic() >= up_at
    assert h.steps(result)[0].detail.startswith("db-probe up after")


def test_wait_healthy_names_the_probe_that_never_came_up(h: Harness):
    pb = playbook(
        {
            "name": "wait",
            "action": "wait_healthy",
            "with": {"probes": ["ok-probe", "stuck-probe"], "within": "300ms"},
            "retries": 2,
        }
    )
    result = h.run(pb, probe_healthy=lambda name: name == "ok-probe")
    assert not result.ok
    assert "still not up after 300ms: stuck-probe" in result.error
    assert "ok-probe" not in result.error.split(":")[-1]
    assert h.steps(result)[0].attempts == 1, "a missed deadline is final"


def test_notify_renders_its_template_from_variables(h: Harness):
    pb = playbook(
        {
            "name": "tell",
            "action": "notify",
            "with": {
                "message": "{{ service }} moved for {{ incident_id }} ({{ severity }})",
                "details": {"a": 1},
            },
        }
    )
    result = h.run(pb, variables={"incident_id": "INC-42", "service": "checkout", "severity": "critical"})
    assert result.ok, result.error
    assert h.notes == [("checkout moved for INC-42 (critical)", {"a": 1})]
    assert h.steps(result)[0].detail == "queued: checkout moved for INC-42 (critical)"


def test_notify_with_an_unknown_variable_fails_without_retry(h: Harness):
    pb = playbook({"name": "tell", "action": "notify", "with": {"message": "hi {{ nobody }}"}, "retries": 3})
    result = h.run(pb)
    assert not result.ok
    assert "message template" in result.error and "nobody" in result.error
    assert h.steps(result)[0].attempts == 1
    assert h.notes == []
