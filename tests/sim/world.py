"""The simulated world: what is really true, per region and service, at every virtual second.

The controller never reads this directly: it sees the world only through the edges (probes, AWS,
notifier transports, the store, the elector), exactly as in production. The invariants compare
what the controller did with this truth.

Regions: `eu` (the primary) and `us` (the secondary). The checkout service is served by the region
its DNS record points at, so a failover really moves it. A fault is an interval on the timeline.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

REGION_IP = {"eu": "10.0.1.1", "us": "10.0.2.1"}
IP_REGION = {ip: r for r, ip in REGION_IP.items()}
CHECKOUT = "checkout.shop.sim."

TARGET_FAULTS = ("refused", "hang", "http5xx", "slow", "flaky", "step")
"""Faults of a region: what its servers do."""
HARD = ("refused", "hang", "http5xx", "step")
"""Target faults that make the region really down (a failover is warranted)."""
PROBER_FAULTS = ("emfile", "resolver", "loop_stall")
"""Faults of the machine the controller runs on: its probes fail, the targets do not."""
NETWORK_FAULTS = ("isolation", "vantage")
"""The controller (or one agent) cut off from everything: nothing is wrong with the targets."""


@dataclass(frozen=True)
class Fault:
    kind: str
    start: float
    """Seconds after the run's start."""
    end: float
    region: str | None = None
    rate: float = 0.0
    """flaky: the share of requests that fail."""
    step: str | None = None
    """step: the journey step that fails; vantage: the cut-off vantage point."""
    latency: float = 0.0
    """slow: how long each answer takes."""

    def active(self, t: float) -> bool:
        return self.start <= t < self.end

    def describe(self) -> str:
        extra = {
            "flaky": f" rate={self.rate:.0%}",
            "step": f" step={self.step}",
            "slow": f" latency={self.latency:g}s",
            "vantage": f" vantage={self.step}",
        }.get(self.kind, "")
        where = f" {self.region}" if self.region else ""
        return f"{self.kind}{where}{extra} [{self.start:.0f}s, {self.end:.0f}s)"


@dataclass(frozen=True)
class Event:
    """A discrete happening the world imposes: crash, leader change, store errors, receiver outage,
    AWS trouble. `until` is the end of a window (store errors, receiver down, AWS mode)."""

    kind: str
    at: float
    until: float = 0.0
    target: str = ""
    """receiver name, AWS mode (throttle|fail|slow|timeout_after), leader identity..."""
    value: float = 0.0

    def describe(self) -> str:
        span = f" until {self.until:.0f}s" if self.until else ""
        what = f" {self.target}" if self.target else ""
        val = f" ({self.value:g})" if self.value else ""
        return f"{self.kind}{what}{val} at {self.at:.0f}s{span}"


@dataclass
class Call:
    """One call that changed the world (AWS mutation, webhook POST, notification delivery)."""

    t: float
    actor: str
    kind: str
    """route53 | rds | http | notify"""
    key: str
    """What was changed, for the at-most-once count (e.g. `checkout.shop.sim.->us@INC-...`)."""
    applied: bool
    detail: dict[str, Any] = field(default_factory=dict)


class World:
    """Truth timeline plus the log of everything the controller did to the world."""

    def __init__(self, seed: int, start: float, faults: list[Fault], events: list[Event]) -> None:
        self.seed = seed
        self.rng = random.Random(seed ^ 0x5EED)
        self.t0 = start
        self.faults = faults
        self.events = events
        self.record: list[tuple[float, str]] = [(0.0, "eu")]
        """(relative time, region) history of the checkout DNS record."""
        self.writer: list[tuple[float, str]] = [(0.0, "eu")]
        self.calls: list[Call] = []
        self.deliveries: list[Call] = []
        self.statuspage: dict[str, list[Any]] = {}
        """Statuspage's incidents by its id: the create's body, then every PATCH."""
        self.own_alerts: list[tuple[float, str, str]] = []
        """(relative time, actor, kind) of every prober-error event a controller emitted."""
        self.pushes: list[tuple[float, str, str, int]] = []
        """(relative time, endpoint, who, HTTP status) of every pushed request the world made."""
        self.approvals: list[tuple[float, str, str]] = []
        """(relative time, run id, approve|reject) of every answer the on-call human got through."""
        self.result_posts: list[tuple[float, str, str, float, bool, int]] = []
        """(relative time, receiving actor, vantage, seconds ahead of its clock, may vote, accepted)."""
        self.leader: str | None = None
        self.leadership: list[tuple[float, str | None]] = []
        self.dead: set[str] = set()
        """Actors (controller processes) that crashed: their edges refuse everything."""
        self.samples: list[tuple[float, float]] = []
        """(relative time, lateness) from the stall monitor."""
        self.tick_gaps: list[tuple[float, str, float]] = []
        self.notes: list[str] = []
        self.now_abs = start

    # ------------------------------------------------------------------ time

    def rel(self, now_abs: float) -> float:
        return now_abs - self.t0

    # ------------------------------------------------------------------ truth

    def active(self, kind: str | tuple[str, ...], t: float, region: str | None = None) -> list[Fault]:
        kinds = (kind,) if isinstance(kind, str) else kind
        return [
            f
            for f in self.faults
            if f.kind in kinds and f.active(t) and (region is None or f.region is None or f.region == region)
        ]

    def serving(self, t: float) -> str:
        region = self.record[0][1]
        for at, r in self.record:
            if at <= t:
                region = r
        return region

    def hard_down(self, region: str, t: float) -> bool:
        return bool(self.active(HARD, t, region))

    def service_failing(self, t: float) -> bool:
        return self.hard_down(self.serving(t), t)

    def breakpoints(self) -> list[float]:
        pts = {0.0}
        for f in self.faults:
            pts.update((f.start, f.end))
        pts.update(t for t, _ in self.record)
        return sorted(pts)

    def failing_intervals(self, end: float, predicate: Any) -> list[tuple[float, float]]:
        """Maximal intervals in [0, end) where `predicate(t)` holds (checked between breakpoints)."""
        pts = [p for p in self.breakpoints() if p < end] + [end]
        out: list[tuple[float, float]] = []
        for a, b in itertools.pairwise(pts):
            if b <= a:
                continue
            if predicate((a + b) / 2):
                if out and abs(out[-1][1] - a) < 1e-9:
                    out[-1] = (out[-1][0], b)
                else:
                    out.append((a, b))
        return out

    def describe(self) -> str:
        lines = [f"seed {self.seed}"]
        lines += [f"  fault {f.describe()}" for f in sorted(self.faults, key=lambda f: f.start)]
        lines += [f"  event {e.describe()}" for e in sorted(self.events, key=lambda e: e.at)]
        return "\n".join(lines)

    # ------------------------------------------------------------------ edges' bookkeeping

    def switch(self, t: float, region: str) -> None:
        if self.serving(t) != region:
            self.record.append((t, region))

    def event_active(self, kind: str, t: float, target: str | None = None) -> Event | None:
        for e in self.events:
            if e.kind == kind and e.at <= t < e.until and (target is None or e.target == target):
                return e
        return None
