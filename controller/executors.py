"""Named, bounded thread pools, so that nothing slow shares a pool with something that must be on time.

`asyncio.to_thread` runs everything on the loop's one default executor (min(32, cores + 4) threads).
A playbook step waiting out an Aurora failover holds a thread for up to five minutes; a few of those,
plus probes' and the outbox's blocking calls, and the leader elector's lease renewal queues behind
them, misses its renew deadline and the controller steps down in the middle of a failover. So:

- `LEADER`: the leader elector's Kubernetes calls, and nothing else;
- `ACTIONS`: every blocking playbook action and guard (boto3, the Kubernetes API, webhooks);
- `STORE`: the state store's calls (`controller.stores.aio.AsyncStore`): with the Kubernetes store
  each is an HTTP round trip, retried for seconds on a sick API server, and none may stall the loop;
- `IO`: the rest of the controller's blocking work (outbox sends, the pod label, reading a config
  to reload), so that none of it queues behind a full default executor or holds one of its threads.

Each pool is process-wide (one elector, many runs; the threads outlive any one event loop, as the
default executor's do not need to) and created on first use. Threads are named after the pool, so a
thread dump says who is stuck.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Pool:
    """A lazily created ThreadPoolExecutor with a name and a bound."""

    def __init__(self, name: str, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError(f"pool {name}: max_workers must be at least 1, got {max_workers}")
        self.name = name
        self.max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.max_workers, thread_name_prefix=self.name
                )
            return self._executor

    def shutdown(self) -> None:
        """Stop taking work; threads finish what they hold (used by tests that need a fresh pool)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None


LEADER = Pool("continuity-leader", max_workers=4)
"""Lease reads and writes. Each call carries a request timeout no longer than the retry period, so
four threads outlast any backlog of abandoned calls the renew deadline allows."""

ACTIONS = Pool("continuity-actions", max_workers=16)
"""Blocking playbook actions and guards: boto3 (Route 53, RDS/Aurora waits, ELBv2, CloudWatch), the
Kubernetes API, webhooks. Bounded: a storm of runs queues here instead of starving everything else."""


STORE = Pool("continuity-store", max_workers=4)
"""State store calls. Bounded and apart from ACTIONS: a storm of playbook steps cannot delay an
incident write, and a sick API server holds at most four threads (each call bounded by the store's
request timeout and retries)."""

IO = Pool("continuity-io", max_workers=8)
"""Outbox sends (requests, one timeout each), the leader's pod label, config reload parsing."""


_ROUTED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Executor] = weakref.WeakKeyDictionary()


def route_all(loop: asyncio.AbstractEventLoop, executor: Executor) -> None:
    """Send every pool's work on `loop` to `executor` (the deterministic simulation runs all of it
    inline on virtual time, as it does the default executor's)."""
    _ROUTED[loop] = executor


async def run_in(pool: Pool | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`asyncio.to_thread`, on `pool` (None: the loop's default executor). Like `to_thread`, the
    caller's context variables (structlog's bound fields) travel with the call."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    call = functools.partial(ctx.run, fn, *args, **kwargs)
    routed = _ROUTED.get(loop)
    executor = routed if routed is not None else (None if pool is None else pool.executor())
    return await loop.run_in_executor(executor, call)
