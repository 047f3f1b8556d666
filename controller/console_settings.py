"""Configuration of the human doors that are not the CLI: the web console, and the inbound
webhooks from Slack (approval buttons) and PagerDuty (acknowledge and resolve there).

Kept apart from controller/config.py, which only mounts the two sections, so these doors can grow
without touching the models every other part of the controller reads.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from controller.durations import Duration
from probes.base import Strict


class ConsoleSettings(Strict):
    """`console:` the operator console at /console (server-rendered, behind the API token)."""

    enabled: bool = Field(
        default=True, description="Serve /console (it still needs a login to show anything)."
    )
    trusted_header: str | None = Field(
        default=None,
        description="Behind an authenticating proxy (oauth2-proxy, an identity-aware proxy): the header "
        "carrying the signed-in user, e.g. X-Forwarded-Email. Believed only from trusted_proxies.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Addresses (CIDR) whose trusted_header is believed; anyone else logs in with the token.",
    )
    session_ttl: Duration = Field(default=43200.0, gt=0, description="How long a console login lasts.")
    refresh: Duration = Field(
        default=2.0, gt=0, description="How often an open incident page checks the timeline for news."
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"a network like 10.0.0.0/8 or 127.0.0.1/32, found {item!r}") from None
        return value


class InboundSettings(Strict):
    """`inbound:` webhooks other systems send us; each verified by its signature before it is read."""

    slack_signing_secret_env: str | None = Field(
        default=None,
        description="Environment variable with the Slack app's signing secret: enables "
        "POST /slack/interactions (Approve / Reject buttons on approval requests).",
    )
    pagerduty_signing_secret_env: str | None = Field(
        default=None,
        description="Environment variable with the PagerDuty webhook subscription's signing secret: enables "
        "POST /pagerduty/webhook (acknowledge and resolve in PagerDuty act here).",
    )
    slack_response_url_prefix: str = Field(
        default="https://hooks.slack.com/",
        description="Only a response_url starting with this is called back (to mark the message answered).",
    )
    slack_users: dict[str, str] = Field(
        default_factory=dict,
        description="Slack user id -> the name recorded as who answered (default: the Slack username).",
    )
