"""http: call a webhook (a CDN purge, a feature-flag service, a runbook automation endpoint).

Secrets stay out of the file: a header's value may name an environment variable
(`{Authorization: {env: HOOK_TOKEN, prefix: "Bearer "}}`), read when the step runs and never shown
in a plan or the timeline. String values in the JSON body are Jinja2 templates over the incident's
variables, as in `notify`. 429, 5xx and network errors are retried by the engine; another status
outside `expect_status` is not.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from pydantic import Field

from controller.durations import Duration
from playbooks.actions.base import Action, ActionContext, ActionError, PlannedCall, in_action_pool
from playbooks.actions.flow import templates
from probes.base import Strict


class EnvHeader(Strict):
    env: str = Field(min_length=1, description="Environment variable holding the secret.")
    prefix: str = Field(default="", description='Put before the value, e.g. "Bearer ".')


class HttpParams(Strict):
    url: str = Field(min_length=1, description="The endpoint, http:// or https://.")
    method: Literal["POST", "PUT", "PATCH", "DELETE", "GET"] = Field(default="POST", description="Method.")
    headers: dict[str, str | EnvHeader] = Field(
        default_factory=dict, description="Header -> value, or {env: NAME, prefix: ...} for secrets."
    )
    body: Any = Field(
        default=None,
        alias="json",
        description="JSON body; its strings are Jinja2 templates (incident_id, service, severity).",
    )
    expect_status: list[int] = Field(
        default_factory=lambda: [200, 201, 202, 204], min_length=1, description="Statuses that mean done."
    )
    timeout: Duration | None = Field(
        default=None,
        gt=0,
        description="Deadline for the request; by default what is left of the step's timeout.",
    )


def render(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return templates().from_string(value).render(variables)
    if isinstance(value, dict):
        return {k: render(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, variables) for v in value]
    return value


class Http(Action):
    """Call a webhook with a JSON body; secrets in headers come from the environment."""

    name = "http"
    Params = HttpParams
    summary = "Call an HTTP endpoint (webhook) with a templated JSON body."
    p: HttpParams
    blocking = True
    verifiable = False
    wait_params = ("timeout",)

    def _shown_headers(self) -> dict[str, str]:
        return {
            k: (f"{v.prefix}<${v.env}>" if isinstance(v, EnvHeader) else v) for k, v in self.p.headers.items()
        }

    def plan(self) -> list[PlannedCall]:
        params: dict[str, Any] = {"url": self.p.url, "headers": self._shown_headers()}
        if self.p.body is not None:
            params["json"] = self.p.body
        return [PlannedCall("http", self.p.method, params, f"expect {self.p.expect_status}")]

    def _headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self.p.headers.items():
            if isinstance(value, EnvHeader):
                secret = os.environ.get(value.env)
                if not secret:
                    raise ActionError(
                        f"header {key}: environment variable {value.env} is not set", retryable=False
                    )
                out[key] = value.prefix + secret
            else:
                out[key] = value
        return out

    def _apply(self, ctx: ActionContext) -> str:
        from jinja2 import TemplateError

        headers = self._headers()
        try:
            body = render(self.p.body, ctx.variables)
        except TemplateError as exc:
            raise ActionError(f"json template: {exc}", retryable=False) from None
        # Stable across retries and resumes of this step: a receiver that honours it (Stripe's
        # convention) applies the call once however often it arrives.
        key = ctx.idempotency_key
        if key and not any(k.lower() == "idempotency-key" for k in headers):
            headers["Idempotency-Key"] = key
        timeout = ctx.budget(self.p.timeout, 10.0)
        ctx.record(
            "api_call",
            f"http {self.p.method} {self.p.url}",
            {
                "url": self.p.url,
                "method": self.p.method,
                "headers": self._shown_headers(),
                "idempotency_key": headers.get("Idempotency-Key", key),
                "timeout_s": round(timeout, 3),
            },
        )
        import requests  # here, where a call goes out: validate loads this module (issue 13)

        start = time.monotonic()
        try:
            resp = requests.request(
                self.p.method,
                self.p.url,
                headers=headers,
                json=body,
                timeout=timeout,
                allow_redirects=False,
            )
        except requests.ReadTimeout as exc:  # sent, no answer: the receiver may have acted
            raise ActionError(
                f"{self.p.method} {self.p.url}: no answer within {timeout:.3g}s ({type(exc).__name__}): "
                "the request was sent, so the outcome is unknown",
                unknown=True,
            ) from None
        except requests.RequestException as exc:  # refused, reset, connect timeout, bad TLS
            raise ActionError(f"{self.p.method} {self.p.url}: {type(exc).__name__}: {exc}") from None
        took = time.monotonic() - start
        if resp.status_code not in self.p.expect_status:
            retry = resp.status_code == 429 or resp.status_code >= 500
            snippet = resp.text[:200].strip()
            raise ActionError(
                f"{self.p.method} {self.p.url}: expected status {self.p.expect_status}, "
                f"found {resp.status_code}" + (f": {snippet}" if snippet else ""),
                retryable=retry,
            )
        return f"{self.p.method} {self.p.url} answered {resp.status_code} {resp.reason} in {took:.2f}s"

    async def apply(self, ctx: ActionContext) -> str:
        # check() stays False: a webhook call is not idempotent in general; the engine's journal
        # keeps a done step from being repeated when a run resumes.
        return await in_action_pool(self._apply, ctx)
