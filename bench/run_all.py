"""Run every benchmark, one after the other, and print their figures on one page.

    PYTHONPATH=. python bench/run_all.py              # the full set
    PYTHONPATH=. python bench/run_all.py --quick      # shorter runs of the same
    PYTHONPATH=. python bench/run_all.py --markdown   # ... ending with the README's performance table
    PYTHONPATH=. python bench/run_all.py --only detection_latency fanout
    PYTHONPATH=. python bench/run_all.py --from-json bench/results/last.json --markdown   # no run

Each benchmark runs in its own process, so none sees another's memory or CPU. Exit status 1 if any
of them failed (stopped without recording a figure) or any figure's median misses its goal. A run of
a repeated benchmark that misses its goal on its own (probe_throughput exits 1 then) is not a
failure: the goal is judged on the median, and the page says in how many runs it was met. A
benchmark whose script is not there (one another branch adds) is reported as not run, never as a
failure.

It ends with one page of figures: every figure the benchmarks `record` (bench/figures.py), as the
median of its repeated runs with min and max, beside its goal (judged on the median) and its anchor
(what the systems users compare us with do), the load average while it was measured (the machine
may be shared), and the change since the last run. The same summary is written as JSON (`--json`,
default bench/results/last.json; the run before is kept as previous.json) so that a run can be
compared with the last one. `--markdown` prints it as the README's performance section: the date,
the machine (CPU model, cores, Python, load average at the start) and the table.
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
#: In full mode every benchmark with a goal runs three times and its goal is judged on the median
#: (the probe cost ratio moves by a few hundredths from run to run, a p95 of 20 outages by a few
#: tenths of a second); sim_figures is deterministic and fanout has no goal: once each.
BENCHES: dict[str, tuple[list[str], list[str], int]] = {
    # The aiohttp comparison is left to the script run on its own: it is not on the page of figures.
    "probe_throughput": (
        ["--skip-aiohttp"],
        ["--probes", "2000", "--interval", "3", "--duration", "20", "--skip-aiohttp"],
        3,
    ),
    "detection_latency": (["--runs", "60"], ["--runs", "20"], 3),
    "sim_figures": (["--days", "30", "--phases", "20"], ["--days", "3", "--phases", "8"], 1),
    "failover_e2e": (["--runs", "20"], ["--runs", "5"], 3),
    "scale": (["--sizes", "1000", "5000", "20000"], ["--sizes", "1000", "5000"], 3),
    "fanout": (["--messages", "2000"], ["--messages", "500"], 1),
    "kube_store_loop": ([], ["--seconds", "12"], 3),
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
    """One entry per figure: median, min and max over the runs that recorded it, in first-seen order.

    The goal is judged on the median, never on the best run; `met_runs` says in how many of the
    runs it was met on its own (a median that meets the goal with one run far off is worth knowing).
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    out = []
    for name, rs in by_name.items():
        values = [float(r["value"]) for r in rs]
        first = rs[0]
        median = statistics.median(values)
        goal = next((r["goal"] for r in rs if r.get("goal")), None)
        loads = [float(r["load"]) for r in rs if r.get("load") is not None]
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
                "met_runs": sum(1 for v in values if meets(goal, v)) if goal else None,
                "anchor": next((r["anchor"] for r in rs if r.get("anchor")), None),
                "load_min": min(loads) if loads else None,
                "load_max": max(loads) if loads else None,
            }
        )
    return out


def _num(v: float) -> str:
    return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"


def _load(f: dict[str, Any]) -> str:
    lo, hi = f.get("load_min"), f.get("load_max")
    if lo is None or hi is None:
        return ""
    return f"{lo:.1f}" if round(lo, 1) == round(hi, 1) else f"{lo:.1f}-{hi:.1f}"


def _met(f: dict[str, Any]) -> str:
    met = {True: "yes", False: "**no**", None: ""}[f["met"]]
    if f["met"] is not None and f["runs"] > 1 and f.get("met_runs") is not None:
        met += f" ({f['met_runs']}/{f['runs']} runs)"
    return met


def _delta(f: dict[str, Any], previous: dict[str, dict[str, Any]]) -> str:
    before = previous.get(f["name"], {}).get("median")
    if not before:
        return ""
    change = (f["median"] - before) / abs(before) * 100
    worse = change > 0 if f["better"] == "lower" else change < 0
    return f"{change:+.0f}%" + (" (worse)" if worse and abs(change) >= 10 else "")


def table(figures: list[dict[str, Any]], previous: dict[str, dict[str, Any]] | None = None) -> str:
    """The one page of figures as a Markdown table; with `previous`, the change since that run."""
    cols = ["figure", "median", "min-max (runs)", "goal", "met", "anchor", "load avg"]
    if previous is not None:
        cols.append("since last run")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for f in figures:
        spread = f"{_num(f['min'])}-{_num(f['max'])} ({f['runs']})" if f["runs"] > 1 else "(1)"
        cells = [
            f["name"],
            f"{_num(f['median'])} {f['unit']}",
            spread,
            f["goal"] or "",
            _met(f),
            f["anchor"] or "",
            _load(f),
        ]
        if previous is not None:
            cells.append(_delta(f, previous))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    load = os.getloadavg()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_at_start": [round(x, 2) for x in load],
    }


def markdown(summary: dict[str, Any]) -> str:
    """The README's performance section: date, machine, the command, and the table of figures."""
    m = summary["machine"]
    load = m.get("load_at_start") or [float("nan")] * 3
    took = summary.get("took_s")
    cmd = "PYTHONPATH=. python bench/run_all.py" + (" --quick" if summary.get("mode") == "quick" else "")
    if summary.get("only"):
        cmd += " --only " + " ".join(summary["only"])
    lines = [
        f"Measured {summary['date']} with `{cmd} --markdown` ({summary.get('mode', 'full')} mode"
        + (f", {took / 60:.0f} min" if took else "")
        + f") on {m['cpu']}, {m['cores']} cores, {m['os']}, Python {m['python']}; load average at the "
        f"start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min).",
        "",
        "Each figure is the median over its runs (min-max and the number of runs beside it); a goal is "
        'judged on the median. "load avg" is the 1-minute load average when the figure was taken.',
        "",
        table(summary["figures"]),
    ]
    if summary.get("not_run"):
        lines += [
            "",
            "Not run (script not present): " + ", ".join(f"`{n}`" for n in summary["not_run"]) + ".",
        ]
    if summary.get("failed"):
        lines += ["", "Failed (see their output): " + ", ".join(f"`{n}`" for n in summary["failed"]) + "."]
    return "\n".join(lines)


def plan(
    benches: dict[str, tuple[list[str], list[str], int]],
    here: Path,
    *,
    quick: bool,
    only: list[str] | None,
    repeat: int | None,
) -> tuple[list[tuple[str, list[str], int]], list[str]]:
    """What to run: (name, arguments, runs) for each script present, and the names of those missing."""
    todo: list[tuple[str, list[str], int]] = []
    missing: list[str] = []
    for name, (full, short, runs) in benches.items():
        if only and name not in only:
            continue
        if not (here / f"{name}.py").exists():
            missing.append(name)
            continue
        todo.append((name, short if quick else full, repeat or (1 if quick else runs)))
    return todo, missing


def failed_run(rc: int, recorded: int) -> bool:
    """A run failed if it stopped with an error before recording any figure. One that recorded its
    figures and exits 1 missed a goal in that run: its figures go to the median like the others."""
    return rc != 0 and (rc != 1 or recorded == 0)


def _rows_in(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def load_previous(path: Path) -> dict[str, dict[str, Any]]:
    try:
        return {f["name"]: f for f in json.loads(path.read_text())["figures"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (fewer samples, smaller sizes)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these")
    ap.add_argument("--repeat", type=int, help="runs of each benchmark (default: 3 in full mode for each "
                    "with a goal, else 1)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=HERE / "results" / "last.json",
                    help="the summary's file (the one there before becomes previous.json)")  # fmt: skip
    ap.add_argument("--markdown", action="store_true",
                    help="end with the README's performance section (date, machine, table)")  # fmt: skip
    ap.add_argument("--from-json", type=Path, metavar="PATH",
                    help="run nothing: print the page of figures of a summary written before")  # fmt: skip
    args = ap.parse_args()

    if args.from_json is not None:
        try:
            summary = json.loads(args.from_json.read_text())
            _ = summary["figures"], summary["machine"], summary["date"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{args.from_json}: not a summary written by run_all.py ({exc})", file=sys.stderr)
            return 2
        print(markdown(summary) if args.markdown else table(summary["figures"]))
        return 0

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
    host = machine()  # the load average before any benchmark adds to it
    date = time.strftime("%Y-%m-%d %H:%M %Z")
    todo, missing = plan(BENCHES, HERE, quick=args.quick, only=args.only, repeat=args.repeat)
    print(f"Continuity benchmarks ({mode} mode), {date}; load average {host['load_at_start']}\n", flush=True)
    took: dict[str, float] = {}
    for name, bench_args, repeat in todo:
        cmd = [sys.executable, str(HERE / f"{name}.py"), *bench_args]
        for i in range(repeat):
            print(f"$ python bench/{name}.py {' '.join(bench_args)}  [run {i + 1} of {repeat}]", flush=True)
            t = time.monotonic()
            before = _rows_in(figures_file)
            rc = subprocess.call(cmd, env=env, cwd=root)
            took[name] = took.get(name, 0.0) + time.monotonic() - t
            recorded = _rows_in(figures_file) - before
            missed = ""
            if rc and not failed_run(rc, recorded):
                missed = " (a goal missed in this run; judged on the median)"
            print(f"[{name}: exit {rc}, {time.monotonic() - t:.0f} s{missed}]\n", flush=True)
            if failed_run(rc, recorded) and name not in failed:
                failed.append(name)
    for name in missing:
        print(f"[{name}: not run, bench/{name}.py is not there]\n", flush=True)
    rows = []
    if figures_file.exists():
        rows = [json.loads(line) for line in figures_file.read_text().splitlines() if line.strip()]
        figures_file.unlink()
    previous = load_previous(args.json)
    if args.json.exists():
        args.json.replace(args.json.with_name("previous.json"))
    summary = {
        "date": date,
        "machine": host,
        "mode": mode,
        "only": args.only or [],
        "took_s": round(time.monotonic() - started),
        "took_per_bench_s": {k: round(v) for k, v in took.items()},
        "not_run": missing,
        "failed": failed,
        "figures": summarise(rows),
    }
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"== One page of figures ({date}; {host['cpu']}, {host['cores']} cores, Python {host['python']}) =="
    )
    print(table(summary["figures"], previous))
    print(f"(written to {args.json}; 'since last run' compares with the run before it where one existed)\n")
    missed_goals = [f["name"] for f in summary["figures"] if f["met"] is False]
    print(
        f"all done in {summary['took_s']} s ({mode} mode; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
        + "); "
        + (f"FAILED: {', '.join(failed)}" if failed else "every benchmark present ran")
        + (f"; goals missed (median): {'; '.join(missed_goals)}" if missed_goals else "; every goal met")
        + (f"; not run: {', '.join(missing)}" if missing else "")
    )
    if args.markdown:
        print("\n---- README performance section (Markdown) ----\n")
        print(markdown(summary))
    return 1 if failed or missed_goals else 0


if __name__ == "__main__":
    sys.exit(main())
