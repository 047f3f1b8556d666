"""bench/run_all.py's one page of figures: summarising runs, judging goals, the README's Markdown.

No benchmark runs here and nothing is timed: the rows are written by hand, as `bench/figures.py`
writes them, and the assertions are about what the page says of them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all = _load("run_all")
figures = _load("figures")

RATIO = "probes: CPU per probe / blackbox_exporter's (flat out)"


def _rows() -> list[dict[str, Any]]:
    ratio = {"unit": "ratio", "better": "lower", "goal": "<= 0.25", "anchor": "blackbox 0.23 = 1.0"}
    return [
        {"name": RATIO, "value": 0.26, "load": 3.0, **ratio},
        {"name": "fan-out: outbox -> receiver", "value": 440.0, "unit": "messages/s", "better": "higher"},
        {"name": RATIO, "value": 0.22, "load": 5.5, **ratio},
        {"name": RATIO, "value": 0.24, "load": 4.0, **ratio},
    ]


def test_summary_is_median_min_max_with_the_goal_judged_on_the_median() -> None:
    ratio, fanout = run_all.summarise(_rows())
    assert ratio["name"] == RATIO  # first-seen order
    assert (ratio["median"], ratio["min"], ratio["max"], ratio["runs"]) == (0.24, 0.22, 0.26, 3)
    assert ratio["met"] is True  # the median 0.24 meets <= 0.25 although one run (0.26) did not
    assert ratio["met_runs"] == 2
    assert (ratio["load_min"], ratio["load_max"]) == (3.0, 5.5)
    assert ratio["anchor"] == "blackbox 0.23 = 1.0"
    assert fanout["runs"] == 1 and fanout["goal"] is None and fanout["met"] is None
    assert fanout["load_min"] is None


def test_a_median_over_the_goal_is_not_met_even_if_the_best_run_is() -> None:
    rows = [{**r, "value": v} for r, v in zip(_rows()[::2], (0.30, 0.20), strict=True)]
    rows.append({**rows[0], "value": 0.27})
    (ratio,) = run_all.summarise(rows)
    assert ratio["median"] == 0.27 and ratio["met"] is False and ratio["met_runs"] == 1


@pytest.mark.parametrize(
    ("goal", "value", "met"),
    [
        ("<= 0.25", 0.25, True),
        ("<= 0.25", 0.2501, False),
        ("< 1000", 1000.0, False),
        (">= 646.7", 666.0, True),
        ("> 5", 5.0, False),
        ("<= 3.20 (floor + burst + 1 s)", 3.1, True),
        ("fast enough", 1.0, None),
        (None, 1.0, None),
    ],
)
def test_goals_are_judged_from_their_text(goal: str | None, value: float, met: bool | None) -> None:
    assert run_all.meets(goal, value) is met


def test_table_marks_a_missed_goal_and_a_regression_since_the_last_run() -> None:
    summary = run_all.summarise(
        [{**r, "value": r["value"] + 0.05} if r["name"] == RATIO else r for r in _rows()]
    )
    previous = {RATIO: {"median": 0.24}, "fan-out: outbox -> receiver": {"median": 600.0}}
    text = run_all.table(summary, previous)
    ratio_line = next(line for line in text.splitlines() if line.startswith(f"| {RATIO}"))
    assert "**no** (0/3 runs)" in ratio_line and "0.270-0.310 (3)" in ratio_line
    assert "+21% (worse)" in ratio_line and "3.0-5.5" in ratio_line
    fanout_line = next(line for line in text.splitlines() if line.startswith("| fan-out"))
    assert "-27% (worse)" in fanout_line  # fewer messages per second is worse: "better" is "higher"
    assert "since last run" in text.splitlines()[0]
    assert "since last run" not in run_all.table(summary).splitlines()[0]


def test_markdown_names_the_date_the_machine_and_what_was_not_run() -> None:
    summary = {
        "date": "2026-11-29 20:40 UTC",
        "machine": {
            "cpu": "AMD EPYC",
            "cores": 2,
            "os": "Linux 6.1",
            "python": "3.11.7",
            "load_at_start": [0.52, 0.61, 0.7],
        },
        "mode": "full",
        "took_s": 1500,
        "not_run": ["kube_store_loop"],
        "failed": [],
        "figures": run_all.summarise(_rows()),
    }
    md = run_all.markdown(summary)
    head = md.splitlines()[0]
    assert "2026-11-29 20:40 UTC" in head and "AMD EPYC, 2 cores" in head and "Python 3.11.7" in head
    assert "0.52 / 0.61 / 0.70" in head and "25 min" in head
    assert "`PYTHONPATH=. python bench/run_all.py --markdown`" in head
    assert "| figure | median | min-max (runs) | goal | met | anchor | load avg |" in md
    assert "since last run" not in md  # the README's table does not compare with someone's last run
    assert "Not run (script not present): `kube_store_loop`." in md
    assert "Failed" not in md


def test_a_missing_script_is_not_run_and_not_a_failure(tmp_path: Path) -> None:
    (tmp_path / "present.py").write_text("")
    benches = {"present": (["--full"], ["--quick"], 3), "absent": ([], [], 1)}
    todo, missing = run_all.plan(benches, tmp_path, quick=False, only=None, repeat=None)
    assert todo == [("present", ["--full"], 3)] and missing == ["absent"]
    todo, missing = run_all.plan(benches, tmp_path, quick=True, only=None, repeat=None)
    assert todo == [("present", ["--quick"], 1)]
    todo, missing = run_all.plan(benches, tmp_path, quick=False, only=["absent"], repeat=2)
    assert todo == [] and missing == ["absent"]


def test_a_run_that_recorded_its_figures_and_missed_a_goal_is_not_a_failed_benchmark() -> None:
    assert not run_all.failed_run(0, 10)
    assert not run_all.failed_run(1, 10)  # probe_throughput's exit after a missed goal: median decides
    assert run_all.failed_run(1, 0)  # a traceback before any figure
    assert run_all.failed_run(2, 10)  # a usage error, or a crash with another status
    assert run_all.failed_run(-9, 5)  # killed


def test_every_benchmark_with_a_goal_runs_three_times_in_full_mode() -> None:
    """Issue 16: each goal met as a median over repeated runs, from one command."""
    with_goals = ["probe_throughput", "detection_latency", "failover_e2e", "scale", "kube_store_loop"]
    todo, _ = run_all.plan(run_all.BENCHES, BENCH, quick=False, only=with_goals, repeat=None)
    assert {name: runs for name, _, runs in todo} == dict.fromkeys(with_goals, 3)
    for name in with_goals:  # each of them records at least one figure with a goal
        assert "goal=" in (BENCH / f"{name}.py").read_text(), name


def test_every_figure_of_issue_16_has_a_benchmark_that_records_it() -> None:
    """The page must carry each figure the issue lists; a bench that stops recording one fails here."""
    wanted = {
        "probe_throughput": [
            "blackbox_exporter's ({regime})",
            '("flat out", 0.0)',
            '("paced", target_rate)',
            "probes: rate",
            "start jitter",
            "peak RSS",
        ],
        "scale": ["scale: reconcile at", "scale: RSS at"],
        "failover_e2e": ["traffic moved p50", "traffic moved p95"],
        "detection_latency": ["detect: outage -> incident"],
        "sim_figures": ["sim: time to detect p50", "sim: time to detect p95", "false failovers"],
        "fanout": ["fan-out"],
    }
    for name, needles in wanted.items():
        assert name in run_all.BENCHES
        source = (BENCH / f"{name}.py").read_text()
        for needle in needles:
            assert needle in source, f"bench/{name}.py records no figure named like {needle!r}"
    assert "kube_store_loop" in run_all.BENCHES  # run when its branch is merged, "not run" until then


def test_record_writes_a_row_with_the_load_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "rows.jsonl"
    monkeypatch.setenv(figures.ENV, str(out))
    figures.record("x", 1.5, "s", goal="<= 2", met=True, anchor="a")
    figures.record("y", 3, "ms", better="higher")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {**rows[0], "name": "x", "value": 1.5, "goal": "<= 2", "met": True, "anchor": "a"}
    assert rows[1]["better"] == "higher" and "goal" not in rows[1]
    assert all(isinstance(r["load"], float) and r["load"] >= 0 for r in rows)
    monkeypatch.delenv(figures.ENV)
    figures.record("z", 1, "s")  # outside run_all: nothing written
    assert len(out.read_text().splitlines()) == 2


def test_from_json_renders_a_saved_summary_and_rejects_anything_else(tmp_path: Path) -> None:
    saved = tmp_path / "last.json"
    saved.write_text(
        json.dumps(
            {
                "date": "2026-11-29 20:40 UTC",
                "machine": {"cpu": "c", "cores": 2, "os": "o", "python": "3.11", "load_at_start": [1, 1, 1]},
                "mode": "quick",
                "figures": run_all.summarise(_rows()),
            }
        )
    )
    script = str(BENCH / "run_all.py")
    out = subprocess.run(
        [sys.executable, script, "--from-json", str(saved), "--markdown"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "`PYTHONPATH=. python bench/run_all.py --quick --markdown`" in out.stdout
    assert f"| {RATIO} | 0.240 ratio | 0.220-0.260 (3) | <= 0.25 | yes (2/3 runs) |" in out.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    out = subprocess.run([sys.executable, script, "--from-json", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "not a summary written by run_all.py" in out.stderr
    assert "Traceback" not in out.stderr
