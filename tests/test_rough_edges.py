"""The rough edges a new user hit (issue 14, item 5): each one, as the user met it."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path
from typing import Any

from controller import decide as d
from controller.cli import _drill_out
from controller.comms.templates import SAMPLE, Templates
from controller.config import load_config
from controller.detect import Health, ProbeState, ServiceHealth, ServiceState
from controller.drills.drill import DrillResult
from controller.drills.report import chart, mark_lanes
from controller.durations import DURATION_PATTERN, parse_duration
from controller.loop import Controller
from controller.notify import slack
from controller.stores import SQLiteStore
from probes.base import ProbeResult
from tests.test_cli import cli, good_config


def _durations_in(node: Any, path: str = "") -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        kinds = [node, *(node.get("anyOf") or [])]
        if "default" in node and any(
            isinstance(k, dict) and k.get("pattern") == DURATION_PATTERN for k in kinds
        ):
            found.append((path, node["default"]))
        for key, value in node.items():
            found.extend(_durations_in(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for n, value in enumerate(node):
            found.extend(_durations_in(value, f"{path}[{n}]"))
    return found


def test_schema_gives_duration_defaults_as_the_config_writes_them() -> None:
    res = cli("schema")
    assert res.returncode == 0, res.stderr
    defaults = _durations_in(json.loads(res.stdout))
    assert len(defaults) > 15  # every duration field with a default is seen
    for path, value in defaults:
        assert value is None or isinstance(value, str), f"{path}: {value!r}"
        if isinstance(value, str):
            assert re.fullmatch(DURATION_PATTERN, value), (path, value)
            parse_duration(value)
    found = dict(defaults)
    assert found[".$defs.Playbook.properties.cooldown"] == "30m"
    assert found[".$defs.StepSpec.properties.timeout"] == "60s"
    assert found[".$defs.Confirm.properties.spacing"] == "250ms"


def test_dry_run_plan_shows_each_steps_guards(tmp_path: Path) -> None:
    path = good_config(tmp_path)
    text = path.read_text().replace(
        "      - name: switch-dns\n",
        "      - name: switch-dns\n"
        "        guards:\n"
        "          - {probes_healthy: [up]}\n"
        "          - {replica_lag: {cloudwatch: {dimensions: {DBInstanceIdentifier: shop-db-2}}, max: 30s}}\n"
        "          - {prometheus: {url: 'http://127.0.0.1:9', query: 'error_ratio', lt: 0.01}}\n",
    )
    path.write_text(text)
    res = cli("playbook", "run", "fo", "--dry-run", "-c", str(path), timeout=15)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    at = next(n for n, line in enumerate(lines) if "2. switch-dns" in line)
    assert lines[at + 1].strip() == "guard: probes UP: up"
    assert lines[at + 2].strip() == (
        "guard: replica lag at most 30.0s (CloudWatch AWS/RDS ReplicaLag {DBInstanceIdentifier=shop-db-2})"
    )
    assert lines[at + 3].strip() == "guard: Prometheus `error_ratio` < 0.01"
    first = next(n for n, line in enumerate(lines) if "1. move-db" in line)
    assert not any("guard:" in line for line in lines[first:at])  # a step without guards shows none


def test_slack_names_the_service_once() -> None:
    sample = {
        "id": "INC-1",
        "service": "ticketing",
        "severity": "critical",
        "status": "open",
        "title": "ticketing down: ticketing-eu: expected status 200, found 503",
        "started_at": 1_767_225_600.0,
    }
    msg = slack.message(sample, "opened")
    assert msg["text"] == "Incident: ticketing down: ticketing-eu: expected status 200, found 503"
    assert "ticketing — ticketing" not in json.dumps(msg, ensure_ascii=False)
    other = slack.message({**sample, "title": "Checkout is unavailable"}, "opened")
    assert other["text"] == "Incident: ticketing — Checkout is unavailable"  # a title that does not name it
    ctx = {**SAMPLE, "incident": {**SAMPLE["incident"], "service": "ticketing", "title": sample["title"]}}
    body = Templates().render("internal", "opened", ctx)
    assert body.splitlines()[0] == "[CRITICAL] ticketing down: ticketing-eu: expected status 200, found 503"


async def _open(controller: Controller, dec: d.OpenIncident) -> None:
    """Open as a tick does: the store writes awaited off the loop, the timeline flushed at the end."""
    await controller.effects._open(dec, 1000.0)
    await controller.astore.flush()


def test_incident_timeline_does_not_begin_with_an_older_burst(tmp_path: Path) -> None:
    cfg_path = good_config(tmp_path)
    cfg = load_config(str(cfg_path))
    store = SQLiteStore(tmp_path / "data")
    controller = Controller(cfg, store, clock=lambda: 1000.0)
    failed = ProbeResult(probe="up", ok=False, started_at=990.0, latency=0.01, error="HTTP 503")
    controller.states["up"] = ProbeState(
        status=Health.DOWN, failures=3, changed_at=995.0, first_failure_at=990.0, last=failed
    )
    controller.burst_notes["up"] = (400.0, "confirmation burst for up: 1 of 5 runs failed, not confirmed")
    health = ServiceHealth(
        "shop", ServiceState.DOWN, failing=("up",), reasons=(("up", "HTTP 503"),), since=990.0
    )
    asyncio.run(_open(controller, d.OpenIncident("shop", "critical", health, "shop is down: up: HTTP 503")))
    inc = store.open_incident_for("shop")
    assert inc is not None
    events = store.timeline(inc.id)
    assert not any("confirmation burst" in e.message for e in events), [e.message for e in events]
    assert events[0].message == "probe up first failed"
    # A burst of this streak is kept.
    store.update_incident(inc.id, status="resolved", resolved_at=1001.0)
    controller.burst_notes["up"] = (993.0, "confirmation burst for up: 5 of 5 runs failed, confirmed: DOWN")
    asyncio.run(_open(controller, d.OpenIncident("shop", "critical", health, "shop is down: up: HTTP 503")))
    again = store.open_incident_for("shop")
    assert again is not None and again.id != inc.id
    assert any(e.message.endswith("confirmed: DOWN") for e in store.timeline(again.id))
    store.close()


def _args(**kw: Any) -> argparse.Namespace:
    base = {"out": None, "data_dir": None, "target": None, "config": "continuity.yaml"}
    return argparse.Namespace(**{**base, **kw})


def test_drill_reports_go_under_the_data_directory_not_the_cwd(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)  # no continuity.yaml here: the demo drill
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert _drill_out(_args()) == tmp_path / "state" / "continuity" / "drill-reports"
    assert _drill_out(_args(out="r")) == Path("r")
    assert _drill_out(_args(data_dir="/srv/c")) == Path("/srv/c/drill-reports")
    cfg = good_config(tmp_path)
    assert _drill_out(_args(config=str(cfg))) == tmp_path / "data" / "drill-reports"
    assert _drill_out(_args(target=str(cfg))) == tmp_path / "data" / "drill-reports"


def test_incidents_needs_only_a_data_dir(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "d")
    store.open_incident("shop", "critical", "shop down: up: HTTP 503", 1.0, 1.0, {})
    store.close()
    res = cli("incidents", "--data-dir", str(tmp_path / "d"))
    assert res.returncode == 0, res.stderr
    assert "shop" in res.stdout and "critical" in res.stdout
    res = cli("incidents")
    assert res.returncode == 2
    assert "pass -c FILE (the controller's config) or --data-dir DIR" in res.stderr
    res = cli("incidents", "--data-dir", str(tmp_path / "nope"))
    assert res.returncode == 2 and "no such directory" in res.stderr


def test_drill_chart_labels_never_overlap(tmp_path: Path) -> None:
    marks = {
        "fault injected": 0.0,
        "detected": 4.1,
        "failover started": 4.12,
        "first page": 4.3,
        "first customer update": 4.35,
        "traffic moved": 5.4,
        "recovered": 8.2,
        "playbook succeeded": 8.25,
    }
    lanes = mark_lanes(marks, 12.0)
    assert [lane for _, _, lane in lanes] == [0, 0, 1, 2, 3, 0, 0, 1]
    result = DrillResult(
        scenario="region-lost",
        title="Region lost",
        mode="demo",
        expected="failover",
        right_outcome="fail over",
        outcome="failover",
        passed=True,
        started_at=0.0,
        wall_s=12.0,
        service="checkout",
        rto_s=300.0,
        rpo_s=30.0,
        measures={},
        objectives=[],
        actions_taken=[],
        actions_wrongly_taken=[],
        messages_sent=[],
        notes=[],
        marks=marks,
        series={"checkout-journey": [(0.0, 1), (3.0, 0), (7.5, 1)]},
    )
    boxes = chart(result, tmp_path / "c.png")
    assert len(boxes) == 2 * len(marks)  # a badge and a key line per moment
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_a_prometheus_guard_that_holds_passes() -> None:
    """Found while showing guards in the plan: describing the bound read the guard's url and query
    as bounds, so every `prometheus:` guard failed with "cannot read the guard's value: KeyError"."""
    import asyncio

    from aiohttp import web

    from controller.config import Guard
    from controller.notify.receivers import serve
    from playbooks import guards

    async def query(request: web.Request) -> web.Response:
        value = {"error_ratio": "0.002", "bad_ratio": "0.5"}[request.query["query"]]
        return web.json_response(
            {
                "status": "success",
                "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, value]}]},
            }
        )

    async def main() -> list[guards.GuardResult]:
        app = web.Application()
        app.router.add_get("/api/v1/query", query)
        async with serve(app) as base:
            out = []
            for q in ("error_ratio", "bad_ratio"):
                guard = Guard.model_validate({"prometheus": {"url": base, "query": q, "lt": 0.01}})
                out.append(await guards.evaluate(guard, None))  # type: ignore[arg-type]
            return out

    good, bad = asyncio.run(main())
    assert good.ok and good.text == "error_ratio = 0.002, expected < 0.01", good.text
    assert not bad.ok and bad.text == "bad_ratio = 0.5, expected < 0.01", bad.text


def test_provider_down_everywhere_pages_once_and_moves_nothing(tmp_path: Path) -> None:
    """The README's pattern, through the pure decision: the provider opens the incident; checkout,
    failing because of it, joins that incident; no playbook starts."""
    path = tmp_path / "c.yaml"
    path.write_text(
        """
services:
  payment-provider: {tier: critical, rto: 30m, probes: [psp-api]}
  checkout:
    tier: critical
    rto: 5m
    probes: [checkout-journey]
    playbook: region-failover
    depends_on: [payment-provider]
probes:
  psp-api: {kind: http, url: "http://127.0.0.1:9/health"}
  checkout-journey: {kind: http, url: "http://127.0.0.1:9/checkout"}
  checkout-secondary: {kind: http, url: "http://127.0.0.1:9/secondary"}
playbooks:
  region-failover:
    steps:
      - name: switch
        action: wait
        with: {duration: 1s}
        guards: [{probes_healthy: [checkout-secondary]}]
"""
    )
    cfg = load_config(str(path))
    down = {
        name: ServiceHealth(
            name, ServiceState.DOWN, failing=(probe,), reasons=((probe, "HTTP 503"),), since=1.0
        )
        for name, probe in (("payment-provider", "psp-api"), ("checkout", "checkout-journey"))
    }
    first = d.decide(d.Observation(now=10.0, health=down), cfg)
    assert [type(x).__name__ for x in first] == ["OpenIncident"]
    assert first[0].service == "payment-provider"  # type: ignore[union-attr]
    opened = d.Observation(
        now=11.0, health=down, incidents={"payment-provider": d.OpenIncidentView("INC-1", "critical")}
    )
    second = d.decide(opened, cfg)
    assert [type(x).__name__ for x in second] == ["JoinIncident"]
    assert second[0].incident_id == "INC-1" and second[0].service == "checkout"  # type: ignore[union-attr]
