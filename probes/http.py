"""HTTP probes and transaction journeys, on aiohttp.

A plain HTTP probe is a journey of one step, so both kinds share one runner: the same
expectations, the same timeout handling and the same failure sentences. Each run gets a fresh
session (fresh connection, empty cookie jar) so one probe's state never leaks into the next.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from probes.base import (
    Check,
    Observed,
    ProbeResult,
    StepResult,
    evaluate,
    extract,
    prober_error_of,
)
from probes.models import HttpProbe as HttpProbe  # re-exported: the config models live in probes/models.py
from probes.models import ProbeCommon as ProbeCommon
from probes.models import RequestSpec as RequestSpec
from probes.models import Step
from probes.models import TransactionProbe as TransactionProbe
from probes.models import Window as Window
from probes.resolve import RESOLVE_SHARE, resolve

if TYPE_CHECKING:
    import aiohttp
    from jinja2.sandbox import SandboxedEnvironment

# aiohttp and jinja2 are imported where a probe runs, not here: they cost ~0.6 s of start-up, which a
# command that runs no HTTP probe must not pay. The config models are in probes/models.py (issue 13).


@functools.cache
def _templates() -> SandboxedEnvironment:
    """The sandboxed template environment, built on first use."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


MAX_BODY = 1024 * 1024
"""Bytes of a response body kept, on every path (the fast path, each redirect hop's final answer,
every transaction step): enough for any health document; the rest is never read."""
MAX_REDIRECTS = 10
"""Redirects followed at most (as curl and browsers bound them); more is a failed step."""
MAX_FIELD_SIZE = 8190
"""Longest response header line, name or value (aiohttp's default, said out loud)."""
MAX_HEADERS = 128
"""Response headers at most."""


def _render(value: Any, ctx: dict[str, Any]) -> Any:
    if isinstance(value, str):
        if "{{" not in value and "{%" not in value:
            return value
        return _templates().from_string(value).render(ctx)
    if isinstance(value, dict):
        return {k: _render(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, ctx) for v in value]
    return value


@functools.cache
def _bounded_resolver_class() -> Callable[[float], aiohttp.abc.AbstractResolver]:
    """`BoundedResolver`, defined on first use so that importing this module does not import
    aiohttp."""
    import aiohttp.abc

    class BoundedResolver(aiohttp.abc.AbstractResolver):
        """aiohttp's resolver for probes: `probes.resolve` within the journey's budget, instead of
        aiohttp's ThreadedResolver on the default executor (see probes/resolve.py for why)."""

        def __init__(self, budget: float) -> None:
            self.budget = budget

        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[aiohttp.abc.ResolveResult]:
            found = await resolve(host, port, self.budget, int(family))
            return [
                {"hostname": host, "host": addr, "port": port, "family": fam, "proto": 0, "flags": 0}
                for fam, addr in found
            ]

        async def close(self) -> None:
            return None

    return BoundedResolver


async def _exchange(
    session: aiohttp.ClientSession, step: Step, ctx: dict[str, Any], timeout: float | None
) -> tuple[StepResult, Observed | None, str | None]:
    import aiohttp
    from jinja2 import TemplateError

    start = time.perf_counter()
    try:
        url = _render(step.url, ctx)
        headers = _render(step.headers, ctx)
        body = _render(step.body, ctx)
        json_body = _render(step.json_body, ctx)
    except TemplateError as exc:
        return StepResult(step.name, False, 0.0, error=f"template error: {exc}"), None, None
    request = f"{step.method.upper()} {url}"
    kwargs: dict[str, Any] = {"headers": headers, "allow_redirects": True, "max_redirects": MAX_REDIRECTS}
    if body is not None:
        kwargs["data"] = body
    elif json_body is not None:
        kwargs["json"] = json_body
    if timeout is not None:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
    try:
        async with session.request(step.method.upper(), url, **kwargs) as resp:
            raw, truncated = await _read_capped(resp, MAX_BODY)
            obs = Observed(resp.status, dict(resp.headers), raw, time.perf_counter() - start)
            if truncated:
                obs.headers[TRUNCATED] = str(MAX_BODY)
    except aiohttp.TooManyRedirects:
        took = time.perf_counter() - start
        return (
            StepResult(step.name, False, took, error=f"more than {MAX_REDIRECTS} redirects", request=request),
            None,
            None,
        )
    except TimeoutError:
        took = time.perf_counter() - start
        timed_out = StepResult(step.name, False, took, error=f"timed out after {took:.1f}s", request=request)
        return timed_out, None, None
    except aiohttp.ClientError as exc:
        took = time.perf_counter() - start
        msg = str(exc) or type(exc).__name__
        failed = StepResult(step.name, False, took, error=f"connection failed: {msg}", request=request)
        return failed, None, prober_error_of(exc)
    except OSError as exc:  # our fd limit while aiohttp builds a socket, outside its ClientError
        took = time.perf_counter() - start
        failed = StepResult(step.name, False, took, error=f"connection failed: {exc}", request=request)
        return failed, None, prober_error_of(exc)
    except ValueError as exc:  # a URL that does not parse after templating
        return StepResult(step.name, False, 0.0, error=f"bad request: {exc}", request=request), None, None
    checks = evaluate(step.expect, obs)
    ok = all(c.ok for c in checks)
    return StepResult(step.name, ok, obs.latency, checks, request=request, status=obs.status), obs, None


TRUNCATED = "x-continuity-body-truncated-at"
"""Marks an observation whose body was cut at MAX_BODY (never sent by a server: we add it)."""


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> tuple[bytes, bool]:
    """Read at most `cap` bytes of the body (decompressed), then stop: the rest is never read, and
    closing the connection (the connector forces close) drops it."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        room = cap - size
        if len(chunk) > room:
            chunks.append(chunk[:room])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def _secrets_in(step: Step, obs: Observed) -> list[str]:
    """The values this step's `secret: true` extractions take from the response, where present."""
    out = []
    for spec in step.extract.values():
        if spec.secret:
            try:
                value = str(extract(spec, obs))
            except LookupError:
                continue
            if value:
                out.append(value)
    return out


def _hide(text: str, secrets: list[str]) -> str:
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def _shown_masked(result: StepResult, step: Step, obs: Observed, secrets: list[str]) -> StepResult:
    """The step's checks as shown: evaluated on the response with secrets replaced by ***, so that
    no cut of a long body can show part of one; pass or fail still comes from the real response."""
    body = obs.body
    for value in sorted(secrets, key=len, reverse=True):
        body = body.replace(value.encode(), b"***")
    hidden = Observed(obs.status, {k: _hide(v, secrets) for k, v in obs.headers.items()}, body, obs.latency)
    shown = evaluate(step.expect, hidden)
    if len(shown) != len(result.checks):
        shown = tuple(
            Check(c.name, c.ok, c.expected, "(not shown: the response holds a secret)") for c in result.checks
        )
    checks = tuple(
        Check(c.name, real.ok, c.expected, c.found) for real, c in zip(result.checks, shown, strict=True)
    )
    return replace(result, checks=checks)


def _mask(step: StepResult, secrets: list[str]) -> StepResult:
    """Values extracted with `secret: true` never reach logs, timelines or notifications."""
    if not secrets:
        return step

    def hide(text: str) -> str:
        for value in secrets:
            text = text.replace(value, "***")
        return text

    checks = tuple(Check(c.name, c.ok, hide(c.expected), hide(c.found)) for c in step.checks)
    return replace(step, request=hide(step.request), error=hide(step.error), checks=checks)


async def run_journey(name: str, steps: list[Step], variables: dict[str, Any], timeout: float) -> ProbeResult:
    """Run steps in order in one session; the first failing critical step ends the journey, except
    for `always_run` cleanup steps, which run anyway.

    The whole journey is bounded by `timeout`, so a target that accepts the connection and then
    hangs is reported as a timeout of the step in hand, never a stuck loop. A failing
    `allow_failure` step makes the result degraded (details.degraded) instead of failed.
    """
    started_at = time.time()
    t0 = time.perf_counter()
    done: list[StepResult] = []
    ctx: dict[str, Any] = dict(variables)
    secrets: list[str] = []
    current: list[Step] = []
    broken = False
    prober_error: str | None = None
    import aiohttp

    connector = aiohttp.TCPConnector(
        force_close=True,
        limit=0,
        resolver=_bounded_resolver_class()(timeout * RESOLVE_SHARE),
        use_dns_cache=False,
    )
    jar = aiohttp.CookieJar(unsafe=True)  # cookies on IP-address targets too
    truncated = False
    try:
        async with asyncio.timeout(timeout):
            async with aiohttp.ClientSession(
                connector=connector,
                cookie_jar=jar,
                max_line_size=MAX_FIELD_SIZE,
                max_field_size=MAX_FIELD_SIZE,
                max_headers=MAX_HEADERS,
            ) as session:
                for step in steps:
                    if broken and not step.always_run:
                        continue
                    current[:] = [step]
                    result, obs, ours = await _exchange(session, step, ctx, step.timeout)
                    if ours and not step.allow_failure:
                        prober_error = prober_error or ours
                    if obs is not None:
                        truncated = truncated or TRUNCATED in obs.headers
                        # Secret values are masked from the moment they are seen, whatever the
                        # step's outcome: a failing expectation must not print the body holding one.
                        found = _secrets_in(step, obs)
                        if found:
                            secrets.extend(v for v in found if v not in secrets)
                            result = _shown_masked(result, step, obs, secrets)
                    if result.ok and obs is not None and step.extract:
                        try:
                            for var, spec in step.extract.items():
                                ctx[var] = extract(spec, obs)
                                if spec.secret and str(ctx[var]):
                                    secrets.append(str(ctx[var]))
                        except LookupError as exc:
                            result = replace(result, ok=False, error=str(exc))
                    done.append(_mask(result, secrets))
                    if not result.ok and not step.allow_failure and not step.always_run:
                        broken = True
                current.clear()
    except TimeoutError:
        if current:
            done.append(
                StepResult(
                    current[0].name, False, 0.0, error=f"timed out: the probe's {timeout:g}s deadline passed"
                )
            )
            broken = broken or not current[0].allow_failure
    latency = time.perf_counter() - t0
    by_name = {s.name: s for s in steps}
    hard = [s for s in done if not s.ok and not by_name[s.name].allow_failure]
    soft = [s for s in done if not s.ok and by_name[s.name].allow_failure]
    ran_all = {s.name for s in done} >= {s.name for s in steps if not s.always_run}
    ok = bool(done) and ran_all and not hard and not soft
    details: dict[str, Any] = {}
    if not hard and soft and ran_all:
        details["degraded"] = True
    if truncated:
        details["body_truncated_at"] = MAX_BODY
    error = "" if ok else ("non-critical step failed" if details.get("degraded") else "journey incomplete")
    return ProbeResult(
        name,
        ok,
        started_at,
        latency,
        tuple(done),
        error=error,
        details=details,
        prober_error=None if ok else prober_error,
    )
