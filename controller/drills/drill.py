"""What a drill is made of: the `Scenario` (data plus small functions), the `Drill` a scenario's
functions see while it runs, and the `Objective`s and `DrillResult` the scoring produces.

Scenario and Drill name each other, so they live together here; the built-in scenarios
(`scenarios.py`) and the runner (`runner.py`) both build on this module and never import each other
the other way round (that was the runner <-> scenarios import cycle).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

from controller.config import Config
from controller.drills.names import SCENARIOS
from controller.durations import format_duration
from controller.executors import STORE, run_in
from controller.stores import Incident, Store


def _nothing(raw: dict[str, Any], drill: Drill) -> None:
    return None


async def _no_prepare(drill: Drill) -> None:
    return None


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    rehearses: str
    """The risk in words: what happens to the business."""
    expected: str
    """failover | no_failover | page_only (from names.SCENARIOS)."""
    right_outcome: str
    """The right outcome in words, for the report."""
    inject: Callable[[Drill], Coroutine[Any, Any, None]]
    """Break things. May keep running (a flapping link) until the drill ends; it is then cancelled."""
    done: Callable[[Drill], bool]
    """True once the drill has seen enough to score (checked every 100 ms)."""
    deadline: float = 40.0
    """Give up waiting after this many seconds from the injection."""
    tweak: Callable[[dict[str, Any], Drill], None] = _nothing
    """Edit the demo config (the raw YAML mapping) for this drill."""
    prepare: Callable[[Drill], Awaitable[None]] = _no_prepare
    """Start extra targets before the controller starts (reference servers)."""
    checks: Callable[[Drill], list[Objective]] = field(default=lambda drill: [])
    subprocess: bool = False
    """Run the controller as `python -m controller.cli run` processes rather than in-process."""
    database: bool = True
    """The primary database is lost with the fault (data-loss window measured against the RPO)."""
    replica_lag: float = 0.5
    """Simulated asynchronous replication lag of the standby at the moment of the loss."""
    target_faults: str | None = None
    """With --target, how the fault is injected at the probe level: service | all | flap; None: demo only."""

    def __post_init__(self) -> None:
        assert SCENARIOS[self.name] == self.expected, self.name


class DrillError(Exception):
    """The drill could not be run (not the same as a drill that failed its objectives)."""


@dataclass
class Objective:
    name: str
    target: str
    actual: str
    passed: bool


@dataclass
class DrillResult:
    scenario: str
    title: str
    mode: str
    expected: str
    right_outcome: str
    outcome: str
    passed: bool
    started_at: float
    wall_s: float
    service: str | None
    rto_s: float
    rpo_s: float
    measures: dict[str, float | None]
    objectives: list[Objective]
    actions_taken: list[str]
    actions_wrongly_taken: list[str]
    messages_sent: list[str]
    notes: list[str]
    marks: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def missed(self) -> list[Objective]:
        return [o for o in self.objectives if not o.passed]


class Drill:
    """What a scenario's functions see while the drill runs, and what the scoring reads."""

    def __init__(self, scenario: Scenario, env: Any = None) -> None:
        self.scenario = scenario
        self.env = env
        self.opened: Store | None = None
        """The drill's store, once the runner has opened it (before the controller starts)."""
        self.config: Config | None = None
        self.focus: str | None = None
        """The service the scenario aims at (the one with the failover playbook)."""
        self.t0: float | None = None
        self.marks: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self.cleanups: list[Callable[[], Awaitable[None]]] = []
        self.notes: list[tuple[float, str]] = []
        self.pages: list[tuple[float, dict[str, Any]]] = []
        self.verdicts: list[tuple[float, str, str]] = []
        self.record_moves: list[tuple[float, str]] = []
        self.writer_moves: list[tuple[float, str]] = []

    @property
    def store(self) -> Store:
        if self.opened is None:
            raise DrillError("the drill's store is read before the runner opened it")
        return self.opened

    # -------------------------------------------------------------- for scenarios

    def now(self) -> float:
        return time.time()

    def since_injection(self) -> float:
        return 0.0 if self.t0 is None else self.now() - self.t0

    def note(self, text: str) -> None:
        self.notes.append((self.now(), text))

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, self.now())

    def incidents(self) -> list[Incident]:
        return sorted(self.store.list_incidents(), key=lambda i: i.opened_at)

    def first_incident(self) -> Incident | None:
        """The first incident of the service under drill (others may open alongside)."""
        found = [i for i in self.incidents() if self.focus is None or i.service == self.focus]
        return found[0] if found else None

    def triggers(self) -> list[dict[str, Any]]:
        return [e for _, e in self.pages if e.get("event_action") == "trigger"]

    def runs_in_progress(self) -> bool:
        return any(r.state in ("running", "awaiting_approval") for r in self.store.runs())

    # -------------------------------------------------------------- observers

    def on_page(self, event: dict[str, Any]) -> None:
        self.pages.append((self.now(), event))

    def on_event(self, kind: str, facts: dict[str, Any]) -> None:
        if kind == "probe_verdict":
            self.verdicts.append((self.now(), facts["probe"], facts["status"]))

    async def watch(self) -> None:
        """Read Route 53 and the Aurora writer back from moto, as an outsider would."""
        assert self.env is not None
        last_ip, last_writer = (
            await asyncio.to_thread(self.env.record),
            await asyncio.to_thread(self.env.writer),
        )
        while True:
            await asyncio.sleep(0.25)
            ip, writer = await asyncio.to_thread(self.env.record), await asyncio.to_thread(self.env.writer)
            if ip != last_ip:
                self.record_moves.append((self.now(), ip[0]))
            if writer != last_writer:
                self.writer_moves.append((self.now(), str(writer)))
            last_ip, last_writer = ip, writer

    async def wait_until(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready` until it holds. It reads the drill's store, so it runs on the STORE pool: the
        controller under drill shares this loop, and a drill must not stall its probes."""
        end = time.monotonic() + timeout
        while not await run_in(STORE, ready):
            if time.monotonic() > end:
                raise DrillError(f"{what}: not reached within {format_duration(timeout)}")
            await asyncio.sleep(0.1)

    async def until_done(self) -> bool:
        """Wait for the scenario's end condition; False if the deadline passed first."""
        end = time.monotonic() + self.scenario.deadline
        while not await run_in(STORE, self.scenario.done, self):
            if time.monotonic() > end:
                self.note(f"deadline of {format_duration(self.scenario.deadline)} reached; scoring as is")
                return False
            await asyncio.sleep(0.1)
        return True
