"""The CLI loads only what a command needs (issue 13): `continuity validate` must answer a hostile
file in under a second, and importing aiohttp, jinja2, dnspython, boto3 or the kubernetes client
with the config models cost more than that in start-up alone. These tests pin which modules are
loaded, not how long anything takes (the figures are in bench/hostile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
HEAVY = ("aiohttp", "jinja2", "dns", "boto3", "botocore", "kubernetes", "matplotlib", "cryptography")
RUNTIME = (*HEAVY, "asyncio", "concurrent", "ssl", "sqlite3", "requests", "urllib3", "structlog")
"""What runs probes, steps and the controller: the event loop, thread pools, TLS, the store, HTTP
clients, logging. Loading and checking a config needs none of it."""
ENGINES = (
    "controller.stores",
    "controller.executors",
    "controller.loop",
    "controller.api",
    "playbooks.engine",
)
"""Our own modules that run things; probes.* is checked apart (only probes.base and probes.models)."""


def _modules(code: str) -> set[str]:
    """Every module loaded by running `code` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def _loaded(code: str) -> set[str]:
    """Top-level names of every module loaded by running `code` in a fresh interpreter."""
    return {name.split(".")[0] for name in _modules(code)}


def _runtime_pieces(modules: set[str]) -> list[str]:
    """The modules of `modules` that run probes, steps or the controller rather than describe them."""
    found = [m for m in modules if m.split(".")[0] in RUNTIME]
    found += [m for m in modules if m.startswith("probes.") and m not in ("probes.base", "probes.models")]
    found += [m for m in modules if any(m == e or m.startswith(e + ".") for e in ENGINES)]
    return sorted(found)


def test_importing_the_cli_loads_no_runtime_library() -> None:
    loaded = _loaded("import controller.cli")
    assert "controller" in loaded  # the import did happen
    assert sorted(loaded & set(HEAVY)) == []


def test_the_config_models_load_without_an_event_loop_or_any_engine() -> None:
    """`import controller.config` (what validate, a reload and every tool that reads a config pay)
    loads pydantic and the models, never asyncio, a thread pool, TLS, the store or a probe engine:
    the models of every probe kind live in probes/models.py, apart from the code that runs them."""
    modules = _modules("import controller.config")
    assert {"controller.config", "probes.models", "pydantic"} <= modules  # the import did happen
    assert _runtime_pieces(modules) == []


def test_validating_every_probe_kind_and_action_loads_no_engine(tmp_path: Path) -> None:
    """A config with a probe of each kind, resolver nameservers (checked by probes.models'
    parse_server) and a playbook with a step of every action validates clean, and the run loaded
    none of the pieces that would run them."""
    config = tmp_path / "every-kind.yaml"
    config.write_text(EVERY_KIND, encoding="utf-8")
    code = (
        "import sys\nfrom controller import cli\n"
        f"code = cli.main(['validate', '-c', {str(config)!r}])\n"
        "assert code == 0, code"
    )
    modules = _modules(code)
    assert {"controller.config", "playbooks.actions.webhook", "playbooks.actions.kubernetes"} <= modules
    assert _runtime_pieces(modules) == []


def test_a_refused_config_loads_no_engine_either(tmp_path: Path) -> None:
    """The hostile path: thousands of wrong step parameters and probe kinds are explained (exit 2)
    with the models alone."""
    steps = "".join(
        f"      - {{name: s{i}, action: http, with: {{url: {i}, method: [x]}}}}\n" for i in range(50)
    )
    probes = "".join(f"  p{i}: {{kind: bogus{i}, url: 1}}\n" for i in range(50))
    config = tmp_path / "hostile.yaml"
    config.write_text(f"probes:\n{probes}playbooks:\n  pb:\n    steps:\n{steps}", encoding="utf-8")
    code = (
        "import sys\nfrom controller import cli\n"
        f"code = cli.main(['validate', '-c', {str(config)!r}])\n"
        "assert code == 2, code"
    )
    assert _runtime_pieces(_modules(code)) == []


EVERY_KIND = """
services:
  shop:
    tier: critical
    rto: 5m
    probes: [web, journey, port, name, cert, errors, cron, alerts]
    playbook: fail
probes:
  web: {kind: http, url: "http://127.0.0.1:1/", expect: {status: 200}}
  journey:
    kind: transaction
    steps:
      - {name: a, url: "http://127.0.0.1:1/a", extract: {x: {json: a.b}}}
      - {name: b, url: "http://127.0.0.1:1/{{ x }}"}
  port: {kind: tcp, host: 127.0.0.1, port: 1, send: "PING\\r\\n", expect: {contains: PONG}}
  name: {kind: dns, name: shop.example., server: "127.0.0.1:5353", record_type: A}
  cert: {kind: tls, host: 127.0.0.1, port: 1}
  errors: {kind: prometheus, url: "http://127.0.0.1:1", query: up, expect: {value: {ge: 1}}}
  cron: {kind: heartbeat, period: 1h, public: true}
  alerts: {kind: alertmanager, matchers: {alertname: Down}}
controller: {resolver_nameservers: ["127.0.0.1:5353"]}
playbooks:
  fail:
    steps:
      - {name: hook, action: http, with: {url: "http://127.0.0.1:1/hook"}}
      - name: weights
        action: aws.route53.set_weights
        with: {zone: Z1, record: shop.example., type: A, weights: {a: 0, b: 100}}
      - {name: db, action: aws.rds.failover_db_cluster, with: {cluster: shop, target_instance: shop-2}}
      - {name: pause, action: wait, with: {duration: 1s}}
      - {name: healthy, action: wait_healthy, with: {probes: [web], within: 30s}}
      - {name: scale, action: kubernetes.scale, with: {namespace: shop, deployment: web, replicas: 3}}
"""


def test_validate_loads_no_runtime_library() -> None:
    """Validating the demo config (probes of several kinds and a playbook) checks every model,
    action parameters included, without the libraries that run them."""
    code = (
        "import sys\nfrom controller import cli\n"
        "try:\n    cli.main(['validate', '-c', 'controller/demo/config.yaml'])\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code"
    )
    loaded = _loaded(code)
    assert "playbooks" in loaded  # the playbook's steps were checked
    assert sorted(loaded & set(HEAVY)) == []


def test_validate_still_works_from_the_command_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "validate", "-c", "controller/demo/config.yaml"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok: 2 service(s), 3 probe(s), 1 playbook(s)" in proc.stdout + proc.stderr


def test_the_runtime_pieces_build_on_first_use() -> None:
    """What moved out of module scope still builds, with the libraries it needs (real probes run in
    tests/test_probes.py and tests/test_probe_kinds.py)."""
    code = (
        "import aiohttp.abc\nfrom probes.http import _bounded_resolver_class, _templates\n"
        "assert issubclass(_bounded_resolver_class(), aiohttp.abc.AbstractResolver)\n"
        "assert _templates().from_string('{{ a }}').render(a=1) == '1'\n"
        "from playbooks.actions.flow import templates\nassert templates() is templates()"
    )
    assert {"aiohttp", "jinja2"} <= _loaded(code)
