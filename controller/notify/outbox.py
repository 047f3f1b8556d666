"""Delivery of queued messages: retried with backoff, kept until delivered, never dropped.

A message is written to the store before anyone tries to send it (the outbox pattern), so a
crash, a PagerDuty outage or a network cut loses nothing: the dispatcher picks it up again.
Only a 4xx other than 429 gives up, because resending a message the receiver calls invalid
will never succeed; that is recorded on the incident's timeline for a human.

A channel is either JSON over HTTP (`request` builds the URL and body; `post_json` sends it) or
has its own `send(payload, key)` (email, Statuspage, signed webhooks) raising Transient or
Permanent. Each channel may be paced (`rate_per_minute`): a token bucket in the dispatcher leaves
the excess due for a later drain, never dropped; a `Retry-After` pauses the whole channel.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import requests
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from controller.executors import IO, STORE, run_in
from controller.stores import OutboxMessage, Store

log = structlog.get_logger("continuity.outbox")


class Permanent(Exception):
    """The receiver refused the message as invalid: retrying cannot help."""


class Transient(Exception):
    """Network error, 429 or 5xx: retry later. `retry_after` honours the receiver's wish; `status` is
    the HTTP status when the receiver answered (429: it did not take the request)."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


@dataclass
class Channel:
    """Where one channel's messages go: an HTTP request built from a stored payload, or a sender."""

    name: str
    request: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]] | None = None
    """payload -> (url, json body); secrets are added here, at send time."""
    timeout: float = 10.0
    send: Callable[[dict[str, Any], str], Awaitable[None] | None] | None = None
    """(payload, idempotency key) -> None, raising Transient or Permanent. A plain function runs in
    a thread; a coroutine function on the loop. Used instead of `request` when set."""
    rate_per_minute: float | None = None
    """At most this many sends a minute (token bucket); None: unpaced."""
    burst: int | None = None
    """Bucket size: sends allowed back to back. Default: a tenth of a minute's worth, at least 1."""

    def __post_init__(self) -> None:
        if (self.request is None) == (self.send is None):
            raise ValueError(f"channel {self.name}: give exactly one of request or send")


class TokenBucket:
    """`rate_per_minute` tokens a minute, at most `capacity` saved up; time from the caller's clock."""

    def __init__(self, rate_per_minute: float, capacity: int, now: float) -> None:
        self.rate = rate_per_minute / 60.0
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + max(now - self.at, 0.0) * self.rate)
        self.at = max(self.at, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _retry_after(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def http_post(
    url: str, data: bytes, headers: dict[str, str], timeout: float, method: str = "POST"
) -> requests.Response:
    """Send raw bytes; map the answer to Transient (network, 429, 5xx) or Permanent (other 4xx)."""
    try:
        resp = requests.request(method, url, data=data, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise Transient(f"network error: {type(exc).__name__}: {exc}") from None
    return check_response(resp)


def check_response(resp: requests.Response) -> requests.Response:
    if resp.status_code == 429 or resp.status_code >= 500:
        raise Transient(
            f"HTTP {resp.status_code}: {resp.text[:200]}",
            _retry_after(resp.headers.get("Retry-After")),
            resp.status_code,
        )
    if resp.status_code >= 400:
        raise Permanent(f"HTTP {resp.status_code}: {resp.text[:300]}")
    return resp


def post_json(url: str, body: dict[str, Any], timeout: float) -> requests.Response:
    try:
        resp = requests.post(url, json=body, timeout=timeout)
    except requests.RequestException as exc:
        raise Transient(f"network error: {type(exc).__name__}: {exc}") from None
    return check_response(resp)


class Dispatcher:
    """Drains the outbox. Call `drain()` periodically (the controller does), or `run()` as a task."""

    def __init__(
        self,
        store: Store,
        channels: dict[str, Channel],
        clock: Callable[[], float],
        on_event: Callable[[OutboxMessage, str, str], None] | None = None,
        first_retry: float = 5.0,
        max_retry: float = 300.0,
        quick_attempts: int = 3,
    ) -> None:
        self.may_send: Callable[[], bool] = lambda: True
        """Set by the controller: only the leader delivers."""
        self._recording: dict[int, asyncio.Future[None]] = {}
        """Delivery records in flight, by message id (see `settle`)."""
        self._sent_unrecorded: dict[int, float] = {}
        """Messages delivered whose delivery is not known to be recorded yet: id -> when delivered.
        Never sent again; an id leaves only at the start of a drain after its record succeeded, before
        that drain reads what is due (a read from before the record could still list it)."""
        self._recorded: set[int] = set()
        self.record_wait = 0.5
        """How long a drain waits, after its sends, for their delivery records: a held store write
        must not hold the queue (the record carries on, and the message is never sent again)."""
        self.on_error: Callable[[], None] = lambda: None
        """Set by the controller: a failed drain is counted (continuity_task_restarts_total{task=
        "outbox"}, as every supervised task's failed cycle is), then retried next period."""
        self.store = store
        self.channels = channels
        self.clock = clock
        self.on_event = on_event or (lambda msg, kind, text: None)
        self.first_retry = first_retry
        self.max_retry = max_retry
        self.quick_attempts = quick_attempts
        self.wake = asyncio.Event()
        self.buckets: dict[str, TokenBucket] = {}
        self.paused_until: dict[str, float] = {}
        """A channel that answered Retry-After sends nothing more until then."""

    def _may_send(self, channel: Channel, now: float) -> bool:
        if self.paused_until.get(channel.name, 0.0) > now:
            return False
        if channel.rate_per_minute is None:
            return True
        bucket = self.buckets.get(channel.name)
        if bucket is None:
            burst = channel.burst or max(1, int(channel.rate_per_minute // 10))
            bucket = self.buckets[channel.name] = TokenBucket(channel.rate_per_minute, burst, now)
        return bucket.take(now)

    async def _attempt(self, channel: Channel, msg: OutboxMessage) -> None:
        if channel.send is not None:
            if inspect.iscoroutinefunction(channel.send):
                await channel.send(msg.payload, msg.key)
            else:
                await run_in(IO, channel.send, msg.payload, msg.key)
            return
        assert channel.request is not None
        url, body = channel.request(msg.payload)
        await run_in(IO, post_json, url, body, channel.timeout)

    async def _send(self, channel: Channel, msg: OutboxMessage) -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.quick_attempts),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            retry=retry_if_exception(lambda e: isinstance(e, Transient) and e.retry_after is None),
            reraise=True,
        ):
            with attempt:
                await self._attempt(channel, msg)

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        delay = min(self.first_retry * 2 ** max(attempts - 1, 0), self.max_retry)
        return delay * random.uniform(0.8, 1.2)

    async def drain(self) -> int:
        """Try every due message once (with a few quick retries); return how many were delivered.

        Messages about one incident on one channel go out in the order they were queued: a resolve
        that overtook its trigger (the trigger waiting out a receiver's outage) would reopen the
        alert it closes. And a message sent once is never sent again because the store could not
        record it: the record is retried, not the send (Slack has no dedup key)."""
        if not self.may_send():
            return 0  # a standby never sends: the leader owns the outbox
        for msg_id in self._recorded:
            self._sent_unrecorded.pop(msg_id, None)
        self._recorded.clear()
        for msg_id, at in self._sent_unrecorded.items():  # sent, but not recorded: record again
            if msg_id not in self._recording:
                self._record(msg_id, at)
        try:
            return await self._drain()
        finally:
            if self._recording:  # this drain's records, for a moment: never for a held write
                await asyncio.wait(list(self._recording.values()), timeout=self.record_wait)

    async def _drain(self) -> int:
        sent = 0
        due = await run_in(STORE, self.store.due, self.clock())
        due = [m for m in due if m.id not in self._sent_unrecorded]
        if not due:
            return 0
        # The oldest message still waiting in each (channel, incident) conversation; later ones wait.
        # A message sent whose record is not written yet is not waiting.
        head: dict[tuple[str, str], int] = {}
        for pending in await run_in(STORE, self.store.outbox):
            if not pending.dead and pending.id not in self._sent_unrecorded:
                group = _conversation(pending)
                head[group] = min(head.get(group, pending.id), pending.id)
        blocked: set[tuple[str, str]] = set()
        for msg in due:
            group = _conversation(msg)
            if group in blocked or head.get(group, msg.id) < msg.id:
                continue  # an earlier message of the same conversation has not gone out yet
            channel = self.channels.get(msg.channel)
            if channel is None:
                blocked.add(group)
                continue  # a channel removed from config: keep the message for when it returns
            if not self._may_send(channel, self.clock()):
                blocked.add(group)
                continue  # paced or paused: still due, the next drain takes it
            head[group] = msg.id
            try:
                await self._send(channel, msg)
            except Permanent as exc:
                head.pop(group, None)  # given up: it no longer holds the conversation back
                await run_in(STORE, self.store.give_up, msg.id, str(exc))
                log.error("notification refused", channel=msg.channel, key=msg.key, error=str(exc))
                self.on_event(msg, "refused", str(exc))
            except Transient as exc:
                blocked.add(group)
                delay = self.backoff(msg.attempts + 1, exc.retry_after)
                if exc.retry_after is not None:
                    self.paused_until[channel.name] = self.clock() + exc.retry_after
                await run_in(STORE, self.store.retry_later, msg.id, self.clock() + delay, str(exc))
                log.warning(
                    "notification not delivered, will retry",
                    channel=msg.channel,
                    key=msg.key,
                    error=str(exc),
                    retry_in_s=round(delay, 1),
                )
                self.on_event(msg, "retrying", f"{exc}; retry in {delay:.0f}s")
            else:
                at = self.clock()
                self._sent_unrecorded[msg.id] = at  # never resent; until recorded, the record is retried
                # Not awaited here: the next message goes out while the store writes this one's record.
                self._record(msg.id, at)
                head.pop(group, None)
                sent += 1
                log.info("notification delivered", channel=msg.channel, key=msg.key)
                self.on_event(msg, "delivered", "")
        return sent

    def _record(self, msg_id: int, at: float) -> None:
        """Write a delivery record off the loop, as a task of its own: a stop between the send and its
        record must not leave a sent message pending for the next process to send again (`settle`
        waits for it). A failed record is retried by the next drain; the message is not resent."""
        record = asyncio.ensure_future(run_in(STORE, self.store.delivered, msg_id, at))
        self._recording[msg_id] = record

        def done(f: asyncio.Future[None]) -> None:
            if self._recording.get(msg_id) is f:
                del self._recording[msg_id]
            if f.cancelled():
                return
            if (exc := f.exception()) is not None:
                log.warning("delivery not recorded; retried next drain", id=msg_id, error=str(exc))
                self.on_error()
            else:
                self._recorded.add(msg_id)

        record.add_done_callback(done)

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait for the delivery records still being written (the controller's stop, before the
        store closes)."""
        if self._recording:
            await asyncio.wait(list(self._recording.values()), timeout=timeout)

    async def run(self, stop: asyncio.Event, period: float = 1.0) -> None:
        while not stop.is_set():
            try:
                await self.drain()
            except Exception:  # a sick store (API 500s) must not end delivery for good: retry next period
                log.exception("outbox drain failed; retrying")
                self.on_error()
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=period)
            except TimeoutError:
                pass


def _conversation(msg: OutboxMessage) -> tuple[str, str]:
    """Messages that must arrive in order: one channel, one incident (or, for messages about no
    incident such as the isolation alert, one key family: `continuity/isolated/<t>/trigger|resolve`)."""
    return msg.channel, msg.incident_id or msg.key.rsplit("/", 1)[0]
