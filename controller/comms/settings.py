"""Configuration for incident communications: the `communications:` section and service roles.

Kept apart from controller/config.py so that the communication rules can grow without touching the
models every other part of the controller reads; config.py only mounts them.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from controller.durations import Duration
from probes.base import Strict

Audience = Literal["customers", "internal", "partners", "executives"]
MailAudience = Literal["customers", "internal", "executives"]
"""Who an incident e-mail can go to (partners get webhooks, not mail)."""
AUDIENCES: tuple[str, ...] = ("customers", "internal", "partners", "executives")


class Roles(Strict):
    """Who runs an incident of this service. Names are people or on-call groups, as paged."""

    incident_commander: str | None = Field(
        default=None, description="The single point of contact; by default the first owner."
    )
    communications_lead: str | None = Field(default=None, description="Writes the public updates.")
    technical_owners: list[str] = Field(
        default_factory=list, description="Engineers (or groups) who fix it; by default the owners."
    )
    escalation: list[str] = Field(
        default_factory=list,
        description="Next contacts, in order, when a critical incident stays unacknowledged.",
    )


class Cadence(Strict):
    """How often the public hears from us while an incident is open."""

    critical: Duration = Field(default=1800.0, gt=0, description="An update is due this often (critical).")
    moderate: Duration = Field(default=3600.0, gt=0, description="An update is due this often (moderate).")
    low: Duration = Field(default=7200.0, gt=0, description="An update is due this often (low).")


class ChannelAudiences(Strict):
    """Which audience each channel speaks to. Email sends one message per listed audience."""

    slack: Audience = "internal"
    teams: Audience = "internal"
    webhook: Audience = "partners"
    statuspage: Audience = "customers"
    email: list[MailAudience] = Field(
        default_factory=lambda: list(get_args(MailAudience)),
        description="Audiences mailed (each to its own list under notifiers.email.to).",
    )


class Communications(Strict):
    enabled: bool = Field(default=True, description="false: only the PagerDuty paging of before.")
    templates_dir: str | None = Field(
        default=None,
        description="Directory of *.j2 files overriding the default templates by name "
        "(e.g. customers_update.txt.j2).",
    )
    cadence: Cadence = Field(default_factory=Cadence)
    escalate_after: Duration = Field(
        default=600.0, gt=0, description="An unacknowledged critical incident goes to the next contact."
    )
    followup_after: Duration = Field(
        default=3600.0, ge=0, description="After resolution, the post-incident follow-up is sent."
    )
    audiences: ChannelAudiences = Field(default_factory=ChannelAudiences)
    status_page_title: str = Field(default="Service status", description="Heading of the built-in /status.")
    history_days: int = Field(default=90, ge=1, le=365, description="Days of history on /status.")
