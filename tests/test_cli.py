"""The `continuity` command, run as a user runs it: a subprocess, exit codes, stdout and stderr."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("AWS_PROFILE", None)
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/ok": 200, "/home": 200, "/cart": 500}.get(self.path, 404)
        body = b'{"status": "UP"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def good_config(tmp_path: Path, base: str = "http://127.0.0.1:1") -> Path:
    path = tmp_path / "continuity.yaml"
    path.write_text(
        f"""\
services:
  shop:
    tier: critical
    rto: 5m
    probes: [up, broken, journey]
    playbook: fo
probes:
  up:
    kind: http
    url: {base}/ok
    timeout: 2s
    expect: {{status: 200, json: {{status: UP}}}}
  broken:
    kind: http
    url: {base}/missing
    timeout: 2s
  journey:
    kind: transaction
    timeout: 3s
    steps:
      - {{name: home, url: "{base}/home"}}
      - {{name: add-to-cart, url: "{base}/cart"}}
      - {{name: pay, url: "{base}/pay"}}
playbooks:
  fo:
    steps:
      - name: move-db
        action: aws.rds.failover_db_cluster
        with: {{cluster: shop-db, target_instance: shop-db-2}}
      - name: switch-dns
        action: aws.route53.switch_record
        with: {{zone: shop.example., record: shop.example., values: [127.0.0.3]}}
aws:
  endpoint_url: http://127.0.0.1:{closed_port()}
  connect_timeout: 1s
  read_timeout: 1s
controller:
  data_dir: {tmp_path / "data"}
"""
    )
    return path


HELP = [
    [],
    ["run"],
    ["validate"],
    ["schema"],
    ["probe"],
    ["playbook"],
    ["playbook", "run"],
    ["incidents"],
    ["incident"],
    ["incident", "show"],
    ["demo"],
]


def test_help_everywhere() -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: cli(*a, "--help"), HELP))
    for args, res in zip(HELP, results, strict=True):
        assert res.returncode == 0, (args, res.stderr)
        assert res.stdout.startswith("usage: continuity"), (args, res.stdout)
        assert res.stderr == ""


def test_validate_good_config(tmp_path: Path) -> None:
    path = good_config(tmp_path)
    res = cli("validate", "-c", str(path))
    assert res.returncode == 0, res.stderr
    # the API token is unset here: reported (issue 13), a warning unless --require-env
    assert res.stdout.strip().startswith(f"{path}: ok: 1 service(s), 3 probe(s), 1 playbook(s)")


def test_validate_bad_config_reports_every_problem(tmp_path: Path) -> None:
    path = good_config(tmp_path)
    text = path.read_text().replace("rto: 5m", "rto: 5").replace("playbook: fo", "playbook: nope")
    path.write_text(text.replace("kind: transaction", "kind: gopher"))
    res = cli("validate", "-c", str(path))
    assert res.returncode == 2
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == "continuity: 3 problem(s) in the configuration"
    assert sorted(lines[:-1]) == sorted(
        [
            f"{path}: services.shop.rto: expected a duration with a unit (e.g. '5s'), "
            "found the bare number 5",
            f"{path}: probes.journey.kind: expected one of 'http', 'transaction', 'tcp', 'dns', 'tls', "
            f"'prometheus', 'heartbeat', 'alertmanager', found 'gopher'",
            f"{path}: services.shop.playbook: expected a playbook defined under playbooks (known: fo), "
            "found 'nope'",
        ]
    )


def test_validate_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    res = cli("validate", "-c", str(missing))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [
        f"{missing}: cannot read the file: no such file",
        "continuity: 1 problem(s) in the configuration",
    ]


def test_unknown_command() -> None:
    res = cli("frobnicate")
    assert res.returncode == 2
    assert "invalid choice: 'frobnicate'" in res.stderr
    assert "Traceback" not in res.stderr


def test_schema_prints_json() -> None:
    res = cli("schema")
    assert res.returncode == 0, res.stderr
    schema = json.loads(res.stdout)
    assert schema["title"] == "Continuity configuration"
    assert set(schema["required"]) == {"services", "probes"}


def test_probe_passes(tmp_path: Path, server: str) -> None:
    res = cli("probe", "up", "-c", str(good_config(tmp_path, server)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("probe up: PASS in ")
    assert f"[ok  ] up: GET {server}/ok -> 200" in res.stdout
    assert "ok   json status: expected UP, found UP" in res.stdout


def test_probe_fails_with_the_step_and_expectation(tmp_path: Path, server: str) -> None:
    res = cli("probe", "journey", "-c", str(good_config(tmp_path, server)))
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.startswith("probe journey: FAIL in ")
    assert f"[ok  ] home: GET {server}/home -> 200" in res.stdout
    assert f"[FAIL] add-to-cart: GET {server}/cart -> 500" in res.stdout
    assert "FAIL status: expected 200, found 500" in res.stdout
    assert "pay" not in res.stdout
    assert f"reason: step 'add-to-cart' (GET {server}/cart): expected status 200, found 500" in res.stdout


def test_probe_json_output(tmp_path: Path, server: str) -> None:
    res = cli("probe", "broken", "--json", "-c", str(good_config(tmp_path, server)))
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert doc["ok"] is False
    assert doc["steps"][0]["status"] == 404
    assert doc["reason"] == f"request (GET {server}/missing): expected status 200, found 404"


def test_probe_unknown_name(tmp_path: Path) -> None:
    res = cli("probe", "nope", "-c", str(good_config(tmp_path)))
    assert res.returncode == 2
    assert res.stderr.strip() == "continuity: no probe named 'nope' (known: broken, journey, up)"


def test_playbook_dry_run_prints_exact_calls_without_aws(tmp_path: Path) -> None:
    res = cli("playbook", "run", "fo", "--dry-run", "-c", str(good_config(tmp_path)), timeout=15)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("playbook fo: 2 step(s), cooldown 30m00s, approval auto")
    assert "1. move-db (aws.rds.failover_db_cluster)" in out
    call = 'rds.failover_db_cluster({"DBClusterIdentifier": "shop-db", "TargetDBInstanceIdentifier": '
    assert call + '"shop-db-2"})' in out
    assert "rds.describe_db_clusters(" in out
    assert "2. switch-dns (aws.route53.switch_record)" in out
    assert "route53.list_hosted_zones_by_name(" in out
    assert "route53.change_resource_record_sets(" in out
    assert '"Value": "127.0.0.3"' in out
    assert out.rstrip().endswith("dry run: nothing was changed")
    assert not (tmp_path / "data").exists()  # a dry run touches no state either


def test_playbook_unknown_name(tmp_path: Path) -> None:
    res = cli("playbook", "run", "nope", "--dry-run", "-c", str(good_config(tmp_path)))
    assert res.returncode == 2
    assert res.stderr.strip() == "continuity: no playbook named 'nope' (known: fo)"


def test_incidents_on_empty_data_dir(tmp_path: Path) -> None:
    res = cli("incidents", "-c", str(good_config(tmp_path)), "--data-dir", str(tmp_path / "empty"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "no incidents"
    res = cli("incidents", "--json", "-c", str(good_config(tmp_path)), "--data-dir", str(tmp_path / "empty"))
    assert json.loads(res.stdout) == []
