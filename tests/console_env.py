"""A controller with an open incident, a run awaiting approval and a Slack and PagerDuty receiver,
in simulated time: what the console, the Slack buttons and the PagerDuty webhook act on.

Probe verdicts are fed by hand and the loop is driven by `cycle`, as in tests/comms_env.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.config import load_config
from controller.demo.pagerduty import PagerDutyReceiver
from controller.loop import Controller
from controller.notify.receivers import SlackReceiver, serve
from controller.stores import Incident, Run, SQLiteStore
from probes.base import ProbeResult
from tests.comms_env import PD_KEY, FakeClock, cycle

TOKEN = "console-test-api-token-0123456789"
EVIL = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">'


@dataclass
class World:
    ctrl: Controller
    clock: FakeClock
    pd: PagerDutyReceiver
    slack: SlackReceiver
    urls: dict[str, str]
    incident: Incident
    run: Run


def config_text(tmp: Path, pd_url: str, extra: str = "") -> str:
    return f"""
services:
  checkout:
    tier: critical
    rto: 15m
    rpo: 30s
    owners: [payments-oncall]
    display_name: Checkout
    probes: [checkout-api]
    playbook: region-failover
    roles: {{incident_commander: alice, communications_lead: carol}}
  catalog:
    tier: important
    rto: 30m
    probes: [catalog-api]
    playbook: dns-failover
  search:
    tier: supporting
    rto: 2h
    probes: [search-api]
probes:
  checkout-api: {{kind: http, url: "http://127.0.0.1:9/checkout", interval: 10s, timeout: 1s}}
  catalog-api: {{kind: http, url: "http://127.0.0.1:9/catalog", interval: 10s, timeout: 1s}}
  search-api: {{kind: http, url: "http://127.0.0.1:9/search", interval: 10s, timeout: 1s}}
  checkout-secondary: {{kind: http, url: "http://127.0.0.1:9/secondary", interval: 10s, timeout: 1s}}
detection: {{failure_threshold: 2, success_threshold: 1, confirm: {{probes: 0}}}}
playbooks:
  region-failover:
    description: Move checkout from eu-west-1 to eu-central-1.
    approval: manual
    steps:
      - name: drain-primary
        action: wait
        with: {{duration: 50ms}}
        guards: [{{probes_healthy: [checkout-secondary]}}]
      - {{name: move-traffic, action: wait, with: {{duration: 50ms}}}}
      - name: tell-the-team
        action: notify
        with: {{message: "Checkout moved to eu-central-1 for {{{{ incident_id }}}}"}}
  dns-failover:
    approval: manual
    steps:
      - name: move-database-writer
        action: aws.rds.failover_db_cluster
        with: {{cluster: marketplace-db, target_instance: marketplace-db-euc1}}
        guards:
          - {{replica_lag: {{cloudwatch: {{dimensions: {{DBInstanceIdentifier: marketplace-db-euc1}}}}}}}}
      - name: switch-dns
        action: aws.route53.switch_record
        with: {{zone: shop.example., record: shop.example., type: A, values: [203.0.113.20]}}
        guards: [{{probes_healthy: [checkout-secondary]}}]
notifiers:
  pagerduty:
    routing_key_env: UNUSED_PD
    events_url: "{pd_url}/v2/enqueue"
  slack: {{webhook_url_env: CONSOLE_SLACK_URL}}
aws: {{endpoint_url: "http://127.0.0.1:9", connect_timeout: 1s, read_timeout: 1s}}
controller:
  data_dir: "{tmp / "state"}"
  outbox_retry: 5s
  api_token_env: CONSOLE_TEST_TOKEN
leader: {{backend: none}}
console: {{refresh: 200ms}}
{extra}
"""


def feed(
    ctrl: Controller, probe: str, ok: bool, clock: FakeClock, error: str = "HTTP 503", n: int = 2
) -> None:
    for _ in range(n):
        ctrl.detection.ingest(ProbeResult(probe, ok, clock(), 0.01, error="" if ok else error))
        clock.advance(10)


def _write(tmp: Path, text: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "continuity.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def world(tmp: Path, monkeypatch: pytest.MonkeyPatch, extra: str = "") -> AsyncIterator[World]:
    """Checkout down, its incident open and paged, its manual failover awaiting approval."""
    monkeypatch.setenv("CONSOLE_TEST_TOKEN", TOKEN)
    pd, slack = PagerDutyReceiver(), SlackReceiver()
    async with contextlib.AsyncExitStack() as stack:
        urls = {
            "pd": await stack.enter_async_context(serve(pd.app())),
            "slack": await stack.enter_async_context(serve(slack.app())),
        }
        monkeypatch.setenv("CONSOLE_SLACK_URL", f"{urls['slack']}/services/T000/B000/XXXX")
        path = _write(tmp, config_text(tmp, urls["pd"], extra))
        cfg = load_config(path)
        clock = FakeClock()
        ctrl = Controller(cfg, SQLiteStore(cfg.controller.data_dir), clock=clock, env=lambda _: PD_KEY)
        for probe in ("catalog-api", "search-api", "checkout-secondary"):
            feed(ctrl, probe, True, clock, n=1)
        feed(ctrl, "checkout-api", False, clock)
        await cycle(ctrl)
        [incident] = ctrl.store.list_incidents(status="open")
        [run] = [r for r in ctrl.store.runs() if r.state == "awaiting_approval"]
        try:
            yield World(ctrl, clock, pd, slack, urls, incident, run)
        finally:
            ctrl.store.close()
