"""Run any configured probe once. The one entry point the controller and the CLI use."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from probes import dns, prometheus, tcp, tls
from probes.base import ProbeResult, failure
from probes.http import run_journey


async def _journey(name: str, cfg: Any) -> ProbeResult:
    """http and transaction probes: a journey of one step or several, on aiohttp."""
    return await run_journey(name, cfg.journey(name), cfg.vars, cfg.timeout)


#: kind -> how to run it once. Every function takes (name, cfg), bounds itself by cfg.timeout and
#: returns a ProbeResult; a new kind is one module and one line here (and one in config's union).
RUNNERS: dict[str, Callable[[str, Any], Awaitable[ProbeResult]]] = {
    "http": _journey,
    "transaction": _journey,
    "tcp": tcp.run,
    "dns": dns.run,
    "tls": tls.run,
    "prometheus": prometheus.run,
}


async def run_probe(name: str, cfg: Any, vantage: str = "local") -> ProbeResult:
    """Never raises and never hangs: a bug or a stuck target becomes a failed result."""
    started = time.time()
    t0 = time.perf_counter()
    runner = RUNNERS.get(cfg.kind)
    if runner is None:
        return failure(name, started, 0.0, f"probe error: no runner for kind {cfg.kind!r}")
    try:
        async with asyncio.timeout(cfg.timeout + 1.0):  # the kind's own deadline is cfg.timeout
            result = await runner(name, cfg)
    except TimeoutError:
        return failure(name, started, time.perf_counter() - t0, f"timed out after {cfg.timeout:g}s")
    except Exception as exc:
        return failure(name, started, time.perf_counter() - t0, f"probe error: {type(exc).__name__}: {exc}")
    slo = getattr(cfg, "latency_slo", None)
    if result.ok and slo is not None and result.latency > slo:
        result = replace(
            result,
            ok=False,
            error=f"slower than its latency SLO: {result.latency * 1000:.0f}ms > {slo * 1000:.0f}ms",
            details={**result.details, "degraded": True},
        )
    if vantage != "local":
        result = replace(result, vantage=vantage)
    return result
