"""What every probe kind returns, and the expectations they share.

A result must tell a human at 3 a.m. what to fix, so a failure always names the step and the
expectation that failed, with what was expected and what was found.
"""

from __future__ import annotations

import errno
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base for every config model: an unknown key is an error, never a silent default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass(frozen=True)
class Check:
    """One expectation evaluated against one observation."""

    name: str
    ok: bool
    expected: str
    found: str

    def sentence(self) -> str:
        return f"expected {self.name} {self.expected}, found {self.found}"


@dataclass(frozen=True)
class StepResult:
    """One HTTP exchange (a plain probe has one step; a journey has several)."""

    name: str
    ok: bool
    latency: float
    checks: tuple[Check, ...] = ()
    error: str = ""
    request: str = ""
    status: int | None = None

    def reason(self) -> str:
        if self.ok:
            return ""
        if self.error:
            return self.error
        failed = [c.sentence() for c in self.checks if not c.ok]
        return "; ".join(failed)


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe run; the unit the detector consumes."""

    probe: str
    ok: bool
    started_at: float
    latency: float
    steps: tuple[StepResult, ...] = ()
    error: str = ""
    vantage: str = "local"
    details: dict[str, Any] = field(default_factory=dict)
    prober_error: str | None = None
    """Set when the run failed because of the PROBER, not the target: a kind such as "emfile" (our
    file-descriptor limit), "resolver" (our resolver timed out or failed), "loop_stall" (our event
    loop was blocked during the run). Detection treats such a result as UNKNOWN: no vote either way."""

    @property
    def failed_step(self) -> StepResult | None:
        return next((s for s in self.steps if not s.ok), None)

    @property
    def reason(self) -> str:
        """Which step and which expectation failed, in words a human can act on."""
        if self.ok:
            return ""
        step = self.failed_step
        if step is None:
            return self.error or "failed"
        where = f"step '{step.name}'" if len(self.steps) > 1 or step.name != self.probe else "request"
        req = f" ({step.request})" if step.request else ""
        return f"{where}{req}: {step.reason()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "ok": self.ok,
            "started_at": self.started_at,
            "latency_ms": round(self.latency * 1000, 1),
            "reason": self.reason,
            "vantage": self.vantage,
            "details": self.details,
            "prober_error": self.prober_error,
            "steps": [
                {
                    "name": s.name,
                    "ok": s.ok,
                    "latency_ms": round(s.latency * 1000, 1),
                    "request": s.request,
                    "status": s.status,
                    "error": s.error,
                    "checks": [c.__dict__ for c in s.checks],
                }
                for s in self.steps
            ],
        }


def failure(
    probe: str, started_at: float, latency: float, error: str, prober_error: str | None = None
) -> ProbeResult:
    return ProbeResult(
        probe=probe, ok=False, started_at=started_at, latency=latency, error=error, prober_error=prober_error
    )


def prober_error_of(exc: BaseException | None) -> str | None:
    """The kind of prober-side error behind an exception, or None when it is the target's doing.

    Our file-descriptor limit (EMFILE/ENFILE, "Too many open files") and our resolver's failures
    (`probes.resolve.ResolverError`, which carries its `kind`) are ours; refused, reset, unreachable,
    timeouts and a name that does not exist are the target's. Follows aiohttp's `os_error` and
    exception chaining, where the cause hides.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            kind = getattr(exc, "kind", None)
            if isinstance(kind, str):
                return kind
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return "emfile"
        inner = getattr(exc, "os_error", None)
        exc = (
            inner
            if isinstance(inner, BaseException) and inner is not exc
            else (exc.__cause__ or exc.__context__)
        )
    return None


def now() -> float:
    return time.time()


def single_step(
    name: str,
    started_at: float,
    t0: float,
    request: str,
    checks: tuple[Check, ...] = (),
    error: str = "",
    details: dict[str, Any] | None = None,
    latency: float | None = None,
    prober_error: str | None = None,
) -> ProbeResult:
    """The result of a one-exchange probe (tcp, dns, tls, prometheus).

    Shaped like an HTTP probe's result (one step, named after the probe), so the CLI, the
    timeline and the detector read every kind the same way. `t0` is the perf_counter at start;
    `latency`, when given, is the measured exchange (e.g. without the connection's close).
    """
    took = time.perf_counter() - t0 if latency is None else latency
    ok = not error and all(c.ok for c in checks)
    step = StepResult(name, ok, took, checks, error=error, request=request)
    return ProbeResult(
        name,
        ok,
        started_at,
        took,
        (step,),
        error="" if ok else (error or "failed"),
        details=details or {},
        prober_error=None if ok else prober_error,
    )


# ---------------------------------------------------------------- expectations


class Comparison(Strict):
    """A numeric bound: `{lt: 800}` reads as 'less than 800'."""

    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None
    eq: float | None = None

    def holds(self, value: float) -> bool:
        return (
            (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
            and (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.eq is None or value == self.eq)
        )

    def describe(self) -> str:
        words = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "=="}
        # Only the bounds: a subclass (the Prometheus guard) adds url and query beside them.
        bounds = ((k, getattr(self, k)) for k in words)
        return " and ".join(f"{words[k]} {v:g}" for k, v in bounds if v is not None)


def latency_check(bound: Comparison, seconds: float) -> Check:
    """`latency_ms` reads the same for every kind: the bound, and the milliseconds it took."""
    ms = seconds * 1000
    return Check("latency_ms", bound.holds(ms), bound.describe(), f"{ms:.0f}")


class Expect(Strict):
    """Expectations on an HTTP response, Gatus-style: each one small and readable."""

    status: int | list[int] = Field(default=200, description="Expected status code, or a list of them.")
    latency_ms: Comparison | None = Field(default=None, description="Bound on response time, e.g. {lt: 800}.")
    body_contains: str | None = Field(default=None, description="A substring the body must contain.")
    body_not_contains: str | None = None
    json_fields: dict[str, Any] | None = Field(
        default=None,
        alias="json",
        description="JSON field paths (dotted, e.g. items.0.id) and the values they must equal.",
    )
    headers: dict[str, str] | None = Field(
        default=None, description="Headers whose values must contain these."
    )


@dataclass(frozen=True)
class Observed:
    """What came back from one HTTP exchange, independent of the client library."""

    status: int
    headers: dict[str, str]
    body: bytes
    latency: float

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


_MISSING = object()


def json_get(doc: Any, path: str) -> Any:
    """Follow a dotted path (`cart.items.0.id`, `$.cart.items[0].id` also accepted)."""
    path = path.removeprefix("$").removeprefix(".")
    parts = [p for p in re.split(r"\.|\[(\d+)\]", path) if p]
    cur = doc
    for part in parts:
        if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return _MISSING
    return cur


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def evaluate(expect: Expect, obs: Observed) -> tuple[Check, ...]:
    """Evaluate every expectation; all are reported, not only the first that fails."""
    checks: list[Check] = []
    wanted = expect.status if isinstance(expect.status, list) else [expect.status]
    checks.append(
        Check(
            "status",
            obs.status in wanted,
            " or ".join(str(s) for s in wanted),
            str(obs.status),
        )
    )
    if expect.latency_ms is not None:
        ms = obs.latency * 1000
        checks.append(
            Check("latency_ms", expect.latency_ms.holds(ms), expect.latency_ms.describe(), f"{ms:.0f}")
        )
    if expect.body_contains is not None:
        checks.append(
            Check(
                "body",
                expect.body_contains in obs.text(),
                f"to contain {expect.body_contains!r}",
                _short(obs.text()) or "an empty body",
            )
        )
    if expect.body_not_contains is not None:
        checks.append(
            Check(
                "body",
                expect.body_not_contains not in obs.text(),
                f"not to contain {expect.body_not_contains!r}",
                "it does",
            )
        )
    if expect.headers:
        lower = {k.lower(): v for k, v in obs.headers.items()}
        for name, value in expect.headers.items():
            got = lower.get(name.lower())
            checks.append(
                Check(f"header {name}", got is not None and value in got, f"to contain {value!r}", repr(got))
            )
    if expect.json_fields:
        try:
            doc = obs.json()
        except ValueError:
            checks.append(Check("body", False, "JSON", f"non-JSON body {_short(obs.text())!r}"))
        else:
            for path, value in expect.json_fields.items():
                got = json_get(doc, path)
                found = "no such field" if got is _MISSING else _short(got)
                checks.append(
                    Check(f"json {path}", got is not _MISSING and got == value, _short(value), found)
                )
    return tuple(checks)


class Extract(Strict):
    """Where to take a value from a response for later steps: exactly one source."""

    json_path: str | None = Field(default=None, alias="json", description="Dotted JSON path in the body.")
    header: str | None = Field(default=None, description="Response header name.")
    regex: str | None = Field(default=None, description="Regex over the body; group 1 if present.")
    secret: bool = Field(default=False, description="Mask the value in logs, timelines and notifications.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Extract:
        given = [k for k in ("json_path", "header", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of json, header or regex")
        return self

    def source(self) -> Literal["json", "header", "regex"]:
        if self.json_path is not None:
            return "json"
        if self.header is not None:
            return "header"
        return "regex"


def extract(spec: Extract, obs: Observed) -> Any:
    """Return the extracted value; raise LookupError naming what was missing."""
    kind = spec.source()
    if kind == "json":
        try:
            doc = obs.json()
        except ValueError:
            raise LookupError(f"cannot extract json {spec.json_path}: body is not JSON") from None
        got = json_get(doc, spec.json_path or "")
        if got is _MISSING:
            raise LookupError(f"cannot extract json {spec.json_path}: no such field")
        return got
    if kind == "header":
        lower = {k.lower(): v for k, v in obs.headers.items()}
        if (spec.header or "").lower() not in lower:
            raise LookupError(f"cannot extract header {spec.header}: not in the response")
        return lower[(spec.header or "").lower()]
    match = re.search(spec.regex or "", obs.text())
    if match is None:
        raise LookupError(f"cannot extract regex {spec.regex!r}: no match in the body")
    return match.group(1) if match.groups() else match.group(0)
