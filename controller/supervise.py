"""Supervised background tasks: a task that fails is restarted, never lost.

It exists because every long-running part of the controller (the tick loop, the outbox, the probe
scheduler) must outlive its own bugs and a sick disk or API: a failure is logged, counted in
continuity_task_restarts_total{task} (an alert rule watches it) and retried after a pause that
doubles, instead of ending paging or probing until someone restarts the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from controller.metrics import Metrics

log = structlog.get_logger("continuity.controller")


def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    *,
    backoff: tuple[float, float],
    metrics: Metrics,
) -> asyncio.Task[None]:
    """Run a background task for as long as `stop` is unset: an error is logged, counted in
    continuity_task_restarts_total{task}, and the task restarts after a pause that doubles from
    backoff[0] to backoff[1] (reset once it has run a minute without failing). A full
    disk for 12 s must delay pages, never end paging until a restart."""

    async def supervised() -> None:
        loop = asyncio.get_running_loop()
        first, longest = backoff
        delay = first
        while not stop.is_set():
            began = loop.time()
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if loop.time() - began >= 60.0:
                    delay = first
                log.exception("background task failed; restarting it", task=name, in_s=round(delay, 2))
                metrics.task_restarts.labels(name).inc()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, longest)

    return asyncio.create_task(supervised(), name=name)
