"""Drills end to end: the real controller, a real fault, the score; and --target in dry run.

The fastest scenarios only (each about 10-13 s). `continuity drill --all` takes about 2 minutes on
a 2-core machine, so it is measured by hand (README) rather than run here.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controller.cli import main
from controller.config import ConfigError, load_config
from controller.drills import report
from controller.drills.names import SCENARIOS
from controller.drills.runner import run_demo_drill
from controller.drills.scenarios import BUILTIN
from controller.stores import SQLiteStore
from tests.conftest import World

MEASURES = {
    "detect_s",
    "first_page_s",
    "first_customer_update_s",
    "traffic_moved_s",
    "recover_s",
    "data_loss_s",
}


def test_every_scenario_says_its_right_outcome():
    assert set(BUILTIN) == set(SCENARIOS)
    assert {s.expected for s in BUILTIN.values()} == {"failover", "no_failover", "page_only"}
    for sc in BUILTIN.values():
        assert sc.right_outcome and sc.title


def test_controller_cut_off_does_not_fail_over_and_alerts_once(tmp_path: Path):
    result = asyncio.run(run_demo_drill("controller-cut-off"))
    by_name = {o.name: o for o in result.objectives}
    assert result.passed, result.objectives
    assert result.expected == "no_failover"
    assert by_name["right outcome: do not fail over"].passed
    assert "record 127.0.0.2, writer marketplace-db-euw1" in by_name["right outcome: do not fail over"].actual
    assert by_name["one isolation alert"].actual == "1"
    assert result.actions_taken == [] and result.actions_wrongly_taken == []
    assert len(result.messages_sent) == 1 and "controller isolated" in result.messages_sent[0]

    md, js, png = report.write(result, tmp_path)
    data = json.loads(js.read_text())
    for key in (
        "scenario",
        "expected",
        "outcome",
        "passed",
        "rto_s",
        "rpo_s",
        "measures",
        "objectives",
        "actions_taken",
        "actions_wrongly_taken",
        "messages_sent",
    ):
        assert key in data, key
    assert set(data["measures"]) == MEASURES
    assert data["measures"]["traffic_moved_s"] is None and data["measures"]["recover_s"] is None
    assert all({"name", "target", "actual", "passed"} <= set(o) for o in data["objectives"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "## Objectives" in text and "one isolation alert" in text and png.name in text


def test_region_lost_from_the_cli_fails_over_within_the_rto_and_is_recorded(tmp_path: Path, capsys):
    out, state = tmp_path / "reports", tmp_path / "state"
    code = main(
        [
            "drill",
            "region-lost",
            "-c",
            str(tmp_path / "none.yaml"),
            "--out",
            str(out),
            "--data-dir",
            str(state),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "drill region-lost: PASSED (failover)" in text
    assert "[ok] recovered within the RTO" in text and "[ok] data loss within the RPO" in text
    assert "[ok] one page for the outage: 1 paged incident(s)" in text  # checkout and catalog: one page
    [js] = out.glob("drill-region-lost-*.json")
    data = json.loads(js.read_text())
    m = data["measures"]
    assert 0 < m["detect_s"] <= m["traffic_moved_s"] <= m["recover_s"] < data["rto_s"]
    assert m["first_page_s"] is not None and m["first_customer_update_s"] is not None
    assert m["data_loss_s"] is not None and m["data_loss_s"] <= data["rpo_s"]
    assert any("Route 53 record moved to 127.0.0.3" in a for a in data["actions_taken"])
    assert data["actions_wrongly_taken"] == []
    store = SQLiteStore(state)
    try:
        kept = report.latest(store)["region-lost"]
    finally:
        store.close()
    assert kept["passed"] is True and kept["mode"] == "demo"


# ---------------------------------------------------------------- --target: a staging config, dry run


@pytest.fixture
def staging_site() -> Iterator[str]:
    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def staging_config(tmp_path: Path, world: World, url: str, rto: str) -> Path:
    path = tmp_path / "staging.yaml"
    path.write_text(
        f"""
services:
  shop: {{tier: critical, rto: {rto}, rpo: 30s, owners: [shop-oncall], probes: [web], playbook: move}}
probes:
  web: {{kind: http, url: "{url}", interval: 500ms, timeout: 1s}}
detection: {{failure_threshold: 2, success_threshold: 2, confirm: {{probes: 2, spacing: 100ms}}}}
playbooks:
  move:
    steps:
      - name: switch-dns
        action: aws.route53.switch_record
        with: {{zone: "{world.zone}", record: "{world.zone}", type: A, values: [127.0.0.9]}}
aws: {{region: eu-west-1, endpoint_url: "{world.moto_url}"}}
controller: {{data_dir: "{tmp_path / "staging-state"}", tick: 200ms, outbox_retry: 1s}}
""",
        encoding="utf-8",
    )
    return path


def test_target_is_a_dry_run_that_changes_nothing_in_aws(
    tmp_path: Path, world: World, staging_site: str, capsys
):
    cfg = staging_config(tmp_path, world, staging_site, rto="5m")
    out = tmp_path / "reports"
    code = main(["drill", "region-lost", "--target", str(cfg), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert world.a_record() == ["127.0.0.2"], "a dry run moved the record"
    [js] = out.glob("*.json")
    data = json.loads(js.read_text())
    assert data["mode"] == "target" and data["service"] == "shop"
    assert any("(dry run): succeeded" in a and "switch-dns skipped" in a for a in data["actions_taken"])
    # The result is kept in the staging config's own store, where its plan will read it.
    store = SQLiteStore(tmp_path / "staging-state")
    try:
        assert report.latest(store)["region-lost"]["mode"] == "target"
    finally:
        store.close()


def test_a_missed_objective_exits_1(tmp_path: Path, world: World, staging_site: str, capsys):
    cfg = staging_config(tmp_path, world, staging_site, rto="10ms")  # absurdly low
    code = main(["drill", "region-lost", "--target", str(cfg), "--out", str(tmp_path / "r")])
    text = capsys.readouterr().out
    assert code == 1, text
    assert "drill region-lost: FAILED" in text
    assert "[MISSED] recovered within the RTO" in text
    assert world.a_record() == ["127.0.0.2"]


def test_target_refuses_a_demo_only_scenario_and_unknown_names(tmp_path: Path, world: World, capsys):
    cfg = staging_config(tmp_path, world, "http://127.0.0.1:9/", rto="5m")
    assert main(["drill", "killed-mid-failover", "--target", str(cfg)]) == 2
    assert main(["drill", "no-such-thing"]) == 2
    assert main(["drill"]) == 2
    assert "needs the demo environment" in capsys.readouterr().err
    assert main(["drill", "--list"]) == 0
    assert "controller-cut-off" in capsys.readouterr().out


def test_a_risk_must_name_a_drill_that_exists(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(
        """
services:
  shop: {tier: critical, rto: 5m, probes: [web]}
probes:
  web: {kind: http, url: "http://127.0.0.1:9/"}
risks:
  fire: {description: The data centre burns, likelihood: rare, impact: severe, drill: fire-drill}
  flood: {description: Water, likelihood: often, impact: severe, drill: region-lost, services: [shopp]}
drills: {max_age: 90d}
""",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    assert any(
        p.startswith(f"{path}: risks.fire.drill: expected a drill scenario (region-lost,")
        and "found 'fire-drill'" in p
        for p in problems
    ), problems
    assert any(p.startswith(f"{path}: risks.flood.likelihood: expected one of") for p in problems), problems
    assert any(p.startswith(f"{path}: risks.flood.services[0]: expected a service") for p in problems), (
        problems
    )
