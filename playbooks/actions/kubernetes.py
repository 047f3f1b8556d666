"""Kubernetes: scale a Deployment, merge-patch an object, restart a Deployment's pods like kubectl.

The client comes from the context (`ctx.kube`); without one, it is built once per context from the
in-cluster service account (when KUBERNETES_SERVICE_HOST is set) or from kubeconfig. API errors are
sorted the way the engine retries: 409 Conflict, 429 and 5xx, timeouts and connection errors are
worth another attempt; any other 4xx (forbidden, not found, invalid) is not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import Field, model_validator

from playbooks.actions.base import Action, ActionContext, ActionError, PlannedCall, in_action_pool
from probes.base import Strict

if TYPE_CHECKING:
    import kubernetes.client
    from kubernetes.client.rest import ApiException

# The kubernetes client (~0.8 s to import) is imported where an action calls the API, not here:
# `continuity validate` loads these parameter models to check a playbook (issue 13).

T = TypeVar("T")

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"

# kind -> (apiVersion, client class, method suffix)
KINDS: dict[str, tuple[str, str, str]] = {
    "Deployment": ("apps/v1", "AppsV1Api", "deployment"),
    "StatefulSet": ("apps/v1", "AppsV1Api", "stateful_set"),
    "Service": ("v1", "CoreV1Api", "service"),
    "ConfigMap": ("v1", "CoreV1Api", "config_map"),
}


def default_client() -> kubernetes.client.ApiClient:
    """In a pod: the service account. Elsewhere: kubeconfig (KUBECONFIG or ~/.kube/config)."""
    import kubernetes.client
    import kubernetes.config

    cfg = kubernetes.client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(client_configuration=cfg)
        else:
            kubernetes.config.load_kube_config(client_configuration=cfg)
    except (kubernetes.config.ConfigException, OSError, TypeError, ValueError) as exc:
        where = "in-cluster" if os.environ.get("KUBERNETES_SERVICE_HOST") else "kubeconfig"
        raise ActionError(
            f"no Kubernetes client: the {where} configuration could not be loaded ({exc}); "
            "run in a pod with a service account, or set KUBECONFIG",
            retryable=False,
        ) from None
    cfg.retries = False  # the engine retries, so every attempt is in the timeline
    return kubernetes.client.ApiClient(configuration=cfg)


def api_client(ctx: ActionContext) -> kubernetes.client.ApiClient:
    if ctx.kube is None:
        client = default_client()
        ctx.kube = lambda: client  # built once per context
    return ctx.kube()


def _status_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
        return str(body.get("message") or exc.reason or "")
    except (ValueError, AttributeError):
        return str(exc.reason or "")


def kube_call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call the client; turn its failures into ActionErrors the engine knows how to retry."""
    import urllib3.exceptions
    from kubernetes.client.rest import ApiException

    try:
        return fn(*args, **kwargs)
    except ApiException as exc:
        status = exc.status or 0
        retry = status in (409, 429) or status >= 500 or status == 0
        reason = exc.reason or ""
        raise ActionError(
            f"kubernetes {what}: {status} {reason}: {_status_message(exc)}".rstrip(": "), retryable=retry
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # timeouts, refused, reset
        raise ActionError(f"kubernetes {what}: {type(exc).__name__}: {exc}", retryable=True) from None


# ---------------------------------------------------------------- scale


class ScaleParams(Strict):
    namespace: str = Field(min_length=1, description="The Deployment's namespace.")
    deployment: str = Field(min_length=1, description="The Deployment's name.")
    replicas: int = Field(ge=0, description="The wanted spec.replicas, e.g. 5 in the standby region.")


class Scale(Action):
    """Set a Deployment's replicas through its scale subresource (what `kubectl scale` does)."""

    name = "kubernetes.scale"
    Params = ScaleParams
    summary = "Scale a Deployment to a number of replicas (scale subresource)."
    p: ScaleParams
    blocking = True

    def _what(self) -> str:
        return f"deployment {self.p.namespace}/{self.p.deployment}"

    def plan(self) -> list[PlannedCall]:
        where = {"namespace": self.p.namespace, "name": self.p.deployment}
        return [
            PlannedCall("kubernetes.apps/v1", "read_namespaced_deployment_scale", where, "read: replicas"),
            PlannedCall(
                "kubernetes.apps/v1",
                "patch_namespaced_deployment_scale",
                {**where, "body": {"spec": {"replicas": self.p.replicas}}},
                MERGE_PATCH,
            ),
        ]

    def _current(self, ctx: ActionContext) -> int:
        import kubernetes.client

        apps = kubernetes.client.AppsV1Api(api_client(ctx))
        scale = kube_call(
            f"read scale of {self._what()}",
            apps.read_namespaced_deployment_scale,
            self.p.deployment,
            self.p.namespace,
        )
        return int(scale.spec.replicas or 0) if scale.spec else 0

    async def check(self, ctx: ActionContext) -> bool:
        return await in_action_pool(self._current, ctx) == self.p.replicas

    def _apply(self, ctx: ActionContext) -> str:
        import kubernetes.client

        before = self._current(ctx)
        apps = kubernetes.client.AppsV1Api(api_client(ctx))
        body = {"spec": {"replicas": self.p.replicas}}
        ctx.record(
            "api_call",
            "kubernetes patch_namespaced_deployment_scale",
            {"namespace": self.p.namespace, "deployment": self.p.deployment, "replicas": self.p.replicas},
        )
        scale = kube_call(
            f"scale {self._what()}",
            apps.patch_namespaced_deployment_scale,
            self.p.deployment,
            self.p.namespace,
            body,
            _content_type=MERGE_PATCH,
        )
        return f"{self._what()} replicas {before} -> {scale.spec.replicas if scale.spec else '?'}"

    async def apply(self, ctx: ActionContext) -> str:
        return await in_action_pool(self._apply, ctx)


# ---------------------------------------------------------------- patch


def _missing(current: Any, patch: Any, path: str = "") -> list[str]:
    """Paths of the merge patch that the object does not already match (RFC 7386: null deletes)."""
    out: list[str] = []
    for key, want in patch.items():
        here = f"{path}.{key}" if path else str(key)
        have = current.get(key) if isinstance(current, dict) else None
        present = isinstance(current, dict) and key in current
        if want is None:
            if present:
                out.append(here)
        elif isinstance(want, dict):
            if not isinstance(have, dict):
                out.append(here)
            else:
                out.extend(_missing(have, want, here))
        elif have != want:
            out.append(here)
    return out


def _leaves(obj: Any, patch: Any) -> dict[str, Any]:
    """The values at the patch's leaf paths in obj, for a before -> after sentence."""
    out: dict[str, Any] = {}

    def walk(cur: Any, p: Any, path: str) -> None:
        for key, want in p.items():
            here = f"{path}.{key}" if path else str(key)
            have = cur.get(key) if isinstance(cur, dict) else None
            if isinstance(want, dict) and want:
                walk(have, want, here)
            else:
                out[here] = have

    walk(obj, patch, "")
    return out


class PatchParams(Strict):
    api_version: str = Field(description="apps/v1 for Deployment and StatefulSet; v1 for Service, ConfigMap.")
    kind: Literal["Deployment", "StatefulSet", "Service", "ConfigMap"] = Field(
        description="The kind of object to patch."
    )
    namespace: str = Field(min_length=1, description="The object's namespace.")
    name: str = Field(min_length=1, description="The object's name.")
    patch: dict[str, Any] = Field(
        min_length=1,
        description="A JSON merge patch (RFC 7386), e.g. {data: {checkout_region: secondary}}; null deletes.",
    )

    @model_validator(mode="after")
    def _version_matches_kind(self) -> PatchParams:
        want = KINDS[self.kind][0]
        if self.api_version != want:
            raise ValueError(f"api_version {want} for kind {self.kind}, found {self.api_version!r}")
        return self


class Patch(Action):
    """Apply a JSON merge patch to a Deployment, StatefulSet, Service or ConfigMap."""

    name = "kubernetes.patch"
    Params = PatchParams
    summary = "Merge-patch a Deployment, StatefulSet, Service or ConfigMap (e.g. flip a feature flag)."
    p: PatchParams
    blocking = True

    def _what(self) -> str:
        return f"{self.p.kind} {self.p.namespace}/{self.p.name}"

    def _api(self, ctx: ActionContext) -> tuple[Any, str]:
        import kubernetes.client

        _, cls, suffix = KINDS[self.p.kind]
        return getattr(kubernetes.client, cls)(api_client(ctx)), suffix

    def plan(self) -> list[PlannedCall]:
        _, _, suffix = KINDS[self.p.kind]
        target = f"kubernetes.{self.p.api_version}"
        where = {"namespace": self.p.namespace, "name": self.p.name}
        return [
            PlannedCall(target, f"read_namespaced_{suffix}", where, "read: fields already set?"),
            PlannedCall(target, f"patch_namespaced_{suffix}", {**where, "body": self.p.patch}, MERGE_PATCH),
        ]

    def _read(self, ctx: ActionContext) -> dict[str, Any]:
        api, suffix = self._api(ctx)
        # The raw JSON, not the typed model: the patch is written in the API's own field names.
        resp = kube_call(
            f"read {self._what()}",
            getattr(api, f"read_namespaced_{suffix}"),
            self.p.name,
            self.p.namespace,
            _preload_content=False,
        )
        return json.loads(resp.data)

    async def check(self, ctx: ActionContext) -> bool:
        obj = await in_action_pool(self._read, ctx)
        return not _missing(obj, self.p.patch)

    def _apply(self, ctx: ActionContext) -> str:
        before = _leaves(self._read(ctx), self.p.patch)
        api, suffix = self._api(ctx)
        ctx.record(
            "api_call",
            f"kubernetes patch_namespaced_{suffix}",
            {"kind": self.p.kind, "namespace": self.p.namespace, "name": self.p.name, "patch": self.p.patch},
        )
        resp = kube_call(
            f"patch {self._what()}",
            getattr(api, f"patch_namespaced_{suffix}"),
            self.p.name,
            self.p.namespace,
            self.p.patch,
            _content_type=MERGE_PATCH,
            _preload_content=False,
        )
        after = _leaves(json.loads(resp.data), self.p.patch)
        changes = "; ".join(
            f"{path} {json.dumps(before[path])} -> {json.dumps(after[path])}" for path in after
        )
        return f"{self._what()} patched: {changes}"

    async def apply(self, ctx: ActionContext) -> str:
        return await in_action_pool(self._apply, ctx)


# ---------------------------------------------------------------- rollout restart


class RolloutRestartParams(Strict):
    namespace: str = Field(min_length=1, description="The Deployment's namespace.")
    deployment: str = Field(min_length=1, description="The Deployment's name.")


class RolloutRestart(Action):
    """Restart a Deployment's pods the way `kubectl rollout restart` does.

    `check` is always False: a restart is not idempotent (there is no state that says "this
    restart already happened" apart from the journal). The engine journals the step, so a run
    resumed after the step is done never restarts again; only an attempt whose outcome was lost
    (a timeout after the server applied it) can cause one more rolling restart, which is harmless.
    """

    name = "kubernetes.rollout_restart"
    Params = RolloutRestartParams
    summary = "Rolling-restart a Deployment's pods (like kubectl rollout restart)."
    p: RolloutRestartParams
    blocking = True
    verifiable = False

    def _what(self) -> str:
        return f"deployment {self.p.namespace}/{self.p.deployment}"

    @staticmethod
    def body(at: str) -> dict[str, Any]:
        return {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at}}}}}

    def plan(self) -> list[PlannedCall]:
        return [
            PlannedCall(
                "kubernetes.apps/v1",
                "patch_namespaced_deployment",
                {
                    "namespace": self.p.namespace,
                    "name": self.p.deployment,
                    "body": self.body("<now, RFC 3339>"),
                },
                STRATEGIC_MERGE_PATCH,
            )
        ]

    async def check(self, ctx: ActionContext) -> bool:
        return False  # see the class docstring

    def _apply(self, ctx: ActionContext) -> str:
        import kubernetes.client

        apps = kubernetes.client.AppsV1Api(api_client(ctx))
        dep = kube_call(
            f"read {self._what()}", apps.read_namespaced_deployment, self.p.deployment, self.p.namespace
        )
        tmeta = dep.spec.template.metadata if dep.spec and dep.spec.template else None
        before = ((tmeta.annotations if tmeta else None) or {}).get(RESTARTED_AT) or "never restarted"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ctx.record(
            "api_call",
            "kubernetes patch_namespaced_deployment restartedAt",
            {"namespace": self.p.namespace, "deployment": self.p.deployment, RESTARTED_AT: now},
        )
        kube_call(
            f"restart {self._what()}",
            apps.patch_namespaced_deployment,
            self.p.deployment,
            self.p.namespace,
            self.body(now),
            _content_type=STRATEGIC_MERGE_PATCH,
        )
        return f"{self._what()} restarted: {RESTARTED_AT} {before} -> {now}"

    async def apply(self, ctx: ActionContext) -> str:
        return await in_action_pool(self._apply, ctx)
