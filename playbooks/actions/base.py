"""The contract every playbook action follows.

An action can `plan` (pure: the exact API calls it would make, shown in dry-run), `check`
(is the change already in place, so a retried or resumed step does no harm) and `apply`.
Actions never touch the store or the notifiers directly: they go through the context, so the
engine decides what is journaled and the same action runs in tests, dry-run and production.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from probes.base import Strict

if TYPE_CHECKING:
    import kubernetes.client

T = TypeVar("T")


async def in_action_pool(fn: Callable[..., T], /, *args: Any) -> T:
    """Run a blocking call (boto3, the Kubernetes client, requests) on the actions' thread pool.

    controller.executors (asyncio, threads) is imported here, where a step runs, not with the
    action modules: `continuity validate` loads them for their parameter models alone and must
    answer any file in under a second (issue 13; tests/test_cli_imports.py)."""
    from controller.executors import ACTIONS, run_in

    return await run_in(ACTIONS, fn, *args)


class ActionError(Exception):
    """A failure an action understands. `retryable=False` aborts without further attempts.
    `unknown=True`: the request went out and no answer came back (a read timeout), so the change
    may have been made; the engine records "outcome unknown" and checks before any re-apply."""

    def __init__(self, message: str, *, retryable: bool = True, unknown: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.unknown = unknown


@dataclass(frozen=True)
class PlannedCall:
    """One API call an action would make, rendered for humans reviewing a dry run."""

    target: str
    operation: str
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def render(self) -> str:
        args = json.dumps(self.params, sort_keys=True, default=str)
        note = f"  # {self.note}" if self.note else ""
        return f"{self.target}.{self.operation}({args}){note}"


@dataclass
class ActionContext:
    """What an action may use. Built by the controller (or the CLI) for each run."""

    aws: Callable[[str], Any]
    """Returns a boto3 client for a service name, configured from the config's aws section."""
    probe_healthy: Callable[[str], bool | None]
    """Detection's current verdict for a probe: True up, False down, None unknown yet."""
    record: Callable[[str, str, dict[str, Any]], None]
    """Append to the run's timeline: (kind, message, data)."""
    notify: Callable[[str, dict[str, Any]], Awaitable[None]]
    """Queue a message for humans (summary, details)."""
    variables: dict[str, Any] = field(default_factory=dict)
    """Incident facts for templated parameters: incident_id, service, severity."""
    sleep: Callable[[float], Awaitable[None]] | None = None
    poll_interval: float = 0.5
    may_act: Callable[[], bool] = lambda: True
    """False once this replica is no longer the leader: the run stops at the next step boundary."""
    kube: Callable[[], kubernetes.client.ApiClient] | None = None
    """Returns a kubernetes ApiClient (owned by the caller). None: the kubernetes actions build one
    from the in-cluster config when KUBERNETES_SERVICE_HOST is set, else from kubeconfig."""
    deadline: float | None = None
    """time.monotonic() by which the attempt in hand must be over (set by the engine from the
    step's timeout): an action's own waits that are not set explicitly end before it."""
    idempotency_key: str = ""
    """Stable across the retries and resumes of one step of one run: `<run_id>-<step>`."""

    def budget(self, explicit: float | None, default: float) -> float:
        """How long an action may wait by itself: its explicit setting, else what is left of the
        step's timeout (less a margin for the call that follows), else its default."""
        if explicit is not None:
            return explicit
        if self.deadline is None:
            return default
        left = self.deadline - time.monotonic()
        return max(0.05, left - min(1.0, left * 0.1))


class Action:
    """Base class; subclasses set `name` and `Params` and implement plan/check/apply."""

    name: ClassVar[str]
    Params: ClassVar[type[Strict]]
    summary: ClassVar[str] = ""
    already: ClassVar[str] = "already in place (check passed), nothing to do"
    blocking: ClassVar[bool] = False
    """True when apply runs in a worker thread: a timeout cannot stop it, so the engine waits for
    it (the attempt's outcome is unknown meanwhile) before anything else is tried."""
    verifiable: ClassVar[bool] = True
    """False when `check` cannot see whether the change was made (a webhook, a restart): after an
    attempt with an unknown outcome such a step is not retried; a human checks."""
    wait_params: ClassVar[tuple[str, ...]] = ()
    """Parameters that bound the action's own waiting; set explicitly, each must be shorter than
    the step's timeout (refused at config load otherwise). Unset, they derive from it."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.p = self.Params.model_validate(params)

    def plan(self) -> list[PlannedCall]:
        return []

    async def check(self, ctx: ActionContext) -> bool:
        """True when the change is already in place (so apply can be skipped)."""
        return False

    async def apply(self, ctx: ActionContext) -> str:
        """Make the change; return one sentence saying what changed."""
        raise NotImplementedError

    @classmethod
    def own_waits(cls, params: dict[str, Any]) -> dict[str, float]:
        """The explicit values of `wait_params`, in seconds (checked against the step's timeout)."""
        try:
            p = cls.Params.model_validate(params)
        except ValueError:
            return {}
        found = {name: getattr(p, name, None) for name in cls.wait_params if name in p.model_fields_set}
        return {k: float(v) for k, v in found.items() if isinstance(v, int | float)}

    @classmethod
    def probe_refs(cls, params: dict[str, Any]) -> list[str]:
        """Probe names this action's parameters refer to (checked at config load)."""
        return []
