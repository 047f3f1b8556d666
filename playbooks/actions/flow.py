"""Actions that pace a playbook or tell people: wait_healthy, wait, notify."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

from pydantic import Field

from controller.durations import Duration, format_duration
from playbooks.actions.base import Action, ActionContext, ActionError, PlannedCall
from probes.base import Strict

if TYPE_CHECKING:
    from jinja2.sandbox import SandboxedEnvironment


@functools.cache
def templates() -> SandboxedEnvironment:
    """The sandboxed template environment, built on first use: `continuity validate` loads this
    module's parameter models and should not pay for importing jinja2 (issue 13)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class WaitHealthyParams(Strict):
    probes: list[str] = Field(min_length=1, description="Probes that must all be UP (per detection).")
    within: Duration = Field(default=60.0, gt=0, description="Deadline; past it the step fails.")


class WaitHealthy(Action):
    """Wait until named probes pass, as detection sees them (success threshold included)."""

    name = "wait_healthy"
    Params = WaitHealthyParams
    summary = "Wait until named probes are UP, with a deadline."
    already = "already up"
    p: WaitHealthyParams
    wait_params = ("within",)

    def plan(self) -> list[PlannedCall]:
        return [
            PlannedCall(
                "detection",
                "wait_until_up",
                {"probes": self.p.probes, "within": format_duration(self.p.within)},
            )
        ]

    def _down(self, ctx: ActionContext) -> list[str]:
        return [p for p in self.p.probes if ctx.probe_healthy(p) is not True]

    async def check(self, ctx: ActionContext) -> bool:
        return not self._down(ctx)

    async def apply(self, ctx: ActionContext) -> str:
        import asyncio

        sleep = ctx.sleep or asyncio.sleep
        start = time.monotonic()
        while True:
            down = self._down(ctx)
            if not down:
                return f"{', '.join(self.p.probes)} up after {format_duration(time.monotonic() - start)}"
            if time.monotonic() - start >= self.p.within:
                raise ActionError(
                    f"still not up after {format_duration(self.p.within)}: {', '.join(down)}", retryable=False
                )
            await sleep(ctx.poll_interval)

    @classmethod
    def probe_refs(cls, params: dict[str, Any]) -> list[str]:
        probes = params.get("probes")
        return [p for p in probes if isinstance(p, str)] if isinstance(probes, list) else []


class WaitParams(Strict):
    duration: Duration = Field(gt=0, description="How long to pause, e.g. 30s for DNS TTLs to pass.")


class Wait(Action):
    name = "wait"
    Params = WaitParams
    summary = "Pause for a fixed time (e.g. let a DNS TTL expire)."
    p: WaitParams
    wait_params = ("duration",)

    def plan(self) -> list[PlannedCall]:
        return [PlannedCall("clock", "sleep", {"duration": format_duration(self.p.duration)})]

    async def apply(self, ctx: ActionContext) -> str:
        import asyncio

        await (ctx.sleep or asyncio.sleep)(self.p.duration)
        return f"waited {format_duration(self.p.duration)}"


class NotifyParams(Strict):
    message: str = Field(min_length=1, description="Jinja2 template; incident_id, service, severity known.")
    details: dict[str, Any] = Field(default_factory=dict)


class Notify(Action):
    """Tell people what the playbook did. Delivered through the outbox, never lost."""

    name = "notify"
    Params = NotifyParams
    summary = "Send a message to the configured notifiers (a PagerDuty change event)."
    p: NotifyParams

    def plan(self) -> list[PlannedCall]:
        return [PlannedCall("notifiers", "send", {"message": self.p.message})]

    async def apply(self, ctx: ActionContext) -> str:
        from jinja2 import TemplateError

        try:
            text = templates().from_string(self.p.message).render(ctx.variables)
        except TemplateError as exc:
            raise ActionError(f"message template: {exc}", retryable=False) from None
        await ctx.notify(text, self.p.details)
        return f"queued: {text}"
