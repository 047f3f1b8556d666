"""`continuity plan`: rendered from the loaded config, so it changes when the config does."""

from __future__ import annotations

import json
import time
from pathlib import Path

from controller.cli import main
from controller.config import load_config
from controller.plan import render
from controller.stores import SQLiteStore

CONFIG = """
services:
  checkout:
    description: Shoppers pay for their carts.
    tier: critical
    rto: 5m
    rpo: 30s
    owners: [payments-oncall]
    probes: [journey]
    playbook: failover
    roles:
      incident_commander: alice
      communications_lead: bob
      technical_owners: [payments-oncall, dba-oncall]
      escalation: [carol, head-of-engineering]
  search:
    tier: supporting
    rto: 2h
    owners: [search-team]
    probes: [search]
probes:
  journey: {kind: http, url: "http://127.0.0.1:9/pay", interval: 10s, timeout: 3s}
  search: {kind: http, url: "http://127.0.0.1:9/search", interval: 30s, timeout: 3s}
playbooks:
  failover:
    cooldown: 30m
    steps:
      - {name: hold, action: wait, with: {duration: 10s}, timeout: 20s, retries: 0}
risks:
  region-outage:
    description: The primary region is lost.
    likelihood: unlikely
    impact: severe
    services: [checkout]
    drill: region-lost
    mitigation: Fail over to the second region.
    owner: cto
drills: {max_age: 30d}
controller: {data_dir: "DATA"}
"""


def write(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "continuity.yaml"
    path.write_text(text.replace("DATA", str(tmp_path / "state")), encoding="utf-8")
    return path


def test_the_plan_holds_the_config_and_changes_with_it(tmp_path: Path):
    text = "\n".join(render(load_config(write(tmp_path)), None).md)
    assert (
        "| checkout | Shoppers pay for their carts. | critical | 5m00s | 30.0s | payments-oncall | failover |"
        in text
    )
    assert "| search |" in text and "2h00m" in text
    assert "| checkout | alice | bob | payments-oncall, dba-oncall | carol -> head-of-engineering |" in text
    assert "| search | search-team | UNASSIGNED | search-team | - |" in text  # the runtime's fallbacks
    assert "| region-outage | The primary region is lost. | unlikely | severe |" in text
    assert "region-lost: never rehearsed" in text
    assert "| failover | hold | wait | 20.0s | 0 | 20.0s |" in text
    for phase in (
        "Immediate response",
        "Technical recovery",
        "Business continuity",
        "Full recovery",
        "Post-recovery",
    ):
        assert phase in text
    assert "| critical | 30m00s |" in text

    changed = CONFIG.replace("rto: 5m", "rto: 1m").replace(
        "incident_commander: alice", "incident_commander: dave"
    )
    changed += """  stock:
    description: The warehouse system is lost.
    likelihood: possible
    impact: major
    drill: database-lost
"""
    changed = changed.replace('drills: {max_age: 30d}\ncontroller: {data_dir: "DATA"}\n', "")
    changed += 'drills: {max_age: 30d}\ncontroller: {data_dir: "DATA"}\n'
    text2 = "\n".join(render(load_config(write(tmp_path, changed)), None).md)
    assert "| checkout | Shoppers pay for their carts. | critical | 1m00s |" in text2
    assert "| checkout | dave | bob |" in text2
    assert "| stock | The warehouse system is lost. | possible | major |" in text2
    assert text2 != text


def test_stale_and_missing_drills_are_flagged(tmp_path: Path):
    cfg = load_config(write(tmp_path))
    store = SQLiteStore(tmp_path / "state")
    now = time.time()
    try:
        old = {
            "scenario": "region-lost",
            "passed": True,
            "at": now - 45 * 86400,
            "mode": "demo",
            "missed": [],
        }
        fresh = {
            "scenario": "payment-down",
            "passed": False,
            "at": now - 3600,
            "mode": "demo",
            "missed": ["RTO"],
        }
        store.set_flag("drill:region-lost", json.dumps(old))
        store.set_flag("drill:payment-down", json.dumps(fresh))
        text = "\n".join(render(cfg, store, now=now).md)
    finally:
        store.close()
    row = next(line for line in text.splitlines() if line.startswith("| region-lost |"))
    assert "passed (demo)" in row and "STALE (1080h00m old)" in row
    row = next(line for line in text.splitlines() if line.startswith("| payment-down |"))
    assert "FAILED: RTO" in row and "current" in row
    row = next(line for line in text.splitlines() if line.startswith("| flapping-network |"))
    assert "never" in row and "NOT TESTED" in row
    assert "region-lost: passed" in text  # the risk register links the latest drill


def test_plan_command_writes_markdown_and_html(tmp_path: Path, capsys):
    path = write(tmp_path)
    assert main(["plan", "-c", str(path), "--out", str(tmp_path / "out")]) == 0
    md, page = (tmp_path / "out" / "continuity-plan.md"), (tmp_path / "out" / "continuity-plan.html")
    assert str(md) in capsys.readouterr().out
    assert "Risk register" in md.read_text()
    assert "<h2>2. Risk register</h2>" in page.read_text() and "alice" in page.read_text()
