"""Run any configured probe once. The one entry point the controller and the CLI use.

Plain `kind: http` probes on http:// with no templating take the fast path (`probes.fasthttp`:
asyncio streams + httptools, several times cheaper per fresh connection); everything else — https,
templates, transactions, redirects — runs on aiohttp (`probes.http.run_journey`). Both return the
same ProbeResult shape, so nothing downstream can tell which path ran.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from probes import dns, prometheus, tcp, tls
from probes.base import ProbeResult, failure, prober_error_of
from probes.fasthttp import Plan, build_plan, eligible, run_fast
from probes.http import run_journey

# A compiled request per probe config, keyed by id() with the config kept alive alongside so an id
# can never be reused by another object while its entry exists. Bounded: a config reload that
# replaces every probe just starts a fresh cache.
_PLANS: dict[int, tuple[Any, Plan | None]] = {}
_PLANS_MAX = 200_000


def _plan_for(cfg: Any) -> Plan | None:
    entry = _PLANS.get(id(cfg))
    if entry is not None and entry[0] is cfg:
        return entry[1]
    plan = build_plan(cfg) if eligible(cfg) else None
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[id(cfg)] = (cfg, plan)
    return plan


def prepare(probes: Mapping[str, Any]) -> int:
    """Build the fast path's plan of every http probe now rather than at its first run.

    A plan (URL parsed, address checked, request bytes built) costs about 28 us; at 20,000 probes
    that is over half a second of CPU, which the first interval after a start or a reload would
    otherwise pay run by run. Meant for a worker thread: a plan is pure CPU and the cache tolerates
    a run building the same plan at the same moment (both are equal; the last one stays)."""
    built = 0
    for cfg in list(probes.values()):
        if getattr(cfg, "kind", None) == "http":
            _plan_for(cfg)
            built += 1
    return built


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
        plan = _plan_for(cfg) if cfg.kind == "http" else None
        if plan is not None:
            # run_fast bounds itself by cfg.timeout with one timer; a second, outer one here would
            # be a measurable share of a ~150 us probe. Its redirect fallback is bounded too.
            result = await run_fast(name, cfg, plan)
        else:
            async with asyncio.timeout(cfg.timeout + 1.0):  # the kind's own deadline is cfg.timeout
                result = await runner(name, cfg)
    except TimeoutError:
        return failure(name, started, time.perf_counter() - t0, f"timed out after {cfg.timeout:g}s")
    except Exception as exc:
        took = time.perf_counter() - t0
        return failure(name, started, took, f"probe error: {type(exc).__name__}: {exc}", prober_error_of(exc))
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
