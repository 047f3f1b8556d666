"""Delivery of queued messages: retried with backoff, kept until delivered, never dropped.

A message is written to the store before anyone tries to send it (the outbox pattern), so a
crash, a PagerDuty outage or a network cut loses nothing: the dispatcher picks it up again.
Only a 4xx other than 429 gives up, because resending a message the receiver calls invalid
will never succeed; that is recorded on the incident's timeline for a human.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from controller.store import OutboxMessage, Store

log = structlog.get_logger("continuity.outbox")


class Permanent(Exception):
    """The receiver refused the message as invalid: retrying cannot help."""


class Transient(Exception):
    """Network error, 429 or 5xx: retry later. `retry_after` honours the receiver's wish."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Channel:
    """Where one channel's messages go: a function building the HTTP request from a stored payload."""

    name: str
    request: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
    """payload -> (url, json body); secrets are added here, at send time."""
    timeout: float = 10.0


def post_json(url: str, body: dict[str, Any], timeout: float) -> requests.Response:
    try:
        resp = requests.post(url, json=body, timeout=timeout)
    except requests.RequestException as exc:
        raise Transient(f"network error: {type(exc).__name__}: {exc}") from None
    if resp.status_code == 429 or resp.status_code >= 500:
        after = resp.headers.get("Retry-After")
        raise Transient(
            f"HTTP {resp.status_code}: {resp.text[:200]}", float(after) if after and after.isdigit() else None
        )
    if resp.status_code >= 400:
        raise Permanent(f"HTTP {resp.status_code}: {resp.text[:300]}")
    return resp


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
        self.store = store
        self.channels = channels
        self.clock = clock
        self.on_event = on_event or (lambda msg, kind, text: None)
        self.first_retry = first_retry
        self.max_retry = max_retry
        self.quick_attempts = quick_attempts
        self.wake = asyncio.Event()

    async def _send(self, channel: Channel, msg: OutboxMessage) -> None:
        url, body = channel.request(msg.payload)
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.quick_attempts),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            retry=retry_if_exception(lambda e: isinstance(e, Transient) and e.retry_after is None),
            reraise=True,
        ):
            with attempt:
                await asyncio.to_thread(post_json, url, body, channel.timeout)

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        delay = min(self.first_retry * 2 ** max(attempts - 1, 0), self.max_retry)
        return delay * random.uniform(0.8, 1.2)

    async def drain(self) -> int:
        """Try every due message once (with a few quick retries); return how many were delivered."""
        sent = 0
        for msg in self.store.due(self.clock()):
            channel = self.channels.get(msg.channel)
            if channel is None:
                continue  # a channel removed from config: keep the message for when it returns
            try:
                await self._send(channel, msg)
            except Permanent as exc:
                self.store.give_up(msg.id, str(exc))
                log.error("notification refused", channel=msg.channel, key=msg.key, error=str(exc))
                self.on_event(msg, "refused", str(exc))
            except Transient as exc:
                delay = self.backoff(msg.attempts + 1, exc.retry_after)
                self.store.retry_later(msg.id, self.clock() + delay, str(exc))
                log.warning(
                    "notification not delivered, will retry",
                    channel=msg.channel,
                    key=msg.key,
                    error=str(exc),
                    retry_in_s=round(delay, 1),
                )
                self.on_event(msg, "retrying", f"{exc}; retry in {delay:.0f}s")
            else:
                self.store.delivered(msg.id, self.clock())
                sent += 1
                log.info("notification delivered", channel=msg.channel, key=msg.key)
                self.on_event(msg, "delivered", "")
        return sent

    async def run(self, stop: asyncio.Event, period: float = 1.0) -> None:
        while not stop.is_set():
            await self.drain()
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=period)
            except TimeoutError:
                pass
