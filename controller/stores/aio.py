"""The store as the event loop uses it: every call on the `STORE` pool, timeline writes batched.

A `Store` is synchronous (SQLite, or HTTP round trips to the Kubernetes API that a sick server can
stretch to seconds with retries). Called on the loop, one slow call stalls every probe in flight and
a stall longer than a probe's timeout fails them all. `AsyncStore` is the one way the controller's
coroutines reach the store: each method awaits the same call on `controller.executors.STORE`, a
bounded pool of its own, so a sick store delays the decisions that need it and nothing else.

Timeline entries are the most frequent write (a verdict change, a decision, a notification each add
one) and never read back by the loop, so they are not awaited at all: `append` queues the entry in
memory (`TimelineBatch`) and `flush` writes what is queued in one call per incident (one SQLite
transaction, one read-modify-write of the Incident object) once per tick, or sooner when
`flush_at` entries are waiting. An entry is removed from the queue only once its write succeeded:
a store error leaves it queued for the next flush, and `close` (the controller's stop) flushes what
is left, retrying a few times. The one cost of a retry: a write that timed out after the server
applied it is written again (a duplicate line is better than a lost one).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from controller.executors import STORE, Pool, run_in
from controller.stores.model import (
    Event,
    FailoverRecord,
    Incident,
    OutboxMessage,
    Run,
    StepRecord,
    Store,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot:
    """Everything one reconcile reads from the store, read in one trip to the `STORE` pool (with the
    Kubernetes store's cache, from memory): the open incidents, every flag, the failover states,
    the runs and the outbox. The tick decides on this and on nothing read later."""

    open_incidents: list[Incident]
    """Newest first, as `list_incidents` returns them."""
    all_flags: dict[str, str]
    failover: dict[str, FailoverRecord]
    runs: list[Run]
    outbox: list[OutboxMessage]
    """Messages not yet delivered (the depth gauges)."""

    def flag(self, name: str) -> str | None:
        return self.all_flags.get(name)

    def flags(self, prefix: str = "") -> dict[str, str]:
        return {k: v for k, v in self.all_flags.items() if k.startswith(prefix)}


def read_snapshot(store: Store) -> Snapshot:
    """One tick's reads (blocking: call it through `AsyncStore.snapshot`)."""
    return Snapshot(
        open_incidents=store.list_incidents(status="open", limit=1_000_000),
        all_flags=store.flags(),
        failover=store.failover_states(),
        runs=store.runs(),
        outbox=store.outbox(),
    )


class TimelineBatch:
    """Timeline entries queued in memory, written in one call per incident per flush (module doc)."""

    def __init__(self, store: Store, pool: Pool | None = STORE, flush_at: int = 200) -> None:
        self.store = store
        self.pool = pool
        self.flush_at = flush_at
        self._pending: list[Event] = []
        self._lock = threading.Lock()  # playbook actions record from worker threads
        self._flushing: asyncio.Lock | None = None
        self._early: asyncio.Task[int] | None = None
        self.failures = 0
        """Flushes of one incident's entries that failed (and were left queued to retry)."""
        self.written = 0

    def add(self, incident_id: str, ts: float, kind: str, message: str, data: dict[str, Any] | None) -> None:
        """Queue one entry; never blocks, never fails. From the loop, a full batch flushes at once."""
        with self._lock:
            self._pending.append(Event(incident_id, ts, kind, message, dict(data or {})))
            full = len(self._pending) >= self.flush_at
        if full:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # a worker thread: the next tick's flush takes it
            if self._early is None or self._early.done():
                self._early = loop.create_task(self.flush(), name="timeline-flush")

    def pending(self) -> list[Event]:
        with self._lock:
            return list(self._pending)

    async def flush(self) -> int:
        """Write every queued entry, one `append_many` per incident; return how many were written.
        Entries whose write failed go back to the head of the queue, in their order."""
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return 0
            by_incident: dict[str, list[Event]] = {}
            for e in batch:
                by_incident.setdefault(e.incident_id, []).append(e)
            failed: list[Event] = []
            written = 0
            for incident_id, events in by_incident.items():
                try:
                    await run_in(self.pool, self.store.append_many, events)
                    written += len(events)
                except Exception as exc:
                    self.failures += 1
                    failed.extend(events)
                    log.warning(
                        "timeline write failed; the entries stay queued and are retried",
                        incident=incident_id,
                        entries=len(events),
                        error=f"{type(exc).__name__}: {exc}",
                    )
            if failed:
                with self._lock:
                    self._pending[:0] = failed
            self.written += written
            return written

    async def close(self, attempts: int = 5, pause: float = 0.5) -> bool:
        """Flush until nothing is queued, up to `attempts` times (the controller's stop); True when
        every entry was written. What is still queued after that is logged, entry by entry."""
        for attempt in range(attempts):
            await self.flush()
            if not self.pending():
                return True
            if attempt + 1 < attempts:
                await asyncio.sleep(pause)
        for e in self.pending():
            log.error(
                "timeline entry not written at stop", incident=e.incident_id, kind=e.kind, message=e.message
            )
        return False


class AsyncStore:
    """The `Store` protocol awaited on the `STORE` pool, with `append` batched (module doc).

    `store` stays reachable for code that runs in a worker thread already (playbook actions)."""

    def __init__(self, store: Store, pool: Pool | None = STORE, flush_at: int = 200) -> None:
        self.store = store
        self.pool = pool
        self.batch = TimelineBatch(store, pool, flush_at)
        self.batching = BatchingStore(store, self.batch)
        """The synchronous view whose `append` queues here (see `BatchingStore`)."""
        self._flags: dict[str, str | None] = {}
        self._flag_lock = threading.Lock()
        self._flushing: asyncio.Future[None] | None = None
        """The tick's flush in flight (`flush_within`)."""
        """The synchronous view whose `append` queues here (see `BatchingStore`)."""

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Any blocking function of the store (or one that calls several of its methods) on the pool."""
        return await run_in(self.pool, fn, *args, **kwargs)

    async def snapshot(self) -> Snapshot:
        return await self.call(read_snapshot, self.store)

    # ---- timeline: queued, flushed per tick
    def append(
        self, incident_id: str, ts: float, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        self.batch.add(incident_id, ts, kind, message, data)

    def defer_flag(self, name: str, value: str | None) -> None:
        """Set a flag at the next flush, never blocking (pushed signals: heartbeats, alerts). Only the
        latest value of each name is written; a failed write stays queued unless a newer one came."""
        with self._flag_lock:
            self._flags.pop(name, None)
            self._flags[name] = value

    def deferred_flags(self) -> dict[str, str | None]:
        with self._flag_lock:
            return dict(self._flags)

    async def flush(self) -> int:
        """Write the queued timeline entries, then the deferred flags; return the entries written."""
        written = await self.batch.flush()
        for name, value in self.deferred_flags().items():
            try:
                await self.call(self.store.set_flag, name, value)
            except Exception as exc:
                log.warning("deferred flag not written; retried next flush", flag=name, error=str(exc))
                continue
            with self._flag_lock:
                if name in self._flags and self._flags[name] == value:
                    del self._flags[name]
        return written

    async def flush_within(self, seconds: float) -> None:
        """The tick's flush, waited for at most `seconds`: a write the API server holds must not hold
        the tick (the next tick would open the incident, and queue the page, that long late). The
        flush carries on; while it runs no other is started (nor waited for), and what it has not
        taken stays queued for the next one. Its errors are logged (entries stay queued, retried)."""
        if self._flushing is not None and not self._flushing.done():
            return  # an earlier tick's flush is still held: this tick does not wait on it again
        self._flushing = asyncio.ensure_future(self._flush_logged())
        await asyncio.wait({self._flushing}, timeout=seconds)

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.exception("timeline flush failed; the next tick retries")

    async def close(self, attempts: int = 5, pause: float = 0.5) -> bool:
        """Flush what is queued, retrying a few times (the controller's stop); True when nothing is
        left. The store itself is closed by whoever opened it."""
        if self._flushing is not None:
            await asyncio.wait({self._flushing})  # the tick's flush in flight (each call is bounded)
        for attempt in range(attempts):
            await self.flush()
            if not self.batch.pending() and not self.deferred_flags():
                return True
            if attempt + 1 < attempts:
                await asyncio.sleep(pause)
        return await self.batch.close(attempts=1) and not self.deferred_flags()

    async def timeline(self, incident_id: str) -> list[Event]:
        """What is written, then what is still queued for this incident (in time order)."""
        written = await self.call(self.store.timeline, incident_id)
        queued = [e for e in self.batch.pending() if e.incident_id == incident_id]
        return sorted([*written, *queued], key=lambda e: e.ts) if queued else written

    # ---- everything else: one awaited call each
    async def open_incident(
        self,
        service: str,
        severity: str,
        title: str,
        opened_at: float,
        started_at: float,
        data: dict[str, Any],
    ) -> Incident:
        s = self.store
        return await self.call(s.open_incident, service, severity, title, opened_at, started_at, data)

    async def open_incident_for(self, service: str) -> Incident | None:
        return await self.call(self.store.open_incident_for, service)

    async def get_incident(self, incident_id: str) -> Incident | None:
        return await self.call(self.store.get_incident, incident_id)

    async def list_incidents(self, status: str | None = None, limit: int = 100) -> list[Incident]:
        return await self.call(self.store.list_incidents, status, limit)

    async def update_incident(self, incident_id: str, **changes: Any) -> None:
        await self.call(self.store.update_incident, incident_id, **changes)

    async def create_run(
        self,
        playbook: str,
        incident_id: str | None,
        service: str | None,
        dry_run: bool,
        started_at: float,
        steps: list[str],
    ) -> Run:
        s = self.store
        return await self.call(s.create_run, playbook, incident_id, service, dry_run, started_at, steps)

    async def update_run(self, run_id: str, **changes: Any) -> None:
        await self.call(self.store.update_run, run_id, **changes)

    async def get_run(self, run_id: str) -> Run | None:
        return await self.call(self.store.get_run, run_id)

    async def runs(self, service: str | None = None, playbook: str | None = None) -> list[Run]:
        return await self.call(self.store.runs, service, playbook)

    async def steps(self, run_id: str) -> list[StepRecord]:
        return await self.call(self.store.steps, run_id)

    async def get_flag(self, name: str) -> str | None:
        return await self.call(self.store.get_flag, name)

    async def set_flag(self, name: str, value: str | None) -> None:
        await self.call(self.store.set_flag, name, value)

    async def flags(self, prefix: str = "") -> dict[str, str]:
        return await self.call(self.store.flags, prefix)

    async def enqueue(
        self, channel: str, key: str, payload: dict[str, Any], incident_id: str | None, now: float
    ) -> bool:
        return await self.call(self.store.enqueue, channel, key, payload, incident_id, now)

    async def outbox(self, include_delivered: bool = False) -> list[OutboxMessage]:
        return await self.call(self.store.outbox, include_delivered)

    async def failover_states(self) -> dict[str, FailoverRecord]:
        return await self.call(self.store.failover_states)

    async def transition_failover(
        self,
        service: str,
        expect_version: int,
        state: str,
        run_id: str | None,
        incident_id: str | None,
        reason: str,
        at: float,
    ) -> FailoverRecord | None:
        return await self.call(
            self.store.transition_failover, service, expect_version, state, run_id, incident_id, reason, at
        )

    async def claim_run(self, run_id: str, owner: str, expect: str | None) -> bool:
        return await self.call(self.store.claim_run, run_id, owner, expect)


class BatchingStore:
    """A `Store` whose `append` queues into a `TimelineBatch` instead of writing: handed to the
    parts of the controller that record on the timeline from the loop (effects, runs, the tracker,
    the communicator), so that no timeline entry is a round trip on the loop. Everything else passes
    through to the wrapped store; `timeline` includes what is still queued."""

    def __init__(self, store: Store, batch: TimelineBatch) -> None:
        self._inner = store
        self._batch = batch

    def append(
        self, incident_id: str, ts: float, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        self._batch.add(incident_id, ts, kind, message, data)

    def timeline(self, incident_id: str) -> list[Event]:
        written = self._inner.timeline(incident_id)
        queued = [e for e in self._batch.pending() if e.incident_id == incident_id]
        return sorted([*written, *queued], key=lambda e: e.ts) if queued else written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
