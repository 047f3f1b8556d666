"""The embedded default store: SQLite in WAL mode.

A reader (the CLI listing incidents) never blocks the controller, and a crash loses at most the
transaction in hand. Every write commits before the caller goes on, so what the timeline says
happened, happened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from controller.stores.model import (
    FAILOVER_STATES,
    Event,
    FailoverRecord,
    Incident,
    OutboxMessage,
    Run,
    StepRecord,
    StoreError,
    new_id,
    new_incident,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    severity TEXT NOT NULL,
    status TEXT NOT NULL,            -- open | resolved
    title TEXT NOT NULL,
    opened_at REAL NOT NULL,
    started_at REAL NOT NULL,        -- first failed observation: the outage's start
    resolved_at REAL,
    dedup_key TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS incidents_open ON incidents(service, status);
CREATE TABLE IF NOT EXISTS timeline (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS timeline_incident ON timeline(incident_id, seq);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    incident_id TEXT,
    service TEXT,
    playbook TEXT NOT NULL,
    state TEXT NOT NULL,             -- running | succeeded | failed
    dry_run INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    error TEXT,
    owner TEXT                       -- the process allowed to apply its steps (claim_run)
);
CREATE INDEX IF NOT EXISTS runs_service ON runs(service, playbook, started_at);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,             -- pending | running | done | failed | skipped
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    ended_at REAL,
    detail TEXT,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS flags (
    name TEXT PRIMARY KEY,           -- paused, frozen:SERVICE, approval:RUN_ID ...
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,        -- idempotency: one message per incident, event and channel
    incident_id TEXT,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    dead INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(delivered_at, dead, next_attempt_at);
CREATE TABLE IF NOT EXISTS failover (
    service TEXT PRIMARY KEY,        -- one row per service that has ever left `primary`
    state TEXT NOT NULL,             -- primary | awaiting_approval | failing_over | failed_over | ...
    run_id TEXT,                     -- the run that owns the state (failing over / back), if any
    incident_id TEXT,
    reason TEXT NOT NULL,            -- the sentence of the last transition
    since REAL NOT NULL,
    version INTEGER NOT NULL         -- compare-and-swap: a transition names the version it read
);
CREATE TABLE IF NOT EXISTS channel_refs (
    channel TEXT NOT NULL,           -- e.g. statuspage
    incident_id TEXT NOT NULL,       -- ours
    ref TEXT NOT NULL,               -- theirs: the id the channel gave the incident
    PRIMARY KEY (channel, incident_id)
);
"""


class SQLiteStore:
    """The embedded default store: one file, WAL, safe to read from the CLI while the controller runs."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / "continuity.db"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            cols = {r["name"] for r in self._db.execute("PRAGMA table_info(runs)").fetchall()}
            if "owner" not in cols:  # a store written before runs had owners
                try:
                    self._db.execute("ALTER TABLE runs ADD COLUMN owner TEXT")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StoreError(f"{self.path}: cannot open the state store: {exc}") from None
        self._lock = threading.RLock()  # playbook actions record from worker threads

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self._db.execute(sql, args)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- incidents

    @staticmethod
    def _incident(row: sqlite3.Row) -> Incident:
        d = dict(row)
        d["data"] = json.loads(d["data"])
        return Incident(**d)

    def open_incident(
        self,
        service: str,
        severity: str,
        title: str,
        opened_at: float,
        started_at: float,
        data: dict[str, Any],
    ) -> Incident:
        inc = new_incident(service, severity, title, opened_at, started_at, data)
        self._exec(
            "INSERT INTO incidents VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                inc.id,
                service,
                severity,
                "open",
                title,
                opened_at,
                started_at,
                None,
                inc.dedup_key,
                json.dumps(data),
            ),
        )
        return inc

    def open_incident_for(self, service: str) -> Incident | None:
        row = self._exec(
            "SELECT * FROM incidents WHERE service=? AND status='open' ORDER BY opened_at DESC LIMIT 1",
            (service,),
        ).fetchone()
        return self._incident(row) if row else None

    def get_incident(self, incident_id: str) -> Incident | None:
        row = self._exec("SELECT * FROM incidents WHERE id=?", (incident_id,)).fetchone()
        return self._incident(row) if row else None

    def list_incidents(self, status: str | None = None, limit: int = 100) -> list[Incident]:
        if status:
            rows = self._exec(
                "SELECT * FROM incidents WHERE status=? ORDER BY opened_at DESC LIMIT ?", (status, limit)
            )
        else:
            rows = self._exec("SELECT * FROM incidents ORDER BY opened_at DESC LIMIT ?", (limit,))
        return [self._incident(r) for r in rows.fetchall()]

    def update_incident(self, incident_id: str, **changes: Any) -> None:
        allowed = {"severity", "status", "title", "resolved_at", "data"}
        if not changes.keys() <= allowed:
            raise ValueError(f"cannot update {sorted(changes.keys() - allowed)}")
        if "data" in changes:
            changes["data"] = json.dumps(changes["data"])
        cols = ", ".join(f"{k}=?" for k in changes)
        self._exec(f"UPDATE incidents SET {cols} WHERE id=?", (*changes.values(), incident_id))

    def append(
        self, incident_id: str, ts: float, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        self._exec(
            "INSERT INTO timeline (incident_id, ts, kind, message, data) VALUES (?,?,?,?,?)",
            (incident_id, ts, kind, message, json.dumps(data or {}, default=str)),
        )

    def append_many(self, events: list[Event]) -> None:
        """All of `events` in one transaction: every entry lands, or none does (and the caller retries)."""
        rows = [
            (e.incident_id, e.ts, e.kind, e.message, json.dumps(e.data or {}, default=str)) for e in events
        ]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT INTO timeline (incident_id, ts, kind, message, data) VALUES (?,?,?,?,?)", rows
                    )
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path}: {exc}") from None

    def timeline(self, incident_id: str) -> list[Event]:
        rows = self._exec(
            "SELECT incident_id, ts, kind, message, data FROM timeline WHERE incident_id=? ORDER BY ts, seq",
            (incident_id,),
        ).fetchall()
        return [
            Event(r["incident_id"], r["ts"], r["kind"], r["message"], json.loads(r["data"])) for r in rows
        ]

    # ---------------------------------------------------------------- runs

    def create_run(
        self,
        playbook: str,
        incident_id: str | None,
        service: str | None,
        dry_run: bool,
        started_at: float,
        steps: list[str],
    ) -> Run:
        run = Run(new_id("RUN"), incident_id, service, playbook, "running", dry_run, started_at, None, None)
        with self._lock:
            self._exec("BEGIN")
            self._exec(
                "INSERT INTO runs (id, incident_id, service, playbook, state, dry_run, started_at, ended_at, "
                "error) VALUES (?,?,?,?,?,?,?,?,?)",
                (run.id, incident_id, service, playbook, "running", int(dry_run), started_at, None, None),
            )
            for i, name in enumerate(steps):
                self._exec(
                    "INSERT INTO steps (run_id, idx, name, state) VALUES (?,?,?,?)",
                    (run.id, i, name, "pending"),
                )
            self._exec("COMMIT")
        return run

    def update_run(self, run_id: str, **changes: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in changes)
        self._exec(f"UPDATE runs SET {cols} WHERE id=?", (*changes.values(), run_id))

    def add_step(self, run_id: str, idx: int, name: str) -> None:
        self._exec(
            "INSERT OR IGNORE INTO steps (run_id, idx, name, state) VALUES (?,?,?,?)",
            (run_id, idx, name, "pending"),
        )

    def get_run(self, run_id: str) -> Run | None:
        row = self._exec("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return Run(**{**dict(row), "dry_run": bool(row["dry_run"])}) if row else None

    def update_step(self, run_id: str, idx: int, **changes: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in changes)
        self._exec(f"UPDATE steps SET {cols} WHERE run_id=? AND idx=?", (*changes.values(), run_id, idx))

    def runs(self, service: str | None = None, playbook: str | None = None) -> list[Run]:
        sql, args = "SELECT * FROM runs WHERE 1=1", []
        if service is not None:
            sql += " AND service=?"
            args.append(service)
        if playbook is not None:
            sql += " AND playbook=?"
            args.append(playbook)
        rows = self._exec(sql + " ORDER BY started_at", tuple(args)).fetchall()
        return [Run(**{**dict(r), "dry_run": bool(r["dry_run"])}) for r in rows]

    def steps(self, run_id: str) -> list[StepRecord]:
        rows = self._exec("SELECT * FROM steps WHERE run_id=? ORDER BY idx", (run_id,)).fetchall()
        return [StepRecord(**dict(r)) for r in rows]

    def claim_run(self, run_id: str, owner: str, expect: str | None) -> bool:
        """Make `owner` the run's owner if it is still owned by `expect` (None: nobody): a
        conditional UPDATE, so of two processes claiming the same run exactly one wins. Claiming a
        run one already owns succeeds."""
        cur = self._exec(
            "UPDATE runs SET owner=? WHERE id=? AND (owner IS ? OR owner=?)", (owner, run_id, expect, owner)
        )
        return cur.rowcount == 1

    # ---------------------------------------------------------------- failover state

    def failover_states(self) -> dict[str, FailoverRecord]:
        rows = self._exec("SELECT * FROM failover").fetchall()
        return {r["service"]: FailoverRecord(**dict(r)) for r in rows}

    def transition_failover(
        self,
        service: str,
        expect_version: int,
        state: str,
        run_id: str | None,
        incident_id: str | None,
        reason: str,
        at: float,
    ) -> FailoverRecord | None:
        """Move a service's failover state if it is still at `expect_version` (compare-and-swap);
        None when another writer moved it first (re-read and decide again)."""
        if state not in FAILOVER_STATES:
            raise ValueError(f"unknown failover state {state!r}")
        new = FailoverRecord(service, state, run_id, incident_id, reason, at, expect_version + 1)
        args = (state, run_id, incident_id, reason, at, new.version)
        if expect_version == 0:
            cur = self._exec(
                "INSERT OR IGNORE INTO failover "
                "(state, run_id, incident_id, reason, since, version, service) VALUES (?,?,?,?,?,?,?)",
                (*args, service),
            )
        else:
            cur = self._exec(
                "UPDATE failover SET state=?, run_id=?, incident_id=?, reason=?, since=?, version=? "
                "WHERE service=? AND version=?",
                (*args, service, expect_version),
            )
        return new if cur.rowcount == 1 else None

    # ---------------------------------------------------------------- flags

    def get_flag(self, name: str) -> str | None:
        row = self._exec("SELECT value FROM flags WHERE name=?", (name,)).fetchone()
        return row["value"] if row else None

    def set_flag(self, name: str, value: str | None) -> None:
        """Small durable switches humans flip: pause, a frozen playbook, an approval decision."""
        if value is None:
            self._exec("DELETE FROM flags WHERE name=?", (name,))
        else:
            self._exec(
                "INSERT INTO flags (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=?",
                (name, value, value),
            )

    def flags(self, prefix: str = "") -> dict[str, str]:
        rows = self._exec("SELECT name, value FROM flags WHERE name LIKE ?", (prefix + "%",)).fetchall()
        return {r["name"]: r["value"] for r in rows}

    # ---------------------------------------------------------------- outbox

    @staticmethod
    def _message(row: sqlite3.Row) -> OutboxMessage:
        d = dict(row)
        d["payload"] = json.loads(d["payload"])
        d["dead"] = bool(d["dead"])
        return OutboxMessage(**d)

    def enqueue(
        self, channel: str, key: str, payload: dict[str, Any], incident_id: str | None, now: float
    ) -> bool:
        """Queue a message once; a second enqueue with the same key is a no-op (returns False)."""
        cur = self._exec(
            "INSERT OR IGNORE INTO outbox (channel, key, incident_id, payload, created_at, next_attempt_at) "
            "VALUES (?,?,?,?,?,?)",
            (channel, key, incident_id, json.dumps(payload), now, now),
        )
        return cur.rowcount == 1

    def due(self, now: float, limit: int = 50) -> list[OutboxMessage]:
        rows = self._exec(
            "SELECT * FROM outbox WHERE delivered_at IS NULL AND dead=0 AND next_attempt_at<=? "
            "ORDER BY id LIMIT ?",
            (now, limit),
        ).fetchall()
        return [self._message(r) for r in rows]

    def delivered(self, msg_id: int, now: float) -> None:
        self._exec(
            "UPDATE outbox SET delivered_at=?, attempts=attempts+1, last_error=NULL WHERE id=?", (now, msg_id)
        )

    def retry_later(self, msg_id: int, next_at: float, error: str) -> None:
        self._exec(
            "UPDATE outbox SET attempts=attempts+1, next_attempt_at=?, last_error=? WHERE id=?",
            (next_at, error, msg_id),
        )

    def give_up(self, msg_id: int, error: str) -> None:
        self._exec("UPDATE outbox SET attempts=attempts+1, dead=1, last_error=? WHERE id=?", (error, msg_id))

    def outbox(self, include_delivered: bool = False) -> list[OutboxMessage]:
        sql = (
            "SELECT * FROM outbox"
            + ("" if include_delivered else " WHERE delivered_at IS NULL")
            + " ORDER BY id"
        )
        return [self._message(r) for r in self._exec(sql).fetchall()]

    # ---------------------------------------------------------------- channel refs

    def set_ref(self, channel: str, incident_id: str, ref: str) -> None:
        """Remember a channel's own id for our incident (Statuspage's incident id), for later updates."""
        self._exec(
            "INSERT INTO channel_refs (channel, incident_id, ref) VALUES (?,?,?) "
            "ON CONFLICT(channel, incident_id) DO UPDATE SET ref=excluded.ref",
            (channel, incident_id, ref),
        )

    def get_ref(self, channel: str, incident_id: str) -> str | None:
        row = self._exec(
            "SELECT ref FROM channel_refs WHERE channel=? AND incident_id=?", (channel, incident_id)
        ).fetchone()
        return str(row["ref"]) if row else None
