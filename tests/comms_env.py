"""A controller with every channel wired to a local validating receiver, in simulated time.

Probe results are fed with `ingest` at the fake clock's time and the loop is driven by hand
(`reconcile`, `drain`), so a 30-minute cadence is checked in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.config import Config, load_config
from controller.demo.pagerduty import PagerDutyReceiver
from controller.loop import Controller
from controller.notify.receivers import (
    SlackReceiver,
    StatuspageReceiver,
    TeamsReceiver,
    WebhookReceiver,
    serve,
)
from controller.stores import SQLiteStore
from probes.base import ProbeResult
from tests.fakes.smtp import Recorder, self_signed, smtp_server

PD_KEY = "comms0test0routing0key0000000000"  # 32 characters
SECRET = "whsec-comms-test"
SP_KEY = "sp-api-key"


class FakeClock:
    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Receivers:
    pd: PagerDutyReceiver
    slack: SlackReceiver
    teams: TeamsReceiver
    webhook: WebhookReceiver
    statuspage: StatuspageReceiver
    smtp: Recorder
    urls: dict[str, str]
    smtp_port: int
    cert: Path


@contextlib.asynccontextmanager
async def receivers(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receivers]:
    pd, sl, tm = PagerDutyReceiver(), SlackReceiver(), TeamsReceiver()
    wh, sp, rec = WebhookReceiver(SECRET), StatuspageReceiver("page1", SP_KEY), Recorder()
    cert, key = self_signed(tmp)
    async with contextlib.AsyncExitStack() as stack:
        urls = {
            name: await stack.enter_async_context(serve(r.app()))
            for name, r in (("pd", pd), ("slack", sl), ("teams", tm), ("webhook", wh), ("statuspage", sp))
        }
        port = await stack.enter_async_context(smtp_server(rec, cert, key))
        monkeypatch.setenv("COMMS_SLACK_URL", f"{urls['slack']}/services/T000/B000/XXXX")
        monkeypatch.setenv("COMMS_TEAMS_URL", f"{urls['teams']}/workflows/flow1")
        monkeypatch.setenv("COMMS_HOOK_SECRET", SECRET)
        monkeypatch.setenv("COMMS_SP_KEY", SP_KEY)
        yield Receivers(pd, sl, tm, wh, sp, rec, urls, port, cert)


def write_config(tmp: Path, r: Receivers, extra: str = "") -> Path:
    text = f"""
services:
  checkout:
    tier: critical
    rto: 15m
    rpo: 30s
    owners: [payments-oncall]
    display_name: Checkout
    impact: Customers cannot pay for their orders.
    workaround: Carts are kept; try again in a few minutes.
    probes: [checkout-api]
    playbook: recover
    roles:
      incident_commander: alice
      communications_lead: carol
      technical_owners: [payments-oncall]
      escalation: [bob, dave]
probes:
  checkout-api: {{kind: http, url: "http://127.0.0.1:9/health", interval: 10s, timeout: 1s}}
# The burst is detection's business (tests/test_detection_trust.py); these tests drive verdicts by hand.
detection: {{failure_threshold: 2, success_threshold: 1, confirm: {{probes: 0}}}}
playbooks:
  recover:
    steps:
      - {{name: drain, action: wait, with: {{duration: 50ms}}, timeout: 4m}}
      - {{name: switch, action: wait, with: {{duration: 50ms}}, timeout: 3m}}
notifiers:
  pagerduty:
    routing_key_env: UNUSED_PD
    events_url: "{r.urls["pd"]}/v2/enqueue"
  slack: {{webhook_url_env: COMMS_SLACK_URL}}
  teams: {{webhook_url_env: COMMS_TEAMS_URL}}
  webhook: {{url: "{r.urls["webhook"]}/hook", secret_env: COMMS_HOOK_SECRET}}
  statuspage:
    page_id: page1
    api_key_env: COMMS_SP_KEY
    base_url: "{r.urls["statuspage"]}/v1"
    components: {{checkout: comp-checkout}}
  email:
    host: 127.0.0.1
    port: {r.smtp_port}
    from: status@shop.example
    ca_file: "{r.cert}"
    to:
      customers: [customers@shop.example]
      internal: [sre@shop.example]
      executives: [cto@shop.example]
controller:
  data_dir: "{tmp / "state"}"
  outbox_retry: 5s
leader: {{backend: none}}
{extra}
"""
    path = tmp / "continuity.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def controller(cfg: Config, clock: FakeClock, store: SQLiteStore | None = None) -> Controller:
    return Controller(cfg, store or SQLiteStore(cfg.controller.data_dir), clock=clock, env=lambda _: PD_KEY)


def feed(ctrl: Controller, ok: bool, clock: FakeClock, n: int = 2) -> None:
    for _ in range(n):
        ctrl.detection.ingest(ProbeResult("checkout-api", ok, clock(), 0.01, error="" if ok else "HTTP 503"))
        clock.advance(10)


async def cycle(ctrl: Controller) -> None:
    """One reconcile, let any playbook it launched finish, then deliver what is due."""
    await ctrl.reconcile()
    running = [t for t in ctrl.runs.running.values() if not t.done()]
    if running:
        await asyncio.gather(*running)
    await ctrl.dispatcher.drain()


def load(path: Path) -> Config:
    return load_config(path)


def slack_heads(r: Receivers) -> list[str]:
    return [m["blocks"][0]["text"]["text"] for m in r.slack.accepted]


def pd_actions(r: Receivers) -> list[tuple[str, Any]]:
    return [(e["event_action"], e["dedup_key"]) for e in r.pd.events]
