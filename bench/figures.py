"""One way for every benchmark to hand its figures to `run_all.py`'s summary table.

A benchmark prints its own report for a human, then calls `record` for each figure that belongs on
the one page of figures. Outside `run_all.py` (no CONTINUITY_BENCH_FIGURES in the environment)
`record` does nothing, so each script still runs on its own exactly as before.
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "CONTINUITY_BENCH_FIGURES"


def record(
    name: str,
    value: float,
    unit: str,
    *,
    goal: str | None = None,
    met: bool | None = None,
    anchor: str | None = None,
    better: str = "lower",
) -> None:
    """Append one figure as a JSON line to the file run_all.py names.

    `goal` is the target as text ("<= 0.25"), `met` whether this run reached it, `anchor` what the
    systems users compare us with do (a published or measured figure), `better` "lower" or "higher"
    so a comparison with the last run can say whether a change is a regression.
    """
    path = os.environ.get(ENV)
    if not path:
        return
    row: dict[str, Any] = {"name": name, "value": float(value), "unit": unit, "better": better}
    # The machine may be shared: the 1-minute load average when the figure was taken goes with it.
    row["load"] = round(os.getloadavg()[0], 2)
    if goal is not None:
        row["goal"] = goal
    if met is not None:
        row["met"] = bool(met)
    if anchor is not None:
        row["anchor"] = anchor
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
