"""What humans tell the communicator: acknowledge, post an update, resolve, hand over the IC role.

Same pattern as controller/commands.py: the CLI and the HTTP API both call these; they check what
can be checked now (the incident exists and is open, the status is known) and write a durable
request to the store. The controller's communicator applies it in its next cycle, so a request
made while the controller restarts is not lost, and both doors behave alike.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from controller.commands import CommandError
from controller.durations import format_duration, parse_duration
from controller.stores import Store

PREFIX = "comms:request:"
UPDATE_STATUSES = ("investigating", "identified", "monitoring")


def _open(store: Store, incident_id: str) -> None:
    inc = store.get_incident(incident_id)
    if inc is None:
        raise CommandError(f"no incident {incident_id!r}")
    if inc.status != "open":
        raise CommandError(f"incident {incident_id} is {inc.status}")


def _request(store: Store, op: str, incident_id: str, by: str, **fields: Any) -> None:
    # Names sort by time of request, so the communicator applies them in the order given.
    name = f"{PREFIX}{time.time_ns():020d}:{uuid.uuid4().hex[:6]}"
    store.set_flag(name, json.dumps({"op": op, "incident": incident_id, "by": by, **fields}))


def pending(store: Store) -> list[tuple[str, dict[str, Any]]]:
    """Requests not yet applied, oldest first: (flag name, request)."""
    out = []
    for name, value in sorted(store.flags(PREFIX).items()):
        try:
            out.append((name, json.loads(value)))
        except ValueError:
            store.set_flag(name, None)  # unreadable: drop rather than block the queue
    return out


def ack(store: Store, incident_id: str, by: str) -> str:
    _open(store, incident_id)
    _request(store, "ack", incident_id, by)
    return f"{incident_id} acknowledged by {by}; PagerDuty is told in the controller's next cycle"


def update(
    store: Store, incident_id: str, by: str, status: str | None, message: str, eta: str | None = None
) -> str:
    _open(store, incident_id)
    if status is not None and status not in UPDATE_STATUSES:
        raise CommandError(
            f"status must be one of {', '.join(UPDATE_STATUSES)} (use `resolve` to resolve), not {status!r}"
        )
    if not message.strip():
        raise CommandError("an update needs a message")
    eta_s: float | None = None
    if eta:
        try:
            eta_s = parse_duration(eta)
        except ValueError as exc:
            raise CommandError(f"--eta: {exc}") from None
    _request(store, "update", incident_id, by, status=status, message=message, eta_s=eta_s)
    when = f", ETA in {format_duration(eta_s)}" if eta_s is not None else ""
    return f"update for {incident_id} queued{when}; every channel gets it in the controller's next cycle"


def resolve(store: Store, incident_id: str, by: str, message: str = "") -> str:
    _open(store, incident_id)
    _request(store, "resolve", incident_id, by, message=message)
    return (
        f"{incident_id} will be resolved by the controller in its next cycle; the resolution goes out at once"
    )


def assign(store: Store, incident_id: str, by: str, ic: str) -> str:
    _open(store, incident_id)
    if not ic.strip():
        raise CommandError("--ic needs a name")
    _request(store, "assign", incident_id, by, ic=ic.strip())
    return f"{incident_id}: incident commander handed over to {ic.strip()} by {by}"
