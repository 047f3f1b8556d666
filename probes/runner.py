"""Run any configured probe once. The one entry point the controller and the CLI use."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from probes.base import ProbeResult, failure
from probes.http import run_journey


async def run_probe(name: str, cfg: Any, vantage: str = "local") -> ProbeResult:
    """Never raises and never hangs: a bug or a stuck target becomes a failed result."""
    started = time.time()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(cfg.timeout + 1.0):  # the kind's own deadline is cfg.timeout
            result = await run_journey(name, cfg.journey(name), cfg.vars, cfg.timeout)
    except TimeoutError:
        return failure(name, started, time.perf_counter() - t0, f"timed out after {cfg.timeout:g}s")
    except Exception as exc:
        return failure(name, started, time.perf_counter() - t0, f"probe error: {type(exc).__name__}: {exc}")
    if vantage != "local":
        from dataclasses import replace

        result = replace(result, vantage=vantage)
    return result
