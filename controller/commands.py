"""What humans tell the controller: approve or reject a run, pause and resume, acknowledge a freeze.

The CLI and the HTTP API both call these, and they only write durable flags to the store; the
controller acts on them in its next cycle. So a decision taken while the controller restarts is
not lost, and both doors behave the same way.
"""

from __future__ import annotations

import time

from controller.stores import Store


class CommandError(Exception):
    """The command cannot apply (unknown run, not awaiting approval, nothing frozen)."""


def _awaiting(store: Store, run_id: str) -> None:
    run = store.get_run(run_id)
    if run is None:
        raise CommandError(f"no playbook run {run_id!r}")
    if run.state != "awaiting_approval":
        raise CommandError(f"run {run_id} is {run.state}, not awaiting approval")
    if store.get_flag(f"approval:{run_id}") is not None:
        raise CommandError(f"run {run_id} was already answered: {store.get_flag(f'approval:{run_id}')}")


def approve(store: Store, run_id: str, by: str) -> str:
    _awaiting(store, run_id)
    store.set_flag(f"approval:{run_id}", f"approved by {by}")
    return f"run {run_id} approved by {by}; the controller starts it in its next cycle"


def reject(store: Store, run_id: str, by: str, reason: str = "") -> str:
    _awaiting(store, run_id)
    why = f" ({reason})" if reason else ""
    store.set_flag(f"approval:{run_id}", f"rejected by {by}{why}")
    return f"run {run_id} rejected by {by}{why}"


def pause(store: Store, by: str, reason: str = "") -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    store.set_flag("paused", f"by {by} at {stamp}" + (f": {reason}" if reason else ""))
    return "automatic actions paused: incidents still open and page, but no playbook starts"


def resume(store: Store, by: str) -> str:
    if store.get_flag("paused") is None:
        raise CommandError("automatic actions are not paused")
    store.set_flag("paused", None)
    return f"automatic actions resumed by {by}"


def ack(store: Store, service: str, by: str) -> str:
    """Unfreeze a service's playbook after a failed run, once a human has looked."""
    run = store.get_flag(f"frozen:{service}")
    if run is None:
        raise CommandError(f"nothing is frozen for {service}")
    store.set_flag(f"frozen:{service}", None)
    return f"{service}: freeze from failed run {run} acknowledged by {by}; automatic runs allowed again"


def silence(store: Store, service: str, seconds: float, by: str, reason: str = "") -> str:
    """Suppress incidents and actions for a service for a while (an ad-hoc maintenance)."""
    if seconds <= 0:
        raise CommandError("a silence needs a positive duration")
    until = time.time() + seconds
    store.set_flag(f"silence:{service}", f"{until}|{reason or 'silenced'} (by {by})")
    return f"{service} silenced until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(until))}"


def unsilence(store: Store, service: str, by: str) -> str:
    if store.get_flag(f"silence:{service}") is None:
        raise CommandError(f"{service} is not silenced")
    store.set_flag(f"silence:{service}", None)
    return f"silence on {service} lifted by {by}"
