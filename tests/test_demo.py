"""`continuity demo` end to end: the whole chain, checked from the outside by the demo itself."""

from __future__ import annotations

import asyncio
import io
import re

from controller.demo.scenario import run_demo


def test_demo_recovers_checkout():
    out = io.StringIO()
    result = asyncio.run(run_demo(out=out))
    text = out.getvalue()
    assert result.ok, text
    assert result.checks and all(ok for _, ok, _ in result.checks), text
    names = [name for name, _, _ in result.checks]
    assert "Route 53 record points at the secondary" in names and "Aurora writer moved" in names
    assert result.time_to_detect is not None and 1.0 <= result.time_to_detect <= 6.0, text
    assert result.time_to_recover is not None and result.time_to_recover < 30.0, text
    assert result.incident_id and result.incident_id.startswith("INC-")
    assert "OUTAGE INJECTED" in text
    assert re.search(rf"incident {re.escape(result.incident_id)} opened, severity CRITICAL", text), text
    assert re.search(r"step switch-dns done in .*now 127\.0\.0\.3", text), text
    assert f"incident {result.incident_id} resolved" in text
    assert "Time to detect:" in text and "Time to recover:" in text
    assert "Demo PASSED" in text
