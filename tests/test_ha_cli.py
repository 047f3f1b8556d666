"""Start-up checks for high availability and placement, through the real CLI.

- With more than one replica (CONTINUITY_REPLICAS, set by the chart) a file lock or a SQLite store
  is refused: exit 2, one line per problem, no traceback.
- The file lock sits beside the store it protects: `--data-dir` moves both, so two controllers
  sharing one store through `--data-dir` elect one leader whatever their configs' data_dir says.
- `validate` warns when the controller runs in the region a playbook fails away from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from controller.cli import ha_problems, main, placement_warnings
from controller.config import load_config
from tests.test_cluster import ROOT, child_env, free_port, http_get, until

CONFIG = """
services:
  shop: {{tier: critical, rto: 5m, probes: [web], playbook: away}}
probes:
  web: {{kind: http, url: "http://127.0.0.1:9/web", interval: 1s, timeout: 1s}}
playbooks:
  away:
    fails_away_from: eu-west-1
    steps: [{{name: hold, action: wait, with: {{duration: 1s}}}}]
controller: {{data_dir: "{data_dir}", tick: 100ms{extra}}}
"""


def write(tmp: Path, name: str = "continuity.yaml", data_dir: str = "state", extra: str = "") -> Path:
    path = tmp / name
    path.write_text(CONFIG.format(data_dir=tmp / data_dir, extra=extra), encoding="utf-8")
    return path


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`run` configures structlog for the process; later tests must not log into a closed capture."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_per_pod_state_is_refused_with_several_replicas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    cfg = write(tmp_path)
    monkeypatch.setenv("CONTINUITY_REPLICAS", "2")
    assert main(["run", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: leader.backend: expected kubernetes in a Deployment of 2 replicas" in err
    assert f"{cfg}: store.backend: expected kubernetes in a Deployment of 2 replicas" in err
    assert "Traceback" not in err
    assert not (tmp_path / "state").exists(), "refused before anything was opened"


def test_ha_problems_judges_only_several_replicas(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path))
    assert ha_problems(cfg, {}) == []
    assert ha_problems(cfg, {"CONTINUITY_REPLICAS": "1"}) == []
    assert ha_problems(cfg, {"CONTINUITY_REPLICAS": "two"}) == [
        "CONTINUITY_REPLICAS: expected a whole number of replicas, found 'two'"
    ]
    cfg.leader.backend = "kubernetes"
    cfg.store.backend = "kubernetes"
    assert ha_problems(cfg, {"CONTINUITY_REPLICAS": "3"}) == []


def test_validate_warns_when_the_controller_runs_in_the_region_it_fails_away_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(tmp_path)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert main(["validate", "-c", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert (
        f"{cfg}: warning: playbooks.away.fails_away_from: the controller runs in eu-west-1 (AWS_REGION)"
        in err
    )
    # The config's own region wins over the environment.
    elsewhere = write(tmp_path, "elsewhere.yaml", extra=", region: eu-central-1")
    assert main(["validate", "-c", str(elsewhere)]) == 0
    assert "fails_away_from" not in capsys.readouterr().err  # (unset secrets still warn, rightly)
    same = write(tmp_path, "same.yaml", extra=", region: eu-west-1")
    monkeypatch.delenv("AWS_REGION")
    assert placement_warnings(load_config(same), {})[0].startswith(
        "playbooks.away.fails_away_from: the controller runs in eu-west-1 (controller.region)"
    )


def test_the_lock_moves_with_the_store_so_two_controllers_sharing_a_store_elect_one_leader(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for i in (1, 2):
            # Different config data_dirs, one store: before, each locked its own config dir and led.
            cfg = write(tmp_path, f"c{i}.yaml", data_dir=f"own-{i}", extra="")
            port = free_port()
            log = open(tmp_path / f"p{i}.log", "wb")
            cmd = [sys.executable, "-m", "controller.cli", "run", "-c", str(cfg), "--data-dir", str(shared)]
            cmd += ["--listen", f"127.0.0.1:{port}"]
            procs.append((subprocess.Popen(cmd, env=child_env(), cwd=ROOT, stdout=log, stderr=log), port))

        def leaders() -> list[bool] | None:
            try:
                answers = [
                    json.loads(http_get(f"http://127.0.0.1:{port}/leader", 1.0)[1]) for _, port in procs
                ]
            except OSError:
                return None
            return [a["leader"] for a in answers]

        until(
            lambda: (got := leaders()) is not None and sorted(got) == [False, True], 30, "one leader of two"
        )
        assert (shared / "continuity-leader.lock").exists() and (shared / "continuity.db").exists()
        assert not (tmp_path / "own-1").exists() and not (tmp_path / "own-2").exists()
    finally:
        for p, _ in procs:
            p.kill()
            p.wait(timeout=5)
