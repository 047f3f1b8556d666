"""The playbook engine: run steps in order, journaled, each bounded by a timeout and retried.

Every step is written to the store before and after it runs, and each step first asks its action
whether the change is already in place (`check`), so a retried step never does a change twice.
A step that still fails after its retries aborts the run; what it did and why it stopped are in
the timeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential

from controller.config import Playbook
from controller.durations import format_duration
from controller.metrics import Metrics
from controller.store import Store
from playbooks.actions import ACTIONS, Action, ActionContext, ActionError, PlannedCall

log = structlog.get_logger("continuity.playbook")

_THROTTLE = {
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "PriorRequestNotComplete",
    "RequestThrottled",
}


def retryable(exc: BaseException) -> bool:
    """Throttling, 5xx, timeouts and connection errors are worth another attempt; a 4xx is not."""
    if isinstance(exc, ActionError):
        return exc.retryable
    if isinstance(exc, TimeoutError | BotoCoreError):
        return True
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _THROTTLE or status >= 500
    return False


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        op = getattr(exc, "operation_name", "call")
        return f"{op}: {err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


@dataclass
class StepOutcome:
    name: str
    state: str
    detail: str
    duration: float
    attempts: int


@dataclass
class RunResult:
    run_id: str
    ok: bool
    error: str = ""
    steps: list[StepOutcome] = field(default_factory=list)
    duration: float = 0.0


def plan(pb: Playbook) -> list[tuple[str, list[PlannedCall]]]:
    """The exact calls each step would make, for dry runs and approval requests."""
    return [(f"{s.name} ({s.action})", ACTIONS[s.action](s.params).plan()) for s in pb.steps]


def render_plan(name: str, pb: Playbook) -> str:
    lines = [
        f"playbook {name}: {len(pb.steps)} step(s), cooldown {format_duration(pb.cooldown)}, "
        f"approval {pb.approval}"
    ]
    for i, ((title, calls), step) in enumerate(zip(plan(pb), pb.steps, strict=True), 1):
        lines.append(f"  {i}. {title}  timeout {format_duration(step.timeout)}, retries {step.retries}")
        lines.extend(f"       {c.render()}" for c in calls)
    return "\n".join(lines)


class Engine:
    def __init__(
        self,
        store: Store,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        backoff: float = 0.5,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.backoff = backoff

    async def run(
        self,
        name: str,
        pb: Playbook,
        ctx: ActionContext,
        *,
        incident_id: str | None = None,
        service: str | None = None,
        dry_run: bool = False,
    ) -> RunResult:
        started = time.monotonic()
        run = self.store.create_run(
            name, incident_id, service, dry_run, self.clock(), [s.name for s in pb.steps]
        )
        mode = " (dry run: nothing will change)" if dry_run else ""
        ctx.record("playbook", f"playbook {name} started as {run.id}{mode}", {"run_id": run.id})
        result = RunResult(run.id, ok=True)
        for idx, step in enumerate(pb.steps):
            action = ACTIONS[step.action](step.params)
            outcome = await self._step(
                name, run.id, idx, step.name, step.timeout, step.retries, action, ctx, dry_run
            )
            result.steps.append(outcome)
            if outcome.state == "failed":
                result.ok = False
                result.error = f"step {step.name} failed: {outcome.detail}"
                for later in range(idx + 1, len(pb.steps)):
                    self.store.update_step(run.id, later, state="skipped")
                break
        result.duration = time.monotonic() - started
        outcome_word = "succeeded" if result.ok else "failed"
        self.store.update_run(run.id, state=outcome_word, ended_at=self.clock(), error=result.error or None)
        self.metrics.playbook_runs.labels(name, "dry_run" if dry_run else outcome_word).inc()
        ctx.record(
            "playbook",
            f"playbook {name} {outcome_word} in {format_duration(result.duration)}"
            + (f": {result.error}" if result.error else ""),
            {"run_id": run.id, "ok": result.ok, "duration_s": round(result.duration, 3)},
        )
        return result

    async def _step(
        self,
        playbook: str,
        run_id: str,
        idx: int,
        name: str,
        timeout: float,
        retries: int,
        action: Action,
        ctx: ActionContext,
        dry_run: bool,
    ) -> StepOutcome:
        t0 = time.monotonic()
        self.store.update_step(run_id, idx, state="running", started_at=self.clock())
        ctx.record("step", f"step {name} ({action.name}) started", {"run_id": run_id, "step": name})
        if dry_run:
            calls = [c.render() for c in action.plan()]
            detail = "dry run: would call " + "; ".join(calls) if calls else "dry run"
            self.store.update_step(run_id, idx, state="skipped", ended_at=self.clock(), detail=detail)
            ctx.record("step", f"step {name}: {detail}", {"run_id": run_id, "step": name, "calls": calls})
            return StepOutcome(name, "skipped", detail, time.monotonic() - t0, 0)

        attempts = 0

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0
            ctx.record(
                "step",
                f"step {name} attempt {state.attempt_number} failed: "
                f"{describe_error(exc) if exc else '?'}; retrying in {wait:.1f}s",
                {"run_id": run_id, "step": name, "attempt": state.attempt_number},
            )

        async def attempt() -> str:
            nonlocal attempts
            attempts += 1
            if await asyncio.wait_for(action.check(ctx), timeout):
                return action.already
            return await asyncio.wait_for(action.apply(ctx), timeout)

        try:
            detail = ""
            async for retry in AsyncRetrying(
                stop=stop_after_attempt(retries + 1),
                wait=wait_exponential(multiplier=self.backoff, max=30),
                retry=retry_if_exception(retryable),
                before_sleep=before_sleep,
                reraise=True,
            ):
                with retry:
                    detail = await attempt()
        except Exception as exc:  # every failure ends up in the journal and the timeline
            took = time.monotonic() - t0
            why = describe_error(exc)
            if attempts > 1:
                why += f" (after {attempts} attempts)"
            self.store.update_step(
                run_id, idx, state="failed", ended_at=self.clock(), detail=why, attempts=attempts
            )
            self.metrics.step_duration.labels(playbook, name).observe(took)
            ctx.record(
                "error",
                f"step {name} failed after {format_duration(took)}: {why}",
                {"run_id": run_id, "step": name, "attempts": attempts},
            )
            log.error("playbook step failed", playbook=playbook, step=name, error=why)
            return StepOutcome(name, "failed", why, took, attempts)
        took = time.monotonic() - t0
        self.store.update_step(
            run_id, idx, state="done", ended_at=self.clock(), detail=detail, attempts=attempts
        )
        self.metrics.step_duration.labels(playbook, name).observe(took)
        ctx.record(
            "step",
            f"step {name} done in {format_duration(took)}: {detail}",
            {"run_id": run_id, "step": name, "duration_s": round(took, 3), "attempts": attempts},
        )
        log.info("playbook step done", playbook=playbook, step=name, duration_s=round(took, 3), detail=detail)
        return StepOutcome(name, "done", detail, took, attempts)


def make_context(
    aws: Callable[[str], Any],
    probe_healthy: Callable[[str], bool | None],
    record: Callable[[str, str, dict[str, Any]], None] | None = None,
    notify: Any = None,
    variables: dict[str, Any] | None = None,
) -> ActionContext:
    """A context for runs outside the controller (the CLI's `playbook run`)."""

    async def _no_notify(summary: str, details: dict[str, Any]) -> None:
        log.info("notify", summary=summary)

    return ActionContext(
        aws=aws,
        probe_healthy=probe_healthy,
        record=record or (lambda kind, msg, data: log.info(msg, kind=kind)),
        notify=notify or _no_notify,
        variables=variables or {},
    )
