"""Guards: conditions read from live data before a step changes production.

A guard never assumes: a value it cannot read (Prometheus down, no CloudWatch datapoints, a probe
not yet run) fails the guard, because failing over into a dead region or promoting a replica that
lost more data than the RPO allows is worse than waiting for a human.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import aiohttp

from controller.config import CloudWatchMetric, Guard, PromQuery
from controller.durations import format_duration
from controller.executors import ACTIONS, run_in
from playbooks.actions import ActionContext


@dataclass(frozen=True)
class GuardResult:
    ok: bool
    text: str
    value: float | None = None


async def prom_value(q: PromQuery, timeout: float = 5.0) -> float:
    """The first series' value of an instant query; raises LookupError with a human reason."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(f"{q.url.rstrip('/')}/api/v1/query", params={"query": q.query}) as resp:
                body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise LookupError(f"Prometheus at {q.url} unreadable: {type(exc).__name__}: {exc}") from None
    if body.get("status") != "success":
        raise LookupError(f"PromQL error: {body.get('errorType', '')}: {body.get('error', body)}")
    data = body.get("data", {})
    result = data.get("result")
    if data.get("resultType") == "scalar":
        return float(result[1])
    if not result:
        raise LookupError(f"query {q.query!r} returned no series")
    return float(result[0]["value"][1])


def cloudwatch_value(ctx: ActionContext, m: CloudWatchMetric) -> float:
    end = dt.datetime.now(dt.UTC)
    resp = ctx.aws("cloudwatch").get_metric_statistics(
        Namespace=m.namespace,
        MetricName=m.metric,
        Dimensions=[{"Name": k, "Value": v} for k, v in m.dimensions.items()],
        StartTime=end - dt.timedelta(seconds=m.window),
        EndTime=end,
        Period=int(m.period),
        Statistics=[m.statistic],
    )
    points = sorted(resp.get("Datapoints", []), key=lambda p: p["Timestamp"])
    if not points:
        raise LookupError(f"no CloudWatch datapoints for {m.namespace}/{m.metric} {m.dimensions}")
    return float(points[-1][m.statistic])


async def evaluate(guard: Guard, ctx: ActionContext) -> GuardResult:
    try:
        return await _evaluate(guard, ctx)
    except LookupError as exc:
        return GuardResult(False, f"cannot read the guard's value: {exc}")
    except Exception as exc:  # an AWS error reading a metric is a failed guard, not a crash
        return GuardResult(False, f"cannot read the guard's value: {type(exc).__name__}: {exc}")


async def _evaluate(guard: Guard, ctx: ActionContext) -> GuardResult:
    if guard.probes_healthy is not None:
        states = {p: ctx.probe_healthy(p) for p in guard.probes_healthy}
        bad = [f"{p} is {'unknown' if v is None else 'DOWN'}" for p, v in states.items() if v is not True]
        if bad:
            return GuardResult(False, "target not healthy: " + ", ".join(bad))
        return GuardResult(True, f"target healthy: {', '.join(guard.probes_healthy)} UP")
    if guard.replica_lag is not None:
        lag_cfg = guard.replica_lag
        limit = lag_cfg.max if lag_cfg.max is not None else ctx.variables.get("rpo_s")
        if limit is None:
            return GuardResult(False, "replica lag guard has no max and the service has no RPO")
        if lag_cfg.prometheus is not None:
            lag = await prom_value(lag_cfg.prometheus)
        else:
            assert lag_cfg.cloudwatch is not None
            lag = await run_in(ACTIONS, cloudwatch_value, ctx, lag_cfg.cloudwatch)
        ok = lag <= float(limit)
        verdict = "within" if ok else "OVER"
        return GuardResult(
            ok,
            f"replica lag {format_duration(lag)} {verdict} the limit of {format_duration(float(limit))}",
            lag,
        )
    assert guard.prometheus is not None
    value = await prom_value(guard.prometheus)
    ok = guard.prometheus.holds(value)
    return GuardResult(
        ok, f"{guard.prometheus.query} = {value:g}, expected {guard.prometheus.describe()}", value
    )


def describe(guard: Guard) -> str:
    if guard.probes_healthy is not None:
        return f"probes_healthy {guard.probes_healthy}"
    if guard.replica_lag is not None:
        return "replica_lag"
    return f"prometheus {guard.prometheus.query if guard.prometheus else ''}"


def explain(guard: Guard) -> str:
    """The guard as an operator reads it in a plan: what must hold before the step runs."""
    if guard.probes_healthy is not None:
        return f"probes UP: {', '.join(guard.probes_healthy)}"
    if guard.replica_lag is not None:
        lag = guard.replica_lag
        limit = f"at most {format_duration(lag.max)}" if lag.max is not None else "within the service's RPO"
        if lag.cloudwatch is not None:
            cw = lag.cloudwatch
            dims = ", ".join(f"{k}={v}" for k, v in cw.dimensions.items())
            source = f"CloudWatch {cw.namespace} {cw.metric}" + (f" {{{dims}}}" if dims else "")
        else:
            source = f"Prometheus `{lag.prometheus.query if lag.prometheus else ''}`"
        return f"replica lag {limit} ({source})"
    prom = guard.prometheus
    assert prom is not None
    return f"Prometheus `{prom.query}` {prom.describe()}"


def summary(results: list[tuple[Guard, GuardResult]]) -> dict[str, Any]:
    return {describe(g): {"ok": r.ok, "text": r.text, "value": r.value} for g, r in results}
