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


def _loaded(code: str) -> set[str]:
    """Top-level names of every module loaded by running `code` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True
    )
    return {name.split(".")[0] for name in json.loads(out.stdout.splitlines()[-1])}


def test_importing_the_cli_loads_no_runtime_library() -> None:
    loaded = _loaded("import controller.cli")
    assert "controller" in loaded  # the import did happen
    assert sorted(loaded & set(HEAVY)) == []


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
