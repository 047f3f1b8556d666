"""A config reload rebuilds everything derived from the config: notifier channels, the AWS client
factory and the probe schedule. A notifier added by reload delivers its messages (before, a page was
queued for a channel the dispatcher never had, and sat in the outbox forever).

In process, real parts: a local HTTP target, the validating PagerDuty and Slack receivers on
loopback, the SQLite store; the controller's own loop and dispatcher do the sending."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.aws import client_factory
from controller.config import Config, load_config
from controller.demo.pagerduty import PagerDutyReceiver
from controller.loop import Controller
from controller.metrics import Metrics
from controller.notify.receivers import SlackReceiver, serve
from controller.stores import SQLiteStore
from tests.test_cluster import Target

PD_KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


def write_config(path: Path, target: Target, notifiers: str = "", aws: str = "http://127.0.0.1:9") -> Config:
    path.write_text(
        f"""
services:
  shop: {{tier: critical, rto: 5m, probes: [web]}}
probes:
  web: {{kind: http, url: "http://127.0.0.1:{target.port}/web", interval: 100ms, timeout: 1s}}
detection: {{failure_threshold: 2, success_threshold: 1, confirm: {{probes: 1, spacing: 50ms}}}}
aws: {{region: eu-west-1, endpoint_url: "{aws}"}}
controller: {{data_dir: "{path.parent / "state"}", tick: 100ms, outbox_retry: 200ms}}
leader: {{backend: none}}
{notifiers}
""",
        encoding="utf-8",
    )
    return load_config(path)


async def eventually(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


def test_a_notifier_added_by_reload_delivers_and_aws_clients_follow_the_new_config(
    tmp_path: Path, target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    pd = PagerDutyReceiver()
    slack = SlackReceiver(token="T1/B2/reload")
    monkeypatch.setenv("PD_ROUTING_KEY", PD_KEY)
    cfg_path = tmp_path / "continuity.yaml"

    async def scenario() -> None:
        async with serve(pd.app()) as pd_base, serve(slack.app()) as slack_base:
            monkeypatch.setenv("SLACK_URL", f"{slack_base}/services/T1/B2/reload")
            first = write_config(cfg_path, target)
            store = SQLiteStore(first.controller.data_dir)
            controller = Controller(first, store, metrics=Metrics())
            await controller.start()
            try:
                assert set(controller.dispatcher.channels) == set()
                old_aws = controller.aws
                notifiers = f"""
notifiers:
  pagerduty: {{routing_key_env: PD_ROUTING_KEY, events_url: "{pd_base}/v2/enqueue"}}
  slack: {{webhook_url_env: SLACK_URL}}
"""
                second = write_config(cfg_path, target, notifiers, aws="http://127.0.0.1:4567")
                await controller.reload(second)
                assert set(controller.dispatcher.channels) == {"pagerduty", "slack"}
                assert controller.aws is not old_aws
                assert controller.aws("route53").meta.endpoint_url == "http://127.0.0.1:4567"

                target.status["web"] = 503
                inc = await eventually(lambda: store.open_incident_for("shop"), 10, "an incident")
                await eventually(
                    lambda: [e for e in pd.events if e.get("dedup_key") == inc.dedup_key], 10, "the page"
                )
                await eventually(lambda: slack.accepted, 10, "the Slack message")
                assert pd.rejected == [] and slack.rejected == []
                assert [m for m in store.outbox() if not m.dead and m.channel == "pagerduty"] == []

                # Removing a channel by reload stops it; re-adding it later brings it back.
                third = write_config(
                    cfg_path, target, notifiers.replace("  slack: {webhook_url_env: SLACK_URL}\n", "")
                )
                await controller.reload(third)
                assert set(controller.dispatcher.channels) == {"pagerduty"}
            finally:
                await controller.stop()
                store.close()

    asyncio.run(scenario())


def test_a_reload_that_names_a_missing_secret_is_refused_before_anything_changes(
    tmp_path: Path, target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PD_MISSING", raising=False)
    cfg_path = tmp_path / "continuity.yaml"

    async def scenario() -> None:
        first = write_config(cfg_path, target)
        store = SQLiteStore(first.controller.data_dir)
        controller = Controller(first, store, metrics=Metrics())
        await controller.start()
        try:
            bad = write_config(
                cfg_path, target, "notifiers:\n  pagerduty: {routing_key_env: PD_MISSING}\n", aws="http://x:1"
            )
            with pytest.raises(Exception, match="PD_MISSING"):
                await controller.reload(bad)
            assert controller.config is first
            assert set(controller.dispatcher.channels) == set()
            assert controller.scheduler is not None and not controller._probe_stop.is_set()
        finally:
            await controller.stop()
            store.close()

    asyncio.run(scenario())


def test_the_aws_clients_a_playbook_needs_are_built_at_start_and_reload_not_mid_failover(
    tmp_path: Path, target: Target
) -> None:
    """Loading botocore's service models costs a fraction of a second a client: the controller pays
    it when it starts, so the first failover does not (bench/failover_e2e.py: AWS steps p95 1.00 s
    before, 0.25 s after). Real clients from the real factory; no AWS call is made."""
    path = tmp_path / "continuity.yaml"
    path.write_text(
        f"""
services:
  shop: {{tier: critical, rto: 5m, probes: [web], playbook: move}}
probes:
  web: {{kind: http, url: "http://127.0.0.1:{target.port}/web", interval: 100ms, timeout: 1s}}
playbooks:
  move:
    steps:
      - name: db
        action: aws.rds.failover_db_cluster
        with: {{cluster: c, target_instance: i}}
        timeout: 60s
      - name: dns
        action: aws.route53.switch_record
        with: {{zone: z., record: r.z., type: A, values: [1.2.3.4]}}
        timeout: 60s
aws: {{region: eu-west-1, endpoint_url: "http://127.0.0.1:9"}}
controller: {{data_dir: "{tmp_path / "state"}", tick: 100ms}}
leader: {{backend: none}}
""",
        encoding="utf-8",
    )
    cfg = load_config(path)
    built: list[str] = []
    real = client_factory(cfg.aws)

    def factory(service: str) -> Any:
        built.append(service)
        return real(service)

    async def main() -> None:
        store = SQLiteStore(tmp_path / "state")
        controller = Controller(cfg, store, metrics=Metrics(), aws=factory)
        await controller.start()
        try:
            await eventually(lambda: len(built) == 2, 10, "the playbook's AWS clients")
            assert sorted(built) == ["rds", "route53"]
            assert store.runs() == []  # built before any run, not by one
            assert type(real("rds")).__name__ == "RDS"  # a real boto3 client, cached by the factory
            # A reload whose playbook calls a service the old one did not: its client is built at the
            # reload (the factory hands back the ones it already has for the others).
            path.write_text(
                path.read_text(encoding="utf-8").replace(
                    "aws:",
                    "      - name: alb\n"
                    "        action: aws.elbv2.set_listener_weights\n"
                    "        with: {listener_arn: arn:l, weights: {blue: 0, green: 100}}\n"
                    "        timeout: 60s\n"
                    "aws:",
                ),
                encoding="utf-8",
            )
            await controller.reload(load_config(path))
            await eventually(lambda: len(built) == 5, 10, "the reloaded playbook's AWS clients")
            assert sorted(built) == ["elbv2", "rds", "rds", "route53", "route53"]
            assert store.runs() == []
        finally:
            await controller.stop()
            store.close()

    asyncio.run(main())


def test_the_http_probes_plans_are_built_at_start_and_reload_not_by_their_first_run(tmp_path: Path) -> None:
    """Each http probe's request plan (URL parsed, address checked, request bytes) is built in a
    worker thread when the controller starts and after a reload, so the first interval's runs do
    not pay it one by one (probes/runner.prepare; 0.56 s of CPU at 20,000 probes). The probes'
    interval is ten minutes: at most one of them has run when the plans are there."""
    from probes import runner

    probe = '{{kind: http, url: "http://127.0.0.1:9/{}", interval: 10m, timeout: 2s}}'
    body = "services:\n  shop: {tier: critical, rto: 5m, probes: [p0]}\nprobes:\n"
    body += "\n".join(f"  p{i}: " + probe.format(i) for i in range(50))
    path = tmp_path / "continuity.yaml"
    tail = f'\ncontroller: {{data_dir: "{tmp_path / "state"}", tick: 100ms}}\nleader: {{backend: none}}\n'
    path.write_text(body + tail, encoding="utf-8")
    cfg = load_config(path)

    def planned(c: Config) -> int:
        return sum(1 for p in c.probes.values() if runner._PLANS.get(id(p), (None,))[0] is p)

    async def main() -> None:
        store = SQLiteStore(tmp_path / "state")
        controller = Controller(cfg, store, metrics=Metrics())
        await controller.start()
        try:
            await eventually(lambda: planned(cfg) == 50, 10, "the plans built at start")
            path.write_text(
                body.replace("127.0.0.1:9/", "127.0.0.1:9/x") + "\n  q: " + probe.format("y") + tail
            )
            new = load_config(path)
            assert planned(new) == 0
            await controller.reload(new)
            await eventually(lambda: planned(new) == 51, 10, "the plans built at the reload")
            # Built without the runs: offsets spread the probes over the ten minutes, so at most the
            # first slot's probe has run yet.
            assert controller.scheduler.started <= 1
        finally:
            await controller.stop()
            store.close()

    asyncio.run(main())
