"""The drill report (Markdown, JSON and a PNG timeline) and the drill results kept in the store.

The latest result of each scenario is a store flag `drill:<scenario>` holding a small JSON summary,
so the continuity plan reads it from wherever the controller keeps its state (SQLite or Kubernetes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from controller.drills.drill import DrillResult
from controller.durations import format_duration
from controller.report import NO_CHART, Doc, charts_available
from controller.stores import Store

MEASURES = [
    ("detect_s", "Time to detect"),
    ("first_page_s", "Time to first page"),
    ("first_customer_update_s", "Time to first customer update"),
    ("traffic_moved_s", "Time to traffic moved"),
    ("recover_s", "Time to recovery"),
    ("data_loss_s", "Data-loss window"),
]


def _d(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(max(seconds, 0.0))


def mark_lanes(marks: dict[str, float], span: float, min_gap: float = 0.045) -> list[tuple[str, float, int]]:
    """Give each key moment a lane so that two badges closer than `min_gap` of the chart's width
    never share one: (label, x, lane), in time order. Pure, so the layout is tested on its own."""
    placed: list[tuple[str, float, int]] = []
    last_x: dict[int, float] = {}
    for label, x in sorted(marks.items(), key=lambda m: (m[1], m[0])):
        lane = 0
        while lane in last_x and x - last_x[lane] < min_gap * span:
            lane += 1
        last_x[lane] = x
        placed.append((label, x, lane))
    return placed


def chart(result: DrillResult, path: Path) -> list[Any]:
    """Probe verdicts (1 up, 0 down) over the drill, key moments marked, the RTO drawn if in view.

    Key moments cluster within a second of each other (detected, paged, confirmed), so their names
    never sit on the plot: each is a numbered badge on its line, badges that would touch go to a
    higher lane, and the names are in a key under the chart. Returns the badges' and the key's
    text artists, which a test checks for overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([5.0, *result.marks.values(), *(t for s in result.series.values() for t, _ in s)]) + 2
    placed = mark_lanes(result.marks, end + 1.5)
    lanes = max((lane for _, _, lane in placed), default=0) + 1
    key_rows = (len(placed) + 1) // 2
    row_in, key_in = 0.2, 0.15 + 0.2 * key_rows  # the key's rows, in inches
    height = 2.9 + key_in
    fig = plt.figure(figsize=(9, height), dpi=100)
    bottom = (key_in + 0.5) / height
    ax = fig.add_axes((0.08, bottom, 0.9, 1 - bottom - 0.35 / height))
    for n, (probe, points) in enumerate(sorted(result.series.items())):
        pts = [*points, (end, points[-1][1])]
        ax.step([t for t, _ in pts], [v + n * 0.03 for _, v in pts], where="post", label=probe)
    top = 1.12 + 0.14 * lanes
    texts = []
    for n, (_label, x, lane) in enumerate(placed, 1):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.7, zorder=0)
        texts.append(
            ax.text(
                x,
                1.14 + 0.14 * lane,
                str(n),
                fontsize=7,
                ha="center",
                va="bottom",
                color="white",
                bbox={"boxstyle": "circle,pad=0.25", "facecolor": "#334155", "edgecolor": "none"},
            )
        )
    rto = f"RTO {format_duration(result.rto_s)}"
    if result.expected == "failover" and result.rto_s <= end:
        ax.axvline(result.rto_s, color="red", linewidth=1.2)
        ax.text(result.rto_s, -0.12, rto, color="red", fontsize=7)
    else:
        rto += " (beyond the chart)" if result.expected == "failover" else " (not applicable)"
    ax.set_xlim(-1.5, end)
    ax.set_ylim(-0.15, top + 0.12)
    ax.set_yticks([0, 1], ["down", "up"])
    ax.set_xlabel("seconds since the fault was injected", fontsize=8)
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    verdict = "PASSED" if result.passed else "FAILED"
    ax.set_title(f"drill {result.scenario}: {verdict}; {rto}", fontsize=9, loc="left")
    if result.series:
        ax.legend(loc="lower right", fontsize=7, frameon=False)
    for n, (label, x, _lane) in enumerate(placed):
        col, row = divmod(n, key_rows)
        texts.append(
            fig.text(
                0.08 + 0.46 * col,
                (key_in - 0.1 - row * row_in) / height,
                f"{n + 1}  {label} at {format_duration(max(x, 0.0)) if x > 0 else '0s'}",
                fontsize=8,
                va="top",
            )
        )
    fig.savefig(path, format="png")
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in texts]
    plt.close(fig)
    return boxes


def write(result: DrillResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"drill-{result.scenario}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(result.started_at))}"
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    png = out / f"{stem}.png" if charts_available() else None
    if png is not None:
        chart(result, png)
    result.files = [str(md), str(js)] + ([str(png)] if png is not None else [])
    doc = Doc()
    doc.heading(f"Drill report: {result.title} ({result.scenario})", 1)
    doc.bullets(
        [
            f"Result: {'PASSED' if result.passed else 'FAILED'}"
            + (f" (missed: {', '.join(o.name for o in result.missed())})" if not result.passed else ""),
            f"Mode: {result.mode}" + (" (dry run: nothing was changed)" if result.mode == "target" else ""),
            f"Run at: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(result.started_at))}; took "
            f"{result.wall_s}s",
            f"Service: {result.service}; RTO {format_duration(result.rto_s)}; "
            f"RPO {format_duration(result.rpo_s)}",
            f"Right outcome: {result.right_outcome}",
            f"What happened: {result.outcome}",
        ]
    )
    if png is not None:
        doc.image(png.name, "probe verdicts over the drill, key moments marked")
    else:
        doc.para(NO_CHART)
    doc.heading("Objectives")
    doc.table(
        ["Objective", "Target", "Actual", "Result"],
        [[o.name, o.target, o.actual, "pass" if o.passed else "FAIL"] for o in result.objectives],
    )
    doc.heading("Times (from the fault)")
    doc.table(
        ["Measure", "Time", "Against"],
        [
            [
                label,
                _d(result.measures.get(key)),
                f"RPO {format_duration(result.rpo_s)}"
                if key == "data_loss_s"
                else f"RTO {format_duration(result.rto_s)}",
            ]
            for key, label in MEASURES
        ],
    )
    for title, items in (
        ("Actions taken", result.actions_taken),
        ("Actions wrongly taken", result.actions_wrongly_taken),
        ("Messages sent", result.messages_sent),
        ("Drill notes", result.notes),
    ):
        doc.heading(title)
        if items:
            doc.bullets(items)
        else:
            doc.para("None.")
    md.write_text("\n".join(doc.md), encoding="utf-8")
    js.write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return [md, js] if png is None else [md, js, png]


# ------------------------------------------------------------------ kept in the store


def summary(result: DrillResult) -> dict[str, Any]:
    return {
        "scenario": result.scenario,
        "title": result.title,
        "mode": result.mode,
        "passed": result.passed,
        "at": result.started_at,
        "expected": result.expected,
        "outcome": result.outcome,
        "missed": [o.name for o in result.missed()],
        "measures": result.measures,
        "report": result.files[0] if result.files else None,
    }


def record(store: Store, result: DrillResult) -> None:
    store.set_flag(f"drill:{result.scenario}", json.dumps(summary(result)))


def latest(store: Store) -> dict[str, dict[str, Any]]:
    """Scenario -> the summary of its latest drill."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in store.flags("drill:").items():
        try:
            out[key.removeprefix("drill:")] = json.loads(value)
        except ValueError:
            continue
    return out


def table(results: list[DrillResult]) -> str:
    head = [
        "scenario",
        "expected",
        "outcome",
        "detect",
        "page",
        "moved",
        "recover",
        "RTO",
        "loss",
        "RPO",
        "result",
    ]
    rows = [
        [
            r.scenario,
            r.expected,
            r.outcome,
            _d(r.measures["detect_s"]),
            _d(r.measures["first_page_s"]),
            _d(r.measures["traffic_moved_s"]),
            _d(r.measures["recover_s"]),
            format_duration(r.rto_s),
            _d(r.measures["data_loss_s"]),
            format_duration(r.rpo_s),
            ("PASS" if r.passed else "FAIL: " + ", ".join(o.name for o in r.missed())) + f" ({r.wall_s}s)",
        ]
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
