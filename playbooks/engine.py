"""The playbook engine: run steps in order, journaled, each bounded by a timeout and retried.

Every step is written to the store before and after it runs, and each step first asks its action
whether the change is already in place (`check`), so a retried step never does a change twice.
A step that still fails after its retries aborts the run; what it did and why it stopped are in
the timeline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential

from controller.config import Playbook, PlaybookStep
from controller.durations import format_duration
from controller.executors import STORE, run_in
from controller.metrics import Metrics
from controller.stores import Run, Store
from playbooks import guards
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


class OutcomeUnknown(ActionError):
    """An attempt did not answer within the step's timeout and may still act: no retry while it
    may be running; when it ends with an error, the next attempt checks before re-applying."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message, retryable=retryable, unknown=True)


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
    blocked: bool = False
    """A guard stopped the run before it changed anything in that step."""
    rolled_back: bool = False
    state: str = ""


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
        lines.extend(f"       guard: {guards.explain(g)}" for g in step.guards)
        lines.extend(f"       {c.render()}" for c in calls)
    return "\n".join(lines)


class Engine:
    """Runs playbooks from the journal: what the store says is done is never done again."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        backoff: float = 0.5,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.backoff = backoff
        self.late_grace = 30.0
        """How long an attempt whose outcome is unknown is waited for (at least one more step
        timeout) before the step is left unknown for a human: a thread cannot be cancelled."""
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        """Whose runs these are: no step applies unless the store says this owner holds the run."""

    def create(
        self,
        name: str,
        pb: Playbook,
        *,
        incident_id: str | None = None,
        service: str | None = None,
        dry_run: bool = False,
        state: str = "running",
    ) -> Run:
        run = self.store.create_run(
            name, incident_id, service, dry_run, self.clock(), [s.name for s in pb.steps]
        )
        if state != "running":
            self.store.update_run(run.id, state=state)
            run.state = state
        return run

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
        run = self.create(name, pb, incident_id=incident_id, service=service, dry_run=dry_run)
        return await self.execute(run.id, name, pb, ctx, dry_run=dry_run)

    async def execute(
        self, run_id: str, name: str, pb: Playbook, ctx: ActionContext, *, dry_run: bool = False
    ) -> RunResult:
        """Run (or resume) a journaled run: steps already done are skipped, the rest run in order."""
        started = time.monotonic()
        if not await run_in(STORE, self.store.claim_run, run_id, self.owner, None):
            run = await run_in(STORE, self.store.get_run, run_id)
            return self._not_ours(name, run_id, ctx, run.owner if run else None)
        journal = {r.idx: r for r in await run_in(STORE, self.store.steps, run_id)}
        resumed = any(r.state != "pending" for r in journal.values())
        await run_in(STORE, self.store.update_run, run_id, state="running")
        mode = " (dry run: nothing will change)" if dry_run else ""
        verb = "resumed" if resumed else "started"
        ctx.record("playbook", f"playbook {name} {verb} as {run_id}{mode}", {"run_id": run_id})
        result = RunResult(run_id, ok=True)
        done: list[int] = []
        for group in _groups(pb):
            if not ctx.may_act() and not dry_run:
                result.ok, result.state = False, "handed_over"
                result.error = (
                    "this replica lost the leadership; the next leader resumes the run from its journal"
                )
                ctx.record(
                    "playbook",
                    f"playbook {name} paused at step {pb.steps[group[0]].name}: {result.error}",
                    {"run_id": run_id},
                )
                return result
            holder = await run_in(STORE, self.store.get_run, run_id)
            if holder is None or holder.owner != self.owner:
                return self._not_ours(name, run_id, ctx, holder.owner if holder else None)
            todo = [i for i in group if journal.get(i) is None or journal[i].state not in ("done", "skipped")]
            for i in group:
                if i not in todo:
                    done.append(i)
                    ctx.record(
                        "step",
                        f"step {pb.steps[i].name} already done in an earlier attempt of this run",
                        {"run_id": run_id, "step": pb.steps[i].name},
                    )
            outcomes = await asyncio.gather(
                *(self._step(name, run_id, i, pb.steps[i], ctx, dry_run) for i in todo)
            )
            for i, outcome in zip(todo, outcomes, strict=True):
                result.steps.append(outcome)
                if outcome.state in ("done", "skipped"):
                    done.append(i)
            failed = [o for o in outcomes if o.state in ("failed", "blocked", "unknown")]
            if failed:
                result.ok = False
                result.blocked = all(o.state == "blocked" for o in failed)
                result.error = "; ".join(f"step {o.name} {o.state}: {o.detail}" for o in failed)
                later = [i for i in range(len(pb.steps)) if i > max(group)]
                for i in later:
                    await run_in(
                        STORE,
                        self.store.update_step,
                        run_id,
                        i,
                        state="skipped",
                        detail="not run: an earlier step failed",
                    )
                break
        if not result.ok and pb.on_failure == "rollback" and not dry_run:
            result.rolled_back = await self._rollback(name, run_id, pb, ctx, done)
        result.duration = time.monotonic() - started
        if result.ok:
            state = "succeeded"
        elif result.blocked:
            state = "blocked"
        else:
            state = "rolled_back" if result.rolled_back else "failed"
        result.state = state
        await run_in(
            STORE,
            self.store.update_run,
            run_id,
            state=state,
            ended_at=self.clock(),
            error=result.error or None,
        )
        self.metrics.playbook_runs.labels(name, "dry_run" if dry_run else state).inc()
        ctx.record(
            "playbook",
            f"playbook {name} {state} in {format_duration(result.duration)}"
            + (f": {result.error}" if result.error else ""),
            {"run_id": run_id, "ok": result.ok, "state": state, "duration_s": round(result.duration, 3)},
        )
        return result

    async def _apply_bounded(
        self,
        action: Action,
        ctx: ActionContext,
        name: str,
        attempt: int,
        timeout: float,
        note: Callable[[str, str], None],
    ) -> str:
        """Apply within the step's timeout. `asyncio.wait_for` around a thread cancels the
        coroutine, not the thread: an action running in a thread that has not answered in time
        may still act. Its outcome is then unknown: recorded as such, and waited for (up to
        `late_grace`, at least one more timeout) before anything else; never called failed, never
        retried in parallel."""
        task = asyncio.ensure_future(action.apply(ctx))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:  # the run itself is cancelled (shutdown): so is the attempt
            task.cancel()
            raise
        if task in done:
            return task.result()
        if not action.blocking:  # a coroutine: cancelling it really stops it, nothing is in flight
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise TimeoutError
        grace = max(timeout, self.late_grace)
        note(
            f"step {name} attempt {attempt}: no answer within {format_duration(timeout)}: outcome "
            f"unknown; waiting up to {format_duration(grace)} for it to finish before anything else",
            "unknown",
        )
        t0 = time.monotonic()
        try:
            done, _ = await asyncio.wait({task}, timeout=grace)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task not in done:
            task.cancel()  # the thread goes on; it is not retried while it may still act
            raise OutcomeUnknown(
                f"outcome unknown: attempt {attempt} still running {format_duration(timeout + grace)} "
                "after it started; not retried while it may still act; a human must check",
                retryable=False,
            )
        exc = task.exception()
        if exc is None:
            result = task.result()
            note(
                f"step {name} attempt {attempt} finished late, after "
                f"{format_duration(timeout + time.monotonic() - t0)}: {result}",
                "done",
            )
            return result
        raise OutcomeUnknown(
            f"attempt {attempt} ended late with an error, outcome unknown: {describe_error(exc)}",
            retryable=retryable(exc),
        ) from exc

    def _not_ours(self, name: str, run_id: str, ctx: ActionContext, owner: str | None) -> RunResult:
        """Another process owns the run (it took it over): stop before any step, change nothing."""
        error = f"run {run_id} is owned by {owner or 'nobody'}, not {self.owner}: no step applied"
        ctx.record("playbook", f"playbook {name} stopped: {error}", {"run_id": run_id})
        log.warning("run not owned; stopping", run=run_id, owner=owner, me=self.owner)
        return RunResult(run_id, ok=False, error=error, state="handed_over")

    async def _rollback(
        self, name: str, run_id: str, pb: Playbook, ctx: ActionContext, done: list[int]
    ) -> bool:
        """Undo completed steps in reverse order; True when every declared rollback succeeded."""
        specs = {r.name: r for r in pb.rollback_steps}
        ok = True
        base = len(pb.steps)
        for n, i in enumerate(sorted(done, reverse=True)):
            step = pb.steps[i]
            if step.rollback is None:
                continue
            spec = specs[step.rollback]
            idx = base + n
            await run_in(STORE, self.store.add_step, run_id, idx, f"rollback:{spec.name}")
            ctx.record("rollback", f"rolling back step {step.name} with {spec.name}", {"run_id": run_id})
            outcome = await self._attempts(
                name,
                run_id,
                idx,
                spec.name,
                spec.timeout,
                spec.retries,
                ACTIONS[spec.action](spec.params),
                ctx,
            )
            if outcome.state == "done":
                await run_in(STORE, self.store.update_step, run_id, i, state="rolled_back")
            else:
                ok = False
        return ok

    async def _step(
        self, playbook: str, run_id: str, idx: int, step: PlaybookStep, ctx: ActionContext, dry_run: bool
    ) -> StepOutcome:
        action = ACTIONS[step.action](step.params)
        if step.guards:
            results = [(g, await guards.evaluate(g, ctx)) for g in step.guards]
            for g, r in results:
                ctx.record(
                    "guard",
                    f"guard before {step.name}: {guards.describe(g)}: "
                    f"{'passed' if r.ok else 'FAILED'}: {r.text}",
                    {
                        "run_id": run_id,
                        "step": step.name,
                        "ok": r.ok,
                        "value": r.value,
                        # the report's data-loss window against the RPO reads this
                        **(
                            {"replica_lag_s": r.value}
                            if g.replica_lag is not None and r.value is not None
                            else {}
                        ),
                    },
                )
            failed = [r.text for _, r in results if not r.ok]
            if failed:
                why = "guard failed: " + "; ".join(failed)
                await run_in(
                    STORE,
                    self.store.update_step,
                    run_id,
                    idx,
                    state="blocked",
                    ended_at=self.clock(),
                    detail=why,
                )
                return StepOutcome(step.name, "blocked", why, 0.0, 0)
        if dry_run:
            await run_in(STORE, self.store.update_step, run_id, idx, state="running", started_at=self.clock())
            calls = [c.render() for c in action.plan()]
            detail = "dry run: would call " + "; ".join(calls) if calls else "dry run"
            await run_in(
                STORE,
                self.store.update_step,
                run_id,
                idx,
                state="skipped",
                ended_at=self.clock(),
                detail=detail,
            )
            ctx.record(
                "step", f"step {step.name}: {detail}", {"run_id": run_id, "step": step.name, "calls": calls}
            )
            return StepOutcome(step.name, "skipped", detail, 0.0, 0)
        return await self._attempts(playbook, run_id, idx, step.name, step.timeout, step.retries, action, ctx)

    async def _attempts(
        self,
        playbook: str,
        run_id: str,
        idx: int,
        name: str,
        timeout: float,
        retries: int,
        action: Action,
        ctx: ActionContext,
    ) -> StepOutcome:
        t0 = time.monotonic()
        before = {r.idx: r for r in await run_in(STORE, self.store.steps, run_id)}.get(idx)
        # A step journaled in progress (or unknown) was cut off by a crash or a lost lease: whatever
        # it sent may have landed. Say so, and check before re-applying (every attempt checks first).
        unknown = before is not None and before.state in ("running", "unknown")
        await run_in(STORE, self.store.update_step, run_id, idx, state="running", started_at=self.clock())
        ctx = dataclasses.replace(ctx, idempotency_key=f"{run_id}-{name}")
        if unknown:
            ctx.record(
                "step",
                f"step {name} was in progress when its previous owner stopped: outcome unknown; "
                "checking before re-applying",
                {"run_id": run_id, "step": name, "outcome": "unknown"},
            )
        ctx.record("step", f"step {name} ({action.name}) started", {"run_id": run_id, "step": name})
        attempts = 0

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0
            if getattr(exc, "unknown", False):
                what, then = "outcome unknown", "checking, then re-applying only if not in place,"
            else:
                what, then = "failed", "retrying"
            ctx.record(
                "step",
                f"step {name} attempt {state.attempt_number} {what}: "
                f"{describe_error(exc) if exc else '?'}; {then} in {wait:.1f}s",
                {"run_id": run_id, "step": name, "attempt": state.attempt_number},
            )

        def note(message: str, outcome: str) -> None:
            ctx.record("step", message, {"run_id": run_id, "step": name, "outcome": outcome})

        async def attempt() -> str:
            nonlocal attempts, unknown
            attempts += 1
            await run_in(STORE, self.store.update_step, run_id, idx, attempts=attempts)
            actx = dataclasses.replace(ctx, deadline=time.monotonic() + timeout)
            present = await _bounded_read(action.check(actx), timeout)
            if unknown:
                note(
                    f"step {name}: checked after the unknown outcome: "
                    + (
                        "the change is in place, not applied again"
                        if present
                        else "not confirmed in place; applying again"
                        + (f" (same Idempotency-Key {ctx.idempotency_key})" if action.name == "http" else "")
                    ),
                    "checked",
                )
                unknown = False
            if present:
                return action.already
            actx = dataclasses.replace(ctx, deadline=time.monotonic() + timeout)
            try:
                return await self._apply_bounded(action, actx, name, attempts, timeout, note)
            except ActionError as exc:
                if not exc.unknown:
                    raise
                unknown = True
                if not isinstance(exc, OutcomeUnknown):
                    note(f"step {name} attempt {attempts}: outcome unknown: {exc}", "unknown")
                await run_in(
                    STORE,
                    self.store.update_step,
                    run_id,
                    idx,
                    state="unknown",
                    detail=f"outcome unknown: {exc}",
                )
                if exc.retryable and not action.verifiable:
                    raise OutcomeUnknown(
                        f"{exc}; {action.name} cannot check whether it took effect, so it is not "
                        f"sent again (Idempotency-Key {ctx.idempotency_key}): a human must check",
                        retryable=False,
                    ) from exc
                raise

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
            # An attempt that may still act is not a failure: it is unknown until a human checks.
            state = "unknown" if getattr(exc, "unknown", False) else "failed"
            if state == "unknown" and not why.startswith("outcome unknown"):
                why = f"outcome unknown: {why}"
            await run_in(
                STORE,
                self.store.update_step,
                run_id,
                idx,
                state=state,
                ended_at=self.clock(),
                detail=why,
                attempts=attempts,
            )
            self.metrics.step_duration.labels(playbook, name).observe(took)
            ctx.record(
                "error",
                f"step {name} failed after {format_duration(took)}: {why}",
                {"run_id": run_id, "step": name, "attempts": attempts},
            )
            log.error("playbook step failed", playbook=playbook, step=name, error=why, state=state)
            return StepOutcome(name, state, why, took, attempts)
        took = time.monotonic() - t0
        await run_in(
            STORE,
            self.store.update_step,
            run_id,
            idx,
            state="done",
            ended_at=self.clock(),
            detail=detail,
            attempts=attempts,
        )
        self.metrics.step_duration.labels(playbook, name).observe(took)
        ctx.record(
            "step",
            f"step {name} done in {format_duration(took)}: {detail}",
            {"run_id": run_id, "step": name, "duration_s": round(took, 3), "attempts": attempts},
        )
        log.info("playbook step done", playbook=playbook, step=name, duration_s=round(took, 3), detail=detail)
        return StepOutcome(name, "done", detail, took, attempts)


async def _bounded_read(coro: Any, timeout: float) -> Any:
    """A `check` within the step's timeout. A read, so abandoning it at the deadline is safe. Not
    `asyncio.wait_for`: on Python 3.11 it can swallow the run's own cancellation when the check
    completes at that moment, and the run would go on applying after a shutdown or crash test."""
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task not in done:
        task.cancel()
        raise TimeoutError
    return task.result()


def _groups(pb: Playbook) -> list[list[int]]:
    """Adjacent steps sharing a `group` run together; every other step is a group of one."""
    out: list[list[int]] = []
    for i, step in enumerate(pb.steps):
        if out and step.group is not None and pb.steps[out[-1][0]].group == step.group:
            out[-1].append(i)
        else:
            out.append([i])
    return out


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
