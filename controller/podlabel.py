"""The leader labels its own pod, so pushed signals reach the leader.

Alertmanager webhooks, heartbeats and agents' results are pushed to a Service. If that Service
selected every replica, half of them would land on a standby, which does not decide. So, as
Patroni labels its primary, the pod that holds the Lease carries ``continuity.dev/role=leader`` and
the chart's "push" Service selects that label as well as the release's own.

- On becoming leader the pod labels itself first (so pushes have somewhere to go at once) and then
  removes the label from any other pod of the release still wearing it: a predecessor cut off
  from the API server cannot remove its own label, so the new leader overwrites.
- On losing leadership, and at shutdown, the pod removes its own label (best effort: when the API
  is unreachable, the next leader does it).
- Every change is retried until it lands or is superseded by the next transition; a label change is
  never on the decision path, so a slow or failing API server never blocks the loop.

Kubernetes RBAC cannot name "my own pod" (pod names are generated), so the chart grants ``get``,
``list`` and ``patch`` on pods in the release's namespace only; see README, Kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from kubernetes.client import ApiClient, CoreV1Api

from controller.executors import IO, run_in

log = structlog.get_logger("continuity.podlabel")

ROLE_LABEL = "continuity.dev/role"
LEADER = "leader"
MERGE_PATCH = "application/merge-patch+json"


class PodLabeler:
    """Keeps ``continuity.dev/role=leader`` on this pod exactly while it leads."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        pod: str,
        selector: str,
        *,
        request_timeout: float = 5.0,
        retry_period: float = 1.0,
    ) -> None:
        self.namespace = namespace
        self.pod = pod
        self.selector = selector
        """Label selector of the release's pods (the Deployment's matchLabels), as ``a=b,c=d``."""
        self.request_timeout = request_timeout
        self.retry_period = retry_period
        self._api = CoreV1Api(api_client)
        self._want: bool | None = None
        self._done: bool | None = None
        self._wake = asyncio.Event()
        self._log = log.bind(pod=pod, namespace=namespace)

    def want(self, leading: bool) -> None:
        """Ask for the label to follow leadership; applied (and retried) by ``run``."""
        self._want = leading
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Apply the wanted state until stopped; on the way out remove our own label."""
        try:
            while not stop.is_set():
                self._wake.clear()
                want = self._want
                if want is not None and want != self._done:
                    try:
                        await self._apply(want)
                        self._done = want
                    except Exception as e:  # retried next period; the decision never waits on it
                        self._log.warning("podlabel.failed", leading=want, error=_short(e))
                timeout = self.retry_period if self._want != self._done else None
                with contextlib.suppress(TimeoutError):
                    waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                    try:
                        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waiters:
                            w.cancel()
        finally:
            await self.clear()

    async def clear(self) -> None:
        """Remove our own label (shutdown); one bounded attempt."""
        if self._done is False:
            return
        try:
            await self._label(self.pod, None)
            self._done = False
            self._log.info("podlabel.removed")
        except Exception as e:
            self._log.warning("podlabel.remove_failed", error=_short(e))

    async def _apply(self, leading: bool) -> None:
        if not leading:
            await self._label(self.pod, None)
            self._log.info("podlabel.removed")
            return
        await self._label(self.pod, LEADER)
        self._log.info("podlabel.set")
        pods = await self._call(
            self._api.list_namespaced_pod,
            self.namespace,
            label_selector=",".join(p for p in (self.selector, f"{ROLE_LABEL}={LEADER}") if p),
        )
        for other in pods.items:
            name = other.metadata.name
            if name != self.pod and self._want:
                await self._label(name, None)
                self._log.warning("podlabel.removed_from_previous_leader", previous=name)

    async def _label(self, pod: str, value: str | None) -> None:
        body = {"metadata": {"labels": {ROLE_LABEL: value}}}
        await self._call(self._api.patch_namespaced_pod, pod, self.namespace, body, _content_type=MERGE_PATCH)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wait_for(
            # The IO pool, not the default executor: a full default pool must not hold the label back.
            run_in(IO, fn, *args, _request_timeout=self.request_timeout, **kwargs),
            timeout=self.request_timeout + 1,
        )


def _short(e: BaseException) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    if status is not None:
        return f"{type(e).__name__} {status} {reason}"
    return f"{type(e).__name__}: {e}"
