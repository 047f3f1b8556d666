"""Run every benchmark, one after the other, and print their figures.

    PYTHONPATH=. python bench/run_all.py            # the full set (about 10 minutes)
    PYTHONPATH=. python bench/run_all.py --quick    # shorter runs of the same (about 3 minutes)
    PYTHONPATH=. python bench/run_all.py --only detection_latency fanout

Each benchmark runs in its own process, so none sees another's memory or CPU. Exit status 1 if any
of them failed (a missed goal in probe_throughput counts as a failure there).

It ends with one page of figures: every figure the benchmarks `record` (bench/figures.py), as the
median of its repeated runs with min and max, beside its goal and its anchor (what the systems
users compare us with do), and the change since the last run. The same table is written as JSON
(`--json`, default bench/results/last.json; the run before is kept as previous.json) so that a run
can be compared with the last one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: name -> (full arguments, quick arguments, runs in full mode)
BENCHES: dict[str, tuple[list[str], list[str], int]] = {
    # The probe cost ratio moves by a few hundredths from run to run: its goal is judged on a median.
    "probe_throughput": ([], ["--probes", "2000", "--interval", "3", "--duration", "20"], 3),
    "detection_latency": (["--runs", "60"], ["--runs", "20"], 1),
    "failover_e2e": (["--runs", "20"], ["--runs", "5"], 1),
    "scale": (["--sizes", "1000", "5000", "20000"], ["--sizes", "1000", "5000"], 1),
    "fanout": (["--messages", "2000"], ["--messages", "500"], 1),
    "kube_store_loop": ([], ["--seconds", "12"], 1),
}

_GOAL = re.compile(r"^\s*(<=|>=|<|>)\s*([-+0-9.eE]+)")


def meets(goal: str | None, value: float) -> bool | None:
    """Judge a goal written as text ("<= 0.25") against a value; None where there is no goal."""
    m = _GOAL.match(goal or "")
    if not m:
        return None
    op, limit = m.group(1), float(m.group(2))
    return {"<=": value <= limit, "<": value < limit, ">=": value >= limit, ">": value > limit}[op]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per figure: median, min and max over the runs that recorded it, in first-seen order."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    out = []
    for name, rs in by_name.items():
        values = [r["value"] for r in rs]
        first = rs[0]
        median = statistics.median(values)
        goal = next((r["goal"] for r in rs if r.get("goal")), None)
        out.append(
            {
                "name": name,
                "unit": first["unit"],
                "better": first.get("better", "lower"),
                "median": median,
                "min": min(values),
                "max": max(values),
                "runs": len(values),
                "goal": goal,
                "met": meets(goal, median),
                "anchor": next((r["anchor"] for r in rs if r.get("anchor")), None),
            }
        )
    return out


def _num(v: float) -> str:
    return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"


def table(figures: list[dict[str, Any]], previous: dict[str, dict[str, Any]]) -> str:
    """The one page of figures, as a Markdown table (the README's performance section is this)."""
    lines = [
        "| figure | median (min-max, runs) | goal | met | anchor | since last run |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        spread = f"{_num(f['min'])}-{_num(f['max'])}, {f['runs']}" if f["runs"] > 1 else "1 run"
        met = {True: "yes", False: "**no**", None: ""}[f["met"]]
        delta = ""
        if f["name"] in previous and previous[f["name"]].get("median"):
            before = previous[f["name"]]["median"]
            change = (f["median"] - before) / abs(before) * 100
            worse = change > 0 if f["better"] == "lower" else change < 0
            delta = f"{change:+.0f}%" + (" (worse)" if worse and abs(change) >= 10 else "")
        lines.append(
            f"| {f['name']} | {_num(f['median'])} {f['unit']} ({spread}) | {f['goal'] or ''} | {met} "
            f"| {f['anchor'] or ''} | {delta} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (fewer samples, smaller sizes)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these")
    ap.add_argument("--repeat", type=int, help="runs of each benchmark (default: 3 for probe_throughput "
                    "in full mode, else 1)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=HERE / "results" / "last.json",
                    help="the summary's file (the one there before becomes previous.json)")  # fmt: skip
    args = ap.parse_args()
    env = {**os.environ}
    root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    figures_file = args.json.with_suffix(".rows.jsonl")
    figures_file.unlink(missing_ok=True)
    env["CONTINUITY_BENCH_FIGURES"] = str(figures_file)
    failed: list[str] = []
    started = time.monotonic()
    mode = "quick" if args.quick else "full"
    print(f"Continuity benchmarks ({mode} mode), {time.strftime('%Y-%m-%d %H:%M:%S')}\n", flush=True)
    for name, (full, quick, runs) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else full)]
        repeat = args.repeat or (1 if args.quick else runs)
        for i in range(repeat):
            print(f"$ python bench/{name}.py {' '.join(cmd[2:])}  [run {i + 1} of {repeat}]", flush=True)
            t = time.monotonic()
            rc = subprocess.call(cmd, env=env, cwd=root)
            print(f"[{name}: exit {rc}, {time.monotonic() - t:.0f} s]\n", flush=True)
            if rc != 0 and name not in failed:
                failed.append(name)
    rows = []
    if figures_file.exists():
        rows = [json.loads(line) for line in figures_file.read_text().splitlines() if line.strip()]
        figures_file.unlink()
    figures = summarise(rows)
    previous: dict[str, dict[str, Any]] = {}
    if args.json.exists():
        try:
            previous = {f["name"]: f for f in json.loads(args.json.read_text())["figures"]}
        except (ValueError, KeyError, TypeError):
            previous = {}
        args.json.replace(args.json.with_name("previous.json"))
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        "mode": mode,
        "figures": figures,
    }
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"== One page of figures ({summary['date']}; {summary['machine']}) ==")
    print(table(figures, previous))
    print(f"(written to {args.json}; compared with the run before it where one existed)\n")
    print(
        f"all done in {time.monotonic() - started:.0f} s ({mode} mode); "
        + (f"FAILED: {', '.join(failed)}" if failed else "every benchmark ran")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
