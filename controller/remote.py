"""`continuity agent`: probes from another region or cluster, pushed to the controller.

A target counts as down only when a quorum of vantage points agree, as orchestrator confirms a
failure from more than one point of view; so an agent does nothing but probe and report. It
batches results, retries with backoff when the controller is unreachable, and drops results
once they are too old to vote anyway (the controller ignores stale ones).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import replace
from typing import Any

import aiohttp
import structlog

from controller.config import Config
from probes.base import ProbeResult
from probes.runner import run_probe
from probes.scheduler import Scheduler

log = structlog.get_logger("continuity.agent")


class ResultError(ValueError):
    """A pushed result that does not follow the format; the message names the field."""


def to_wire(result: ProbeResult) -> dict[str, Any]:
    return {
        "probe": result.probe,
        "ok": result.ok,
        "started_at": result.started_at,
        "latency": result.latency,
        "reason": result.reason,
        "vantage": result.vantage,
        "details": result.details,
    }


def parse_results(body: Any) -> list[ProbeResult]:
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        raise ResultError('body: expected {"results": [...]}')
    out = []
    for i, r in enumerate(body["results"]):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            raise ResultError(f"{where}: expected an object")
        for key, kind in (("probe", str), ("ok", bool), ("vantage", str)):
            if not isinstance(r.get(key), kind):
                raise ResultError(f"{where}.{key}: expected a {kind.__name__}, found {r.get(key)!r}")
        for key in ("started_at", "latency"):
            value = r.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                # json reads NaN and Infinity: a result stamped Infinity would vote forever
                raise ResultError(f"{where}.{key}: expected a finite number, found {value!r}")
        details = r.get("details") or {}
        if not isinstance(details, dict):
            raise ResultError(f"{where}.details: expected an object")
        reason = str(r.get("reason") or "")
        out.append(
            ProbeResult(
                r["probe"],
                r["ok"],
                float(r["started_at"]),
                float(r["latency"]),
                error="" if r["ok"] else reason or "failed",
                vantage=r["vantage"],
                details=details,
            )
        )
    return out


CLOCK_SKEW = 30.0
"""Seconds an agent's clock may run ahead of ours: such a result is clamped to the time we received
it. Further ahead it is refused: a result stamped in the future would stay fresh, and vote, forever."""
MAX_VANTAGES = 64
"""Vantage points kept per probe; a new name beyond it is refused (an agent typo must not grow memory)."""


def admit(result: ProbeResult, now: float, freshness: float) -> tuple[ProbeResult | None, str]:
    """Decide whether a pushed result may vote, by its time: (result to ingest or None, outcome).

    Pure, so the rule is the same in the API and in tests: `future` (refused), `clamped` (a little
    ahead: stamped with our receive time), `stale` (older than the freshness window: it could not
    vote anyway) or `accepted`.
    """
    ahead = result.started_at - now
    if ahead > CLOCK_SKEW:
        return None, "future"
    if ahead > 0:
        return replace(result, started_at=now), "clamped"
    if now - result.started_at > freshness:
        return None, "stale"
    return result, "accepted"


class Agent:
    def __init__(
        self,
        config: Config,
        controller_url: str,
        vantage: str,
        token: str,
        probes: list[str] | None = None,
        batch_every: float = 1.0,
        keep: int = 10_000,
    ) -> None:
        names = probes or list(config.probes)
        self.probes = {
            n: config.probes[n] for n in names if config.probes[n].kind not in ("heartbeat", "alertmanager")
        }
        self.url = controller_url.rstrip("/") + "/results"
        self.vantage = vantage
        self.token = token
        self.batch_every = batch_every
        self.pending: deque[ProbeResult] = deque(maxlen=keep)
        self.sent = 0
        self.max_age = max((3 * p.interval + p.timeout for p in self.probes.values()), default=60.0)

    async def _run(self, name: str, cfg: Any) -> ProbeResult:
        return await run_probe(name, cfg, vantage=self.vantage)

    async def _push(self, session: aiohttp.ClientSession) -> None:
        now = time.time()
        while self.pending and now - self.pending[0].started_at > self.max_age:
            self.pending.popleft()  # too old to vote: the controller would ignore it
        if not self.pending:
            return
        batch = list(self.pending)
        try:
            async with session.post(
                self.url,
                json={"results": [to_wire(r) for r in batch]},
                headers={"Authorization": f"Bearer {self.token}"},
            ) as resp:
                if resp.status >= 400:
                    text = await resp.text()
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=text[:200]
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot push results; keeping them", url=self.url, error=str(exc), pending=len(batch))
            return
        for _ in batch:
            self.pending.popleft()
        self.sent += len(batch)

    async def run(self, stop: asyncio.Event) -> None:
        scheduler = Scheduler(self.probes, self._run, self.pending.append)
        task = asyncio.create_task(scheduler.run(stop))
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.batch_every)
                except TimeoutError:
                    pass
                await self._push(session)
        await asyncio.gather(task, return_exceptions=True)
