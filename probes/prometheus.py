"""Prometheus probes: a PromQL instant query whose value must stay within a bound.

Some failures are only visible in aggregate (an error ratio creeping up, a queue backing up) and
the shop already measures them in Prometheus. A run asks `GET /api/v1/query` once and checks every
series the query returns against `expect.value`; the first series out of bounds is reported with
its labels, so the reason names the instance or region that is bad.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from probes.base import Check, ProbeResult, single_step
from probes.models import PrometheusExpect, PrometheusProbe


def _labels(metric: dict[str, str]) -> str:
    name = metric.get("__name__", "")
    rest = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{rest}}}" if rest or not name else name


def _number(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checks(data: dict[str, Any], expect: PrometheusExpect) -> tuple[list[Check], int, str]:
    """Checks over the `data` of a successful answer; also the series count, or an error."""
    kind = data.get("resultType")
    result = data.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        series: list[tuple[dict[str, Any], float]] = [({}, _number(result[1]))]
    elif kind == "vector" and isinstance(result, list):
        series = [
            (s.get("metric") or {}, _number((s.get("value") or [None, None])[1]))
            for s in result
            if isinstance(s, dict)
        ]
    elif kind == "matrix":
        return [], 0, "the query returns a range vector (matrix); use an instant vector, e.g. rate(x[5m])"
    else:
        return [], 0, f"unexpected result type {kind!r} from Prometheus; use a query that returns numbers"
    if not series:
        ok = expect.empty == "ok"
        wanted = "no series or values within bounds" if ok else "at least one series"
        found = "an empty result" + ("" if ok else " (does the query match any series? check its labels)")
        return [Check("result", ok, wanted, found)], 0, ""
    if expect.value is None:
        return [Check("result", True, "at least one series", f"{len(series)} series")], len(series), ""
    bound = expect.value
    for metric, value in series:
        if not bound.holds(value):
            where = f" for {_labels(metric)}" if metric else ""
            return [Check("value", False, bound.describe(), f"{value:g}{where}")], len(series), ""
    values = [v for _, v in series]
    found = (
        f"{values[0]:g}" if len(values) == 1 else f"{len(values)} series, {min(values):g} to {max(values):g}"
    )
    return [Check("value", True, bound.describe(), found)], len(series), ""


async def run(name: str, cfg: PrometheusProbe) -> ProbeResult:
    """One instant query, bounded by cfg.timeout; never raises."""
    import aiohttp  # here, not at the top: the config model above must load without it (issue 13)

    started_at = time.time()
    t0 = time.perf_counter()
    base = cfg.url.rstrip("/")
    request = f"PromQL {cfg.query!r} at {base}"
    endpoint = f"{base}/api/v1/query"
    try:
        async with asyncio.timeout(cfg.timeout):
            timeout = aiohttp.ClientTimeout(total=cfg.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(endpoint, params={"query": cfg.query}) as resp:
                    status = resp.status
                    ctype = resp.headers.get("Content-Type", "")
                    raw = await resp.read()
    except TimeoutError:
        took = time.perf_counter() - t0
        return single_step(
            name, started_at, t0, request, error=f"timed out after {took:.1f}s querying {endpoint}"
        )
    except aiohttp.ClientError as exc:
        msg = str(exc) or type(exc).__name__
        return single_step(name, started_at, t0, request, error=f"cannot reach Prometheus at {base}: {msg}")
    except ValueError as exc:  # a URL that does not parse
        return single_step(name, started_at, t0, request, error=f"bad url {cfg.url!r}: {exc}")
    text = raw.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or "status" not in doc:
            raise ValueError("not a Prometheus API answer")
    except ValueError:
        return single_step(
            name,
            started_at,
            t0,
            request,
            error=f"expected a Prometheus API answer (JSON) from {endpoint}, found HTTP {status} "
            f"{ctype or 'without a content type'}: {_short(text) or 'an empty body'!r} "
            "(is url the Prometheus base URL?)",
        )
    if doc.get("status") != "success":
        kind = doc.get("errorType") or "error"
        return single_step(
            name, started_at, t0, request, error=f"PromQL error ({kind}): {doc.get('error') or 'no message'}"
        )
    found = doc.get("data")
    data: dict[str, Any] = found if isinstance(found, dict) else {}
    checks, count, problem = _checks(data, cfg.expect)
    details = {"series": count, "query_seconds": round(time.perf_counter() - t0, 6)}
    return single_step(name, started_at, t0, request, tuple(checks), error=problem, details=details)
