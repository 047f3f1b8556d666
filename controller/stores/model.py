"""The state model every store keeps: incidents, timelines, playbook runs and their journal, the
notification outbox and the per-service failover state, plus the `Store` protocol the controller codes
against.

This module imports no backend, so the SQLite and Kubernetes stores (and everything that only needs
the dataclasses) depend on it and never on each other: that is what cut the `store` <-> `kubestore`
import cycle.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Incident:
    id: str
    service: str
    severity: str
    status: str
    title: str
    opened_at: float
    started_at: float
    resolved_at: float | None
    dedup_key: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Event:
    incident_id: str
    ts: float
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    id: str
    incident_id: str | None
    service: str | None
    playbook: str
    state: str
    dry_run: bool
    started_at: float
    ended_at: float | None
    error: str | None
    owner: str | None = None
    """The controller process that may apply this run's steps (see `Store.claim_run`)."""


FAILOVER_STATES = (
    "primary",
    "awaiting_approval",
    "failing_over",
    "failed_over",
    "awaiting_failback_approval",
    "failing_back",
    "failover_failed",
    "failback_failed",
)
"""Where a service stands; only `controller.decide` moves it, one compare-and-swap at a time."""


@dataclass
class FailoverRecord:
    """The persisted failover state of one service. A service never written is `primary`, version 0."""

    service: str
    state: str = "primary"
    run_id: str | None = None
    """The run that owns the state: the failover or failback in progress or awaiting approval,
    or the run whose outcome put the service where it is."""
    incident_id: str | None = None
    reason: str = ""
    since: float = 0.0
    version: int = 0


@dataclass
class StepRecord:
    run_id: str
    idx: int
    name: str
    state: str
    attempts: int
    started_at: float | None
    ended_at: float | None
    detail: str | None


@dataclass
class OutboxMessage:
    id: int
    channel: str
    key: str
    incident_id: str | None
    payload: dict[str, Any]
    created_at: float
    attempts: int
    next_attempt_at: float
    delivered_at: float | None
    dead: bool
    last_error: str | None


class Store(Protocol):
    """What the controller needs from state; SQLite here, Kubernetes objects in a cluster."""

    def open_incident(
        self,
        service: str,
        severity: str,
        title: str,
        opened_at: float,
        started_at: float,
        data: dict[str, Any],
    ) -> Incident: ...
    def open_incident_for(self, service: str) -> Incident | None: ...
    def get_incident(self, incident_id: str) -> Incident | None: ...
    def list_incidents(self, status: str | None = None, limit: int = 100) -> list[Incident]: ...
    def update_incident(self, incident_id: str, **changes: Any) -> None: ...
    def append(
        self, incident_id: str, ts: float, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None: ...
    def append_many(self, events: list[Event]) -> None:
        """Several timeline entries in one write (one transaction, one object update per incident):
        what `controller.stores.aio.TimelineBatch` flushes once per tick."""
        ...

    def timeline(self, incident_id: str) -> list[Event]: ...
    def create_run(
        self,
        playbook: str,
        incident_id: str | None,
        service: str | None,
        dry_run: bool,
        started_at: float,
        steps: list[str],
    ) -> Run: ...
    def update_run(self, run_id: str, **changes: Any) -> None: ...
    def update_step(self, run_id: str, idx: int, **changes: Any) -> None: ...
    def add_step(self, run_id: str, idx: int, name: str) -> None: ...
    def get_run(self, run_id: str) -> Run | None: ...
    def get_flag(self, name: str) -> str | None: ...
    def set_flag(self, name: str, value: str | None) -> None: ...
    def flags(self, prefix: str = "") -> dict[str, str]: ...
    def runs(self, service: str | None = None, playbook: str | None = None) -> list[Run]: ...
    def steps(self, run_id: str) -> list[StepRecord]: ...
    def enqueue(
        self, channel: str, key: str, payload: dict[str, Any], incident_id: str | None, now: float
    ) -> bool: ...
    def due(self, now: float, limit: int = 50) -> list[OutboxMessage]: ...
    def delivered(self, msg_id: int, now: float) -> None: ...
    def retry_later(self, msg_id: int, next_at: float, error: str) -> None: ...
    def give_up(self, msg_id: int, error: str) -> None: ...
    def outbox(self, include_delivered: bool = False) -> list[OutboxMessage]: ...
    def set_ref(self, channel: str, incident_id: str, ref: str) -> None: ...
    def get_ref(self, channel: str, incident_id: str) -> str | None: ...
    def failover_states(self) -> dict[str, FailoverRecord]: ...
    def transition_failover(
        self,
        service: str,
        expect_version: int,
        state: str,
        run_id: str | None,
        incident_id: str | None,
        reason: str,
        at: float,
    ) -> FailoverRecord | None: ...
    def claim_run(self, run_id: str, owner: str, expect: str | None) -> bool: ...
    def close(self) -> None: ...


class StoreError(Exception):
    """The state store cannot be used (missing directory, corrupt file, disk full)."""


def new_incident(
    service: str, severity: str, title: str, opened_at: float, started_at: float, data: dict[str, Any]
) -> Incident:
    """A fresh open incident; its PagerDuty dedup_key is fixed here, once, for every backend."""
    inc = Incident(new_id("INC"), service, severity, "open", title, opened_at, started_at, None, "", data)
    inc.dedup_key = f"continuity/{inc.id}"
    return inc


def new_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d', time.gmtime())}-{secrets.token_hex(3)}"
