"""HTTP probes and transaction journeys, on aiohttp.

A plain HTTP probe is a journey of one step, so both kinds share one runner: the same
expectations, the same timeout handling and the same failure sentences. Each run gets a fresh
session (fresh connection, empty cookie jar) so one probe's state never leaks into the next.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import aiohttp
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import Field

from controller.durations import Duration
from probes.base import (
    Expect,
    Extract,
    Observed,
    ProbeResult,
    StepResult,
    Strict,
    evaluate,
    extract,
)

_TEMPLATES = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class ProbeCommon(Strict):
    """Fields every probe kind has."""

    description: str = ""
    interval: Duration = Field(default=10.0, gt=0, description="How often the probe runs, e.g. 10s.")
    timeout: Duration = Field(default=3.0, gt=0, description="Whole-run deadline; a hang is a failure.")
    failure_threshold: int | None = Field(
        default=None, ge=1, description="Consecutive failures before DOWN (default: detection section)."
    )
    success_threshold: int | None = Field(
        default=None, ge=1, description="Consecutive successes before UP again (default: detection section)."
    )
    impact: Literal["down", "degraded"] = Field(
        default="down", description="What this probe failing means for its services."
    )


class RequestSpec(Strict):
    """One HTTP request. Strings may use {{ var }} from `vars` and earlier extractions."""

    method: str = "GET"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    json_body: Any = Field(default=None, alias="json")
    expect: Expect = Field(default_factory=Expect)


class Step(RequestSpec):
    name: str
    extract: dict[str, Extract] = Field(default_factory=dict, description="Values for later steps.")
    timeout: Duration | None = Field(default=None, gt=0, description="Per-step deadline.")


class HttpProbe(ProbeCommon, RequestSpec):
    """A single request with expectations on status, latency, body and JSON fields."""

    kind: Literal["http"]
    vars: dict[str, Any] = Field(default_factory=dict)

    def journey(self, name: str) -> list[Step]:
        fields = RequestSpec.model_fields.keys()
        return [Step(name=name, **{k: getattr(self, k) for k in fields})]


class TransactionProbe(ProbeCommon):
    """A scripted user journey: ordered steps sharing one session (cookies) and extracted values."""

    kind: Literal["transaction"]
    vars: dict[str, Any] = Field(default_factory=dict, description="Values for {{ }} templates.")
    steps: list[Step] = Field(min_length=1)
    timeout: Duration = Field(default=10.0, gt=0)

    def journey(self, name: str) -> list[Step]:
        return self.steps


def _render(value: Any, ctx: dict[str, Any]) -> Any:
    if isinstance(value, str):
        if "{{" not in value and "{%" not in value:
            return value
        return _TEMPLATES.from_string(value).render(ctx)
    if isinstance(value, dict):
        return {k: _render(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, ctx) for v in value]
    return value


async def _exchange(
    session: aiohttp.ClientSession, step: Step, ctx: dict[str, Any], timeout: float | None
) -> tuple[StepResult, Observed | None]:
    start = time.perf_counter()
    try:
        url = _render(step.url, ctx)
        headers = _render(step.headers, ctx)
        body = _render(step.body, ctx)
        json_body = _render(step.json_body, ctx)
    except TemplateError as exc:
        return StepResult(step.name, False, 0.0, error=f"template error: {exc}"), None
    request = f"{step.method.upper()} {url}"
    kwargs: dict[str, Any] = {"headers": headers, "allow_redirects": True}
    if body is not None:
        kwargs["data"] = body
    elif json_body is not None:
        kwargs["json"] = json_body
    if timeout is not None:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
    try:
        async with session.request(step.method.upper(), url, **kwargs) as resp:
            raw = await resp.read()
            obs = Observed(resp.status, dict(resp.headers), raw, time.perf_counter() - start)
    except TimeoutError:
        took = time.perf_counter() - start
        return StepResult(step.name, False, took, error=f"timed out after {took:.1f}s", request=request), None
    except aiohttp.ClientError as exc:
        took = time.perf_counter() - start
        msg = str(exc) or type(exc).__name__
        return StepResult(step.name, False, took, error=f"connection failed: {msg}", request=request), None
    except ValueError as exc:  # a URL that does not parse after templating
        return StepResult(step.name, False, 0.0, error=f"bad request: {exc}", request=request), None
    checks = evaluate(step.expect, obs)
    ok = all(c.ok for c in checks)
    return StepResult(step.name, ok, obs.latency, checks, request=request, status=obs.status), obs


async def run_journey(name: str, steps: list[Step], variables: dict[str, Any], timeout: float) -> ProbeResult:
    """Run steps in order in one session; stop at the first failing step.

    The whole journey is bounded by `timeout`, so a target that accepts the connection and then
    hangs is reported as a timeout of the step in hand, never a stuck loop.
    """
    started_at = time.time()
    t0 = time.perf_counter()
    done: list[StepResult] = []
    ctx: dict[str, Any] = dict(variables)
    current: list[Step] = []
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    jar = aiohttp.CookieJar(unsafe=True)  # cookies on IP-address targets too
    try:
        async with asyncio.timeout(timeout):
            async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as session:
                for step in steps:
                    current[:] = [step]
                    result, obs = await _exchange(session, step, ctx, step.timeout)
                    if result.ok and obs is not None and step.extract:
                        try:
                            for var, spec in step.extract.items():
                                ctx[var] = extract(spec, obs)
                        except LookupError as exc:
                            result = StepResult(
                                step.name,
                                False,
                                result.latency,
                                result.checks,
                                error=str(exc),
                                request=result.request,
                                status=result.status,
                            )
                    done.append(result)
                    if not result.ok:
                        break
                current.clear()
    except TimeoutError:
        if current:
            done.append(
                StepResult(
                    current[0].name, False, 0.0, error=f"timed out: the probe's {timeout:g}s deadline passed"
                )
            )
    latency = time.perf_counter() - t0
    ok = bool(done) and len(done) == len(steps) and all(s.ok for s in done)
    return ProbeResult(name, ok, started_at, latency, tuple(done), error="" if ok else "journey incomplete")
