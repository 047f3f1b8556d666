"""Configuration: pydantic models, loading, and validation errors a human can fix in one pass.

Every problem is reported at once as `FILE: path.to.field: expected X, found Y`, because an SRE
editing the file during an incident must not play whack-a-mole with one error per run.
"""

from __future__ import annotations

import difflib
import gc
import os
import reprlib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from controller.comms.settings import Communications, Roles
from controller.console_settings import ConsoleSettings, InboundSettings
from controller.detect import Rules
from controller.durations import Duration, format_duration, parse_duration
from probes.base import Comparison, Strict
from probes.models import (  # the models alone: the probe engines import asyncio, ssl, sockets (issue 13)
    AlertmanagerProbe,
    DnsProbe,
    HeartbeatProbe,
    HttpProbe,
    PrometheusProbe,
    TcpProbe,
    TlsProbe,
    TransactionProbe,
    Window,
    parse_server,
)

Tier = Literal["critical", "important", "supporting"]
Severity = Literal["critical", "moderate", "low"]

ProbeConfig = Annotated[
    HttpProbe
    | TransactionProbe
    | TcpProbe
    | DnsProbe
    | TlsProbe
    | PrometheusProbe
    | HeartbeatProbe
    | AlertmanagerProbe,
    Field(discriminator="kind"),
]
PROBE_KINDS = ("http", "transaction", "tcp", "dns", "tls", "prometheus", "heartbeat", "alertmanager")


class Confirm(Strict):
    """The burst that turns SUSPECT into DOWN: every run must fail. probes: 0 turns it off."""

    probes: int = Field(default=5, ge=0, le=20, description="Runs in the burst; all must fail to confirm.")
    spacing: Duration = Field(default=0.25, ge=0, description="Pause between burst runs.")
    span: Duration | None = Field(
        default=None,
        ge=0,
        description="Shortest outage that can be DOWN: from the first failed run's start to the last's "
        "(default: (failure_threshold - 1) x interval + (probes - 1) x spacing, the old rule's floor).",
    )


class Flapping(Strict):
    changes: int = Field(
        default=4, ge=2, description="Verdict changes (into or out of DOWN) that mean flapping."
    )
    within: Duration = Field(default=600.0, gt=0)


class Maintenance(Strict):
    """A scheduled window during which named services raise no incident and trigger no action."""

    services: list[str] = Field(min_length=1)
    start: datetime
    end: datetime
    reason: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> Maintenance:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("start and end with a timezone (e.g. 2026-12-01T02:00:00Z)")
        if self.end <= self.start:
            raise ValueError(f"end after start, found {self.start.isoformat()} .. {self.end.isoformat()}")
        return self


class Intermittent(Strict):
    """A probe failing at least `rate` of its runs over `window` makes its service DEGRADED (moderate,
    never a failover), stating the rate. Defaults: at 10 s intervals a window holds 60 runs; a
    target failing 20% of single requests at random reaches 50% of 60 runs about never (0 times in
    3 simulated months), while a 5-step journey at 20% per request fails ~67% of its runs and trips
    it in about 7-8 minutes. `min_runs` keeps the rule off where too few runs would make a rate noise:
    a probe needs window / interval >= min_runs (raise the window for slower probes)."""

    window: Duration = Field(default=600.0, gt=0, description="How far back the failure rate is measured.")
    rate: float = Field(default=0.5, gt=0, le=1, description="Failure rate (0-1) that makes it DEGRADED.")
    min_runs: int = Field(default=50, ge=1, description="Fewest runs in the window for a rate to count.")


class Detection(Strict):
    """Hysteresis defaults; each probe may override them. Gatus's defaults: 3 down, 2 up."""

    failure_threshold: int = Field(
        default=3, ge=1, description="Consecutive failures before a probe is DOWN."
    )
    success_threshold: int = Field(
        default=2, ge=1, description="Consecutive successes before it is UP again."
    )
    window: Window | None = Field(
        default=None, description="Also SUSPECT on `failures` of the last `of` results."
    )
    confirm: Confirm = Field(default_factory=Confirm)
    quorum: int = Field(default=1, ge=1, description="Vantage points that must agree a target is DOWN.")
    freshness: Duration | None = Field(
        default=None,
        gt=0,
        description="Results older than this do not vote (default: 3 x interval + timeout).",
    )
    flapping: Flapping = Field(default_factory=Flapping)
    reference_probes: list[str] = Field(
        default_factory=list,
        description="Targets that should always be up: while any fails, automatic actions are held.",
    )
    isolation_quorum: int | None = Field(
        default=None,
        ge=1,
        description="Reference probes DOWN that mean the controller itself is cut off (default: all).",
    )
    intermittent: Intermittent = Field(default_factory=Intermittent)


class Failback(Strict):
    """Move traffic back once the primary has been healthy long enough; a human approves by default."""

    playbook: str = Field(description="The playbook that moves traffic back (e.g. region-failback).")
    healthy_probes: list[str] = Field(min_length=1, description="Probes of the primary that must be UP.")
    healthy_for: Duration = Field(default=600.0, gt=0, description="How long they must have been UP.")
    approval: Literal["auto", "manual"] = Field(default="manual", description="manual: ask a human first.")


class Service(Strict):
    """A business function that must stay up (checkout, login, search)."""

    description: str = ""
    tier: Tier = Field(description="critical | important | supporting: the severity ceiling.")
    rto: Duration = Field(description="Recovery time objective, e.g. 5m.")
    rpo: Duration = Field(default=0.0, description="Recovery point objective, e.g. 30s.")
    owners: list[str] = Field(default_factory=list)
    probes: list[str] = Field(min_length=1, description="Names of probes in the probes section.")
    playbook: str | None = Field(default=None, description="Playbook run when the service is DOWN.")
    depends_on: list[str] = Field(
        default_factory=list,
        description="Services this one needs: their outage's incident absorbs this one's.",
    )
    failback: Failback | None = Field(default=None, description="Move traffic back after a failover.")
    roles: Roles = Field(default_factory=Roles, description="Incident commander, comms lead, owners.")
    display_name: str | None = Field(
        default=None, description="What customers call it (status page, notices); default: the name."
    )
    impact: str = Field(default="", description="In plain words, what customers cannot do while it is down.")
    workaround: str = Field(default="", description="What users can do meanwhile, told in every update.")
    region: str | None = Field(
        default=None,
        description="Where it runs (e.g. eu-west-1): a region's services failing together are one incident.",
    )


class PromQuery(Strict):
    url: str = Field(description="Prometheus base URL, e.g. http://prometheus:9090.")
    query: str = Field(description="An instant PromQL query; the first series' value is used.")


class CloudWatchMetric(Strict):
    namespace: str = "AWS/RDS"
    metric: str = "ReplicaLag"
    dimensions: dict[str, str] = Field(default_factory=dict, description="e.g. {DBInstanceIdentifier: db-2}.")
    statistic: Literal["Average", "Maximum", "Minimum", "Sum"] = "Maximum"
    period: Duration = Field(default=60.0, gt=0)
    window: Duration = Field(default=300.0, gt=0, description="How far back to look for datapoints.")


class ReplicaLagGuard(Strict):
    """Replica lag in seconds must be under `max` (default: the service's RPO)."""

    prometheus: PromQuery | None = None
    cloudwatch: CloudWatchMetric | None = None
    max: Duration | None = Field(default=None, description="Lag limit; by default the service's RPO.")

    @model_validator(mode="after")
    def _one_source(self) -> ReplicaLagGuard:
        if (self.prometheus is None) == (self.cloudwatch is None):
            raise ValueError("exactly one of prometheus or cloudwatch as the source of the lag")
        return self


class PromGuard(PromQuery, Comparison):
    """A custom PromQL condition that must hold, e.g. the secondary's error ratio {lt: 0.01}."""


class Guard(Strict):
    """One condition checked from live data before a step; exactly one kind per entry."""

    probes_healthy: list[str] | None = Field(
        default=None, description="Probes that must be UP: never fail over into a dead region."
    )
    replica_lag: ReplicaLagGuard | None = None
    prometheus: PromGuard | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Guard:
        given = [k for k in ("probes_healthy", "replica_lag", "prometheus") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of probes_healthy, replica_lag or prometheus per guard")
        return self


class StepSpec(Strict):
    name: str = Field(min_length=1)
    action: str = Field(description="An action name, e.g. aws.route53.switch_record.")
    params: dict[str, Any] = Field(default_factory=dict, alias="with", description="The action's parameters.")
    timeout: Duration = Field(default=60.0, gt=0, description="Deadline for one attempt.")
    retries: int = Field(default=2, ge=0, le=20, description="Extra attempts, with exponential backoff.")


class PlaybookStep(StepSpec):
    guards: list[Guard] = Field(
        default_factory=list, description="Checked before the step; one failing stops the run."
    )
    rollback: str | None = Field(
        default=None, description="Name of a rollback_steps entry that undoes this step."
    )
    group: str | None = Field(default=None, description="Adjacent steps with the same group run in parallel.")


class Playbook(Strict):
    description: str = ""
    steps: list[PlaybookStep] = Field(min_length=1)
    cooldown: Duration = Field(default=1800.0, ge=0, description="No second automatic run within this.")
    approval: Literal["auto", "manual"] = Field(
        default="auto", description="manual: a human approves each run."
    )
    auto_approve: list[Literal["critical", "moderate", "low"]] = Field(
        default_factory=list, description="With approval: manual, severities approved without a human."
    )
    approval_timeout: Duration = Field(default=1800.0, gt=0, description="An unanswered approval expires.")
    escalate_after: Duration = Field(default=600.0, gt=0, description="Page again if nobody has answered.")
    on_failure: Literal["stop", "rollback"] = Field(
        default="stop", description="rollback: undo the completed steps in reverse order."
    )
    rollback_steps: list[StepSpec] = Field(default_factory=list, description="Undo actions, named by steps.")
    fails_away_from: str | None = Field(
        default=None,
        description="The region this playbook moves traffic out of (e.g. eu-west-1); `validate` warns "
        "when the controller itself runs there.",
    )

    def needs_approval(self, severity: str | None) -> bool:
        return self.approval == "manual" and severity not in self.auto_approve


class PagerDuty(Strict):
    routing_key_env: str = Field(description="Environment variable holding the integration key.")
    events_url: str = "https://events.pagerduty.com/v2/enqueue"
    source: str = Field(default="continuity", description="payload.source of every event.")
    rate_per_minute: int = Field(default=120, ge=1, description="Pacing: PagerDuty takes ~120 a minute.")


class Slack(Strict):
    """Slack incoming webhook; the URL is the secret."""

    webhook_url_env: str = Field(description="Environment variable holding the incoming-webhook URL.")
    rate_per_minute: int = Field(default=60, ge=1, description="Slack allows about one a second.")


class Teams(Strict):
    """Microsoft Teams incoming webhook (a Workflows 'post to a channel' URL); the URL is the secret."""

    webhook_url_env: str = Field(description="Environment variable holding the webhook URL.")
    rate_per_minute: int = Field(default=30, ge=1)


class Webhook(Strict):
    """A generic JSON webhook, signed with HMAC-SHA256 so the receiver can tell it is us."""

    url: str = Field(pattern=r"^https?://", description="Where to POST the events.")
    secret_env: str = Field(description="Environment variable holding the shared signing secret.")
    timeout: Duration = Field(default=10.0, gt=0)
    rate_per_minute: int = Field(default=120, ge=1)


class Audiences(Strict):
    customers: list[str] = Field(default_factory=list)
    internal: list[str] = Field(default_factory=list)
    executives: list[str] = Field(default_factory=list)


class Email(Strict):
    """SMTP submission with STARTTLS (port 587). Implicit TLS (port 465) is not supported."""

    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = Field(
        default=True, description="Upgrade to TLS before anything else; refuse if not offered."
    )
    username_env: str | None = Field(default=None, description="Environment variable holding the SMTP user.")
    password_env: str | None = Field(default=None, description="Environment variable holding its password.")
    from_: str = Field(alias="from", pattern=r"^[^@\s]+@[^@\s]+$", description="Sender address.")
    to: Audiences = Field(default_factory=Audiences, description="Recipients per audience.")
    ca_file: str | None = Field(default=None, description="Extra CA bundle to trust (a private relay).")
    timeout: Duration = Field(default=30.0, gt=0)
    rate_per_minute: int = Field(default=60, ge=1)

    @model_validator(mode="after")
    def _credentials(self) -> Email:
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("both username_env and password_env, or neither, found only one")
        if self.username_env and not self.starttls:
            raise ValueError(
                "starttls: true when credentials are set (never send them in clear), found false"
            )
        return self


class Statuspage(Strict):
    """Atlassian Statuspage REST API v1."""

    page_id: str = Field(min_length=1)
    api_key_env: str = Field(description="Environment variable holding the API key.")
    base_url: str = Field(default="https://api.statuspage.io/v1", pattern=r"^https?://")
    components: dict[str, str] = Field(
        default_factory=dict, description="Our service name -> Statuspage component id."
    )
    rate_per_minute: int = Field(default=60, ge=1, description="Statuspage allows about 60 a minute.")


class Notifiers(Strict):
    pagerduty: PagerDuty | None = None
    slack: Slack | None = None
    teams: Teams | None = None
    webhook: Webhook | None = None
    email: Email | None = None
    statuspage: Statuspage | None = None


class Aws(Strict):
    """Where boto3 goes. Credentials come from the usual chain (env, profile, IRSA), never this file."""

    region: str = "us-east-1"
    endpoint_url: str | None = Field(default=None, description="Override, e.g. a moto server in tests.")
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 20.0


class TierRule(Strict):
    down: Severity
    degraded: Severity


class Classification(Strict):
    """Severity by tier and health; defaults follow DESIGN.md's Severity section."""

    critical: TierRule = TierRule(down="critical", degraded="moderate")
    important: TierRule = TierRule(down="moderate", degraded="moderate")
    supporting: TierRule = TierRule(down="low", degraded="low")


def listen_address(value: str, ephemeral: bool = False) -> tuple[str, int]:
    """HOST:PORT -> (host, port): port 1-65535 in digits (0, any free port, only where `ephemeral`:
    the config's field, which tests use); host a name or address, `[v6]` bracketed, empty for every
    interface. Raises ValueError with what was expected, found."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not port.isascii():
        raise ValueError(f"HOST:PORT with a port of digits, e.g. 127.0.0.1:8080, found {value[:80]!r}")
    if not (0 if ephemeral else 1) <= int(port) <= 65535:
        raise ValueError(f"a port from 1 to 65535, found {port[:20]}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if any(c.isspace() or c in "/[]@?#" for c in host):
        raise ValueError(f"a host name or address before the port, found {host[:80]!r}")
    return host or "0.0.0.0", int(port)


class ControllerSettings(Strict):
    data_dir: str = Field(
        default=".continuity", description="Where SQLite state and the file lock live (`--data-dir` wins)."
    )
    region: str | None = Field(
        default=None,
        description="The region this controller runs in (default: AWS_REGION); `validate` warns when a "
        "playbook fails away from it.",
    )
    listen: str = Field(default="127.0.0.1:8080", description="HTTP API and /metrics address.")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        listen_address(value, ephemeral=True)
        return value

    dry_run: bool = Field(default=False, description="Decide and record everything, change nothing.")
    tick: Duration = Field(default=1.0, gt=0, description="How often the decision loop runs.")
    outbox_retry: Duration = Field(
        default=5.0, gt=0, description="First retry delay for undelivered messages."
    )
    resolver_nameservers: list[str] = Field(
        default_factory=list,
        description="DNS servers (ip or ip:port) probes resolve names with, over async UDP; "
        "default: the system's getaddrinfo on a dedicated thread pool.",
    )

    @field_validator("resolver_nameservers")
    @classmethod
    def _servers(cls, value: list[str]) -> list[str]:
        for server in value:
            parse_server(server)
        return value

    config_poll: Duration = Field(
        default=10.0, gt=0, description="How often `run` checks the config file for changes."
    )
    max_runs_per_hour: int = Field(
        default=3, ge=1, description="Cap on automatic playbook runs per hour, all services together."
    )
    api_token_env: str = Field(
        default="CONTINUITY_API_TOKEN",
        description="Env var holding the bearer token for the API's writes and every push "
        "(Alertmanager, heartbeats, agents). Read once, when `run` starts.",
    )
    insecure_unauthenticated_pushes: bool = Field(
        default=False,
        description="Accept Alertmanager webhooks and heartbeats without a credential. Insecure: "
        "anyone who reaches the port can open incidents. Logged at start and exported as a metric.",
    )
    push_rate: float = Field(
        default=20.0, gt=0, description="Pushes (alerts, heartbeats, results) per second per source address."
    )
    push_burst: int = Field(default=200, ge=1, description="Pushes a source may send at once.")
    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s]+$",
        description="Where people reach the status page; links (Atom feed) are built from it, never "
        "from a request's Host header. Unset: links are relative.",
    )
    api_max_connections: int = Field(
        default=256,
        ge=1,
        description="Open API connections at most; beyond, 503 and close. Lowered at start to a quarter "
        "of the file-descriptor limit so that probes always keep theirs.",
    )
    api_header_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="A connection that has not sent a whole request head by then is closed.",
    )


class Leader(Strict):
    """Only the leader decides and acts; every replica probes. Timings are client-go's defaults."""

    backend: Literal["none", "file", "kubernetes"] = Field(
        default="file",
        description="file: a lock in data_dir; kubernetes: a coordination.k8s.io Lease; none: always lead.",
    )
    lease_name: str = Field(default="continuity-leader", description="Lease (or lock file) name.")
    namespace: str | None = Field(default=None, description="Lease namespace; default: the pod's own.")
    identity: str | None = Field(
        default=None, description="This replica's name; default: POD_NAME or host-pid."
    )
    lease_duration: Duration = Field(default=15.0, gt=0)
    renew_deadline: Duration = Field(default=10.0, gt=0)
    retry_period: Duration = Field(default=2.0, gt=0)


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class StoreSettings(Strict):
    """Where state lives: SQLite in `controller.data_dir`, or Kubernetes objects in a cluster."""

    backend: Literal["sqlite", "kubernetes"] = Field(
        default="sqlite",
        description="sqlite: one file in controller.data_dir; kubernetes: continuity.dev objects.",
    )
    namespace: str | None = Field(
        default=None,
        min_length=1,
        description="Namespace of the kubernetes backend's objects; by default the pod's own, else default.",
    )

    def resolved_namespace(self, sa_file: str | Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
        """The configured namespace, else the pod's (from its service account), else ``default``."""
        if self.namespace:
            return self.namespace
        try:
            return Path(sa_file).read_text().strip() or "default"
        except OSError:
            return "default"


Likelihood = Literal["rare", "unlikely", "possible", "likely", "almost_certain"]
Impact = Literal["minor", "moderate", "major", "severe"]


class Risk(Strict):
    """One entry of the risk register: what could happen, how likely, how bad, and its rehearsal."""

    description: str = Field(min_length=1, description="What could happen, in plain words.")
    likelihood: Likelihood = Field(description="rare | unlikely | possible | likely | almost_certain.")
    impact: Impact = Field(description="minor | moderate | major | severe.")
    services: list[str] = Field(default_factory=list, description="Services it would hit.")
    drill: str = Field(description="The drill scenario that rehearses it (`continuity drill --list`).")
    mitigation: str = Field(default="", description="What limits the damage (playbook, design, contract).")
    owner: str | None = Field(default=None, description="Who keeps this risk under review.")


class DrillSettings(Strict):
    """How drill results are judged in the continuity plan."""

    max_age: Duration = Field(
        default=180 * 86400.0, gt=0, description="A scenario's latest drill older than this is flagged stale."
    )


class Grouping(Strict):
    """`grouping:` how failures of one region's services become one incident."""

    by_region: bool = Field(default=True, description="Group services that share a `region`.")
    window: Duration = Field(
        default=120.0, gt=0, description="Failures starting this close together are one outage."
    )


def display_name(name: str, svc: Service | None) -> str:
    """How people read a service's name: its `display_name`, else the name capitalised (`order-api` ->
    "Order api")."""
    return (svc.display_name if svc and svc.display_name else name.replace("-", " ").capitalize()) or name


class Config(Strict):
    services: dict[str, Service]
    probes: dict[str, ProbeConfig]
    detection: Detection = Field(default_factory=Detection)
    classification: Classification = Field(default_factory=Classification)
    playbooks: dict[str, Playbook] = Field(default_factory=dict)
    notifiers: Notifiers = Field(default_factory=Notifiers)
    aws: Aws = Field(default_factory=Aws)
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    maintenance: list[Maintenance] = Field(default_factory=list, description="Scheduled quiet windows.")
    leader: Leader = Field(default_factory=Leader)
    communications: Communications = Field(default_factory=Communications)
    store: StoreSettings = Field(default_factory=StoreSettings)
    risks: dict[str, Risk] = Field(
        default_factory=dict, description="The risk register; each risk names the drill that rehearses it."
    )
    drills: DrillSettings = Field(default_factory=DrillSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    inbound: InboundSettings = Field(default_factory=InboundSettings)
    grouping: Grouping = Field(default_factory=Grouping)
    _services_of: dict[str, list[str]] | None = PrivateAttr(default=None)

    def rules(self, probe: str, confirm: bool = True) -> Rules:
        p = self.probes[probe]
        d = self.detection
        window = p.window or d.window
        return Rules(
            failure_threshold=p.failure_threshold or d.failure_threshold,
            success_threshold=p.success_threshold or d.success_threshold,
            window_failures=window.failures if window else None,
            window_size=window.of if window else None,
            confirm=confirm and d.confirm.probes > 0,
            confirm_probes=d.confirm.probes,
            confirm_span=self.confirm_span(probe),
            flap_changes=d.flapping.changes,
            flap_window=d.flapping.within,
            intermittent_window=d.intermittent.window,
            intermittent_rate=d.intermittent.rate,
            intermittent_min_runs=d.intermittent.min_runs,
            requests=len(getattr(p, "steps", None) or ()) or 1,  # a journey's steps: detect.prior_rate
        )

    def confirm_span(self, probe: str) -> float:
        """The shortest outage that can make `probe` DOWN (detection.confirm.span, or the old floor)."""
        d = self.detection
        if d.confirm.span is not None:
            return d.confirm.span
        thr = self.probes[probe].failure_threshold or d.failure_threshold
        return (thr - 1) * self.probes[probe].interval + max(d.confirm.probes - 1, 0) * d.confirm.spacing

    def detection_times(self, probe: str) -> tuple[float, float]:
        """(refused, hang): seconds from the first failed run's start to DOWN for a target that refuses
        at once and for one that never answers, by the rule in controller/detect.py `judge`.

        A refusal is DOWN once the failed runs span `span` and number threshold + probes: the burst's
        tries go out `spacing` apart from the first failure, so that is max(span, (threshold + probes -
        2) x spacing). A hang's runs fail only at their timeout T; its burst starts at the first sign
        of trouble, min(interval, T) after the first run (a run still in flight at its next slot, or
        its timeout), and its closing try starts once the span is covered: max(span, min(interval, T) +
        (threshold + probes - 2) x spacing) + T. Past `confirm.probes: 0` no burst runs: threshold runs
        one interval apart, and a hang adds one timeout."""
        p = self.probes[probe]
        d = self.detection
        thr = p.failure_threshold or d.failure_threshold
        t, i = p.timeout, p.interval
        if d.confirm.probes <= 0:
            return (thr - 1) * i, (thr - 1) * i + t
        span = self.confirm_span(probe)
        quick = (thr + d.confirm.probes - 2) * d.confirm.spacing
        return max(span, quick), max(span, min(i, t) + quick) + t

    def detection_warnings(self, ratio: float = 1.5) -> list[str]:
        """One line per polled probe whose hang cannot be DOWN within `ratio` x a refusal (issue 10):
        physics, not a bug; a timeout much longer than the refused detection time costs one timeout."""
        out = []
        for name, p in sorted(self.probes.items()):
            if p.kind in ("heartbeat", "alertmanager"):
                continue
            refused, hang = self.detection_times(name)
            if refused > 0 and hang > ratio * refused + 1e-9:
                span = self.confirm_span(name)
                need = max(0.0, (ratio - 1) * refused - max(0.0, hang - refused - p.timeout))
                out.append(
                    f"probes.{name}.timeout: a hanging target is DOWN {hang:.2f}s after its first "
                    f"failed run, a refusing one {refused:.2f}s ({hang / refused:.2f}x > {ratio:g}x): "
                    f"a hang costs one timeout ({p.timeout:g}s) more than a refusal. Lower "
                    f"probes.{name}.timeout to {need:.2f}s or less, or raise detection.confirm.span "
                    f"(now {span:g}s) to {p.timeout / (ratio - 1):.2f}s or more (slower to detect, "
                    "fewer false alarms)"
                )
        return out

    def services_of(self, probe: str) -> list[str]:
        """The services a probe belongs to (indexed once: verdict changes look it up often)."""
        if self._services_of is None:
            index: dict[str, list[str]] = {}
            for name, svc in self.services.items():
                for p in svc.probes:
                    index.setdefault(p, []).append(name)
            self._services_of = index
        return self._services_of.get(probe, [])

    def freshness(self, probe: str) -> float:
        return self.detection.freshness or 3 * self.probes[probe].interval + self.probes[probe].timeout

    def quorum(self, probe: str) -> int:
        return self.probes[probe].quorum or self.detection.quorum

    def thresholds(self, probe: str) -> tuple[int, int]:
        p = self.probes[probe]
        return (
            p.failure_threshold or self.detection.failure_threshold,
            p.success_threshold or self.detection.success_threshold,
        )


# ------------------------------------------------------------------ errors


MAX_PROBLEMS = 100
"""Problems listed for one config: a file with 13,000 wrong probes needs its first mistakes shown,
not 2 MB of them (the rest are counted); it also bounds the work of explaining a hostile file."""


class ConfigError(Exception):
    """Every problem found in a config, each already formatted for a human (at most MAX_PROBLEMS,
    then one line counting the rest)."""

    def __init__(self, problems: list[str], more: int = 0) -> None:
        more += max(0, len(problems) - MAX_PROBLEMS)
        self.count = min(len(problems), MAX_PROBLEMS) + more
        problems = problems[:MAX_PROBLEMS]
        if more:
            problems = [*problems, f"... and {more:,} more problem(s) not listed: fix the ones above first"]
        super().__init__("\n".join(problems))
        self.problems = problems


def _path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple = 3, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def _found(value: Any) -> str:
    """A value as the error shows it: bounded whatever its size, since a config can hold a huge one."""
    text = _SHORT.repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _vocabulary() -> set[str]:
    from playbooks.actions import ACTIONS

    seen: set[str] = set()
    todo: list[Any] = [Config, *(a.Params for a in ACTIONS.values())]
    done: set[Any] = set(todo)
    while todo:
        model = todo.pop()
        for name, field in model.model_fields.items():
            seen.add(field.alias or name)
            for sub in _annotation_types(field.annotation):
                if issubclass(sub, Strict) and sub not in done:
                    done.add(sub)
                    todo.append(sub)
    return seen


def _annotation_types(annotation: Any) -> Iterable[type]:
    """Every class inside an annotation: dict[str, Annotated[A | B, ...]] -> A, B (and str)."""
    if isinstance(annotation, type) and not get_args(annotation):
        yield annotation
    for arg in get_args(annotation):
        yield from _annotation_types(arg)


def _sentence(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, _vocabulary(), n=1, cutoff=0.75)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"expected a known key{hint}, found unknown key {_found(key)}"
    if kind == "missing":
        return "expected a value (this field is required), found nothing"
    if kind == "union_tag_invalid":
        return f"expected one of {ctx.get('expected_tags')}, found {_found(ctx.get('tag'))}"
    if kind == "union_tag_not_found":
        return f"expected a '{ctx.get('discriminator', 'kind').strip(chr(39))}' field, found none"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, found {_found(value)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[
            kind
        ]
        bound = next(iter(ctx.values()), "?")
        return f"expected a number {op} {bound}, found {_found(value)}"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} item(s), found {ctx.get('actual_length')}"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        if ", found" in msg:
            return f"expected {msg}"
        return f"expected {msg}, found {_found(value)}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        wanted = kind.split("_")[0]
        wanted = {
            "dict": "a mapping",
            "model": "a mapping",
            "list": "a list",
            "int": "an integer",
            "float": "a number",
            "string": "a string",
            "bool": "true or false",
        }.get(wanted, wanted)
        return f"expected {wanted}, found {_found(value)}"
    return f"expected {err['msg'].lower()}, found {_found(value)}"


def _format(errors: Sequence[Mapping[str, Any]], origin: Any, prefix: tuple[Any, ...] = ()) -> list[str]:
    out = []
    for err in errors:
        loc = list(prefix) + list(err["loc"])
        # Discriminated unions put the tag into the location: probes.x.http.url -> probes.x.url
        if len(loc) >= 3 and loc[0] == "probes" and loc[2] in PROBE_KINDS:
            del loc[2]
        if err["type"] == "union_tag_invalid":
            loc = [*loc, "kind"]
        out.append(f"{origin(loc)}: {_path(loc)}: {_sentence(err)}")
    return out


# ------------------------------------------------------------------ loading


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader that refuses duplicate keys: YAML would silently keep the last one.

    It parses with libyaml where PyYAML has it: for 20,000 probes that is 5 s instead of 12 s and
    130 MB instead of 210 MB of resident memory (bench/scale.py)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A plain string is its node's text (what SafeConstructor's str constructor returns, by five
        calls more): most values of a config are strings, and building them is most of the load."""
        if node.__class__ is yaml.ScalarNode and node.tag == _STR_TAG:
            return node.value
        return super().construct_object(node, deep=deep)


_STR_TAG = "tag:yaml.org,2002:str"


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    """Build a mapping in one pass, each key once (building keys twice made a config cost twice its
    keys), refusing a key written twice; `<<: *defaults` merge keys work, explicit keys winning."""
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"expected a mapping node, but found {node.id}", node.start_mark
        )
    own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # PyYAML's own merge: merged pairs first, then the mapping's own
    first_own = len(node.value) - own
    data: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark
            ) from None
        if i >= first_own:
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {_found(key)} (the first is on line {lines[key] + 1})",
                    key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line
        data[key] = loader.construct_object(value_node, deep=deep)
    return data


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


CONFIG_MAX_BYTES = 4 * 1024 * 1024
"""Largest config file read (and the total for a directory): far above any real config, small
enough that reading one can never exhaust the controller's memory."""
CONFIG_MAX_DEPTH = 64
"""Deepest nesting accepted (a real config is under 10 deep); `[[[[...` a million deep is refused."""
CONFIG_MAX_NODES = 20_000
"""Values (scalars, lists, mappings) in a file once aliases are expanded: about 1,250 probes (a
probe with its expectations is ~16). Building them is PyYAML's Python constructor at 7-14 us a
value, the floor of any YAML load here, so this bound is what keeps `validate` on any file, hostile
or not, under a second on a free core (bench/hostile.py: about 0.4 s of it is starting Python and
the CLI). A bigger fleet raises it with the CONTINUITY_CONFIG_MAX_NODES environment variable (read each
time a config is loaded); the refusal says so."""
CONFIG_MAX_ALIAS_NODES = 10_000
"""Values that aliases (`*name`) may add on top of the file's own: anchors for shared defaults
are small; a 'billion laughs' file that multiplies them is refused before anything is built."""


def _max_nodes() -> int:
    try:
        return max(1000, int(os.environ.get("CONTINUITY_CONFIG_MAX_NODES", CONFIG_MAX_NODES)))
    except ValueError:
        return CONFIG_MAX_NODES


def _check_shape(text: str, path: Path) -> None:
    """Walk the YAML event stream once (libyaml; nothing is built) and refuse, as soon as a bound
    is passed, a file whose aliases multiply, that nests too deep or holds too many values.

    The sizes of anchored subtrees are tracked, so an alias costs what it expands to: the count is
    of the document as it would be built, without building it.
    """
    limit = _max_nodes()
    anchors: dict[str, int] = {}
    stack: list[tuple[str | None, int]] = []
    total = own = 0
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    def refuse(event: Any, what: str) -> ConfigError:
        mark = event.start_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(unknown position)"
        return ConfigError([f"{path}: {where}: {what}"])

    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.AliasEvent):
            size = anchors.get(event.anchor or "", 1)
            total += size
            if total - own > CONFIG_MAX_ALIAS_NODES:
                raise refuse(
                    event,
                    f"expected aliases (*name) to add at most {CONFIG_MAX_ALIAS_NODES:,} values, found "
                    f"more (*{str(event.anchor)[:40]} alone expands to {size:,}): aliases that multiply "
                    "are refused",
                )
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            own += 1
            if event.anchor:
                anchors[event.anchor] = 1
        elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            total += 1
            own += 1
            stack.append((event.anchor, total - 1))
            if len(stack) > CONFIG_MAX_DEPTH:
                raise refuse(event, f"expected nesting at most {CONFIG_MAX_DEPTH} deep, found deeper")
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent) and stack:
            anchor, start = stack.pop()
            if anchor:
                anchors[anchor] = total - start
        else:
            continue
        if total > limit:
            raise refuse(
                event,
                f"expected at most {limit:,} values (after expanding aliases), found more "
                "(raise CONTINUITY_CONFIG_MAX_NODES for a bigger fleet)",
            )


def _read_yaml(path: Path, budget: list[int] | None = None) -> Any:
    try:
        size = path.stat().st_size
        if size > CONFIG_MAX_BYTES:
            raise ConfigError([f"{path}: expected at most {CONFIG_MAX_BYTES:,} bytes, found {size:,}"])
        if budget is not None:
            budget[0] -= size
            if budget[0] < 0:
                raise ConfigError(
                    [
                        f"{path}: expected the files of a config to hold at most {CONFIG_MAX_BYTES:,} bytes "
                        "together, found more"
                    ]
                )
        with path.open("rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)  # the file may grow between stat and read
        if len(data) > CONFIG_MAX_BYTES:
            raise ConfigError([f"{path}: expected at most {CONFIG_MAX_BYTES:,} bytes, found more"])
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: expected UTF-8 text, found binary data"]) from None
    try:
        _check_shape(text, path)
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(unknown position)"
        problem = str(exc.problem or exc)[:200]
        raise ConfigError([f"{path}: {where}: expected valid YAML, found {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: expected valid YAML, found {str(exc)[:200]}"]) from None
    except (RecursionError, MemoryError):
        raise ConfigError(
            [f"{path}: expected a config of ordinary size and depth, found one too big to read"]
        ) from None


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not found:
            raise ConfigError([f"{path}: expected a directory holding *.yaml files, found none"])
        return found
    if not path.exists():
        raise ConfigError([f"{path}: cannot read the file: no such file"])
    return [path]


def load_raw(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, str], Path]]:
    """Merge one file, or a directory of them, into one document; remember which file said what."""
    root = Path(path)
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, str], Path] = {}
    problems: list[str] = []
    budget = [CONFIG_MAX_BYTES]
    for file in _files(root):
        doc = _read_yaml(file, budget)
        if doc is None:
            continue
        if not isinstance(doc, dict):
            problems.append(f"{file}: (top level): expected a mapping of sections, found {_found(doc)}")
            continue
        for section, body in doc.items():
            origin[(str(section), "")] = origin.get((str(section), ""), file)
            if isinstance(body, dict) and isinstance(merged.get(section), dict):
                for key, value in body.items():
                    if key in merged[section]:
                        problems.append(
                            f"{file}: {section}.{key}: expected a unique name, found it also in "
                            f"{origin[(str(section), str(key))]}"
                        )
                    merged[section][key] = value
                    origin[(str(section), str(key))] = file
            elif section in merged:
                problems.append(
                    f"{file}: {section}: expected one definition, found it also in "
                    f"{origin[(str(section), '')]}"
                )
            else:
                merged[section] = body
                if isinstance(body, dict):
                    for key in body:
                        origin[(str(section), str(key))] = file
    if problems:
        raise ConfigError(problems)
    return merged, origin


def _mapping(value: Any) -> dict[str, Any]:
    """A section as written when it is a mapping; anything else is pydantic's to report."""
    return value if isinstance(value, dict) else {}


Problem = tuple[list[Any], str | Mapping[str, Any]]
"""Where, and what: a sentence, or a pydantic error that `_sentence` explains only if it is listed
(a hostile file's 4,960 wrong step parameters need 100 sentences, and the count of the rest)."""


def _cross_references(raw: dict[str, Any], known: _Known) -> list[Problem]:
    """Checks pydantic cannot do alone: names that point across sections, and action parameters."""

    found: list[Problem] = []
    probes = _mapping(raw.get("probes"))
    playbooks = _mapping(raw.get("playbooks"))
    services = _mapping(raw.get("services"))
    for sname, svc in services.items():
        if not isinstance(svc, dict):
            continue
        for i, pname in enumerate(svc.get("probes") or [] if isinstance(svc.get("probes"), list) else []):
            if isinstance(pname, str) and pname not in probes:
                found.append(
                    (
                        ["services", sname, "probes", i],
                        f"expected a probe defined under probes ({known(probes)}), found {_found(pname)}",
                    )
                )
        fb = svc.get("failback")
        if isinstance(fb, dict):
            if isinstance(fb.get("playbook"), str) and fb["playbook"] not in playbooks:
                found.append(
                    (
                        ["services", sname, "failback", "playbook"],
                        f"expected a playbook defined under playbooks ({known(playbooks)}), "
                        f"found {_found(fb['playbook'])}",
                    )
                )
            for i, ref in enumerate(
                fb.get("healthy_probes") or [] if isinstance(fb.get("healthy_probes"), list) else []
            ):
                if isinstance(ref, str) and ref not in probes:
                    found.append(
                        (
                            ["services", sname, "failback", "healthy_probes", i],
                            f"expected a probe defined under probes ({known(probes)}), found {_found(ref)}",
                        )
                    )
        pb = svc.get("playbook")
        if isinstance(pb, str) and pb not in playbooks:
            found.append(
                (
                    ["services", sname, "playbook"],
                    f"expected a playbook defined under playbooks ({known(playbooks)}), found {_found(pb)}",
                )
            )
    found.extend(_check_risks(raw, services, known))
    found.extend(_check_names(raw, probes, services, known))
    for pbname, pb in playbooks.items():
        if not isinstance(pb, dict):
            continue
        rollback_names = (
            {r.get("name") for r in pb.get("rollback_steps") or [] if isinstance(r, dict)}
            if isinstance(pb.get("rollback_steps"), list)
            else set()
        )
        for section in ("steps", "rollback_steps"):
            steps = pb.get(section)
            if isinstance(steps, list):
                found.extend(
                    _check_steps(["playbooks", pbname, section], steps, probes, rollback_names, known)
                )
    return found


def _check_names(
    raw: dict[str, Any], probes: dict[str, Any], services: dict[str, Any], known: _Known
) -> list[tuple[list[Any], str]]:
    """Every other name that points across sections: a typo here must fail `validate`, never reach
    the reconcile loop (a misspelt reference probe used to raise KeyError on every tick)."""
    found: list[tuple[list[Any], str]] = []
    detection = _mapping(raw.get("detection"))
    refs = detection.get("reference_probes")
    refs = refs if isinstance(refs, list) else []
    for i, ref in enumerate(refs):
        if not isinstance(ref, str) or ref not in probes:
            found.append(
                (
                    ["detection", "reference_probes", i],
                    f"expected a probe defined under probes ({known(probes)}), found {_found(ref)}",
                )
            )
    quorum = detection.get("isolation_quorum")
    if isinstance(quorum, int) and not isinstance(quorum, bool) and quorum > len(refs):
        found.append(
            (
                ["detection", "isolation_quorum"],
                f"expected at most the number of reference_probes ({len(refs)}), found {quorum}",
            )
        )
    for sname, svc in services.items():
        deps = svc.get("depends_on") if isinstance(svc, dict) else None
        for i, dep in enumerate(deps if isinstance(deps, list) else []):
            if not isinstance(dep, str) or dep not in services or dep == sname:
                what = "another service" if dep == sname else f"a service ({known(services)})"
                found.append((["services", sname, "depends_on", i], f"expected {what}, found {_found(dep)}"))
    found.extend(_dependency_cycles(services))
    windows = raw.get("maintenance")
    for w, window in enumerate(windows if isinstance(windows, list) else []):
        names = window.get("services") if isinstance(window, dict) else None
        for i, sname in enumerate(names if isinstance(names, list) else []):
            if not isinstance(sname, str) or sname not in services:
                found.append(
                    (
                        ["maintenance", w, "services", i],
                        f"expected a service ({known(services)}), found {_found(sname)}",
                    )
                )
    notifiers = _mapping(raw.get("notifiers"))
    sp = notifiers.get("statuspage")
    components = sp.get("components") if isinstance(sp, dict) else None
    for sname in components if isinstance(components, dict) else {}:
        if sname not in services:
            found.append(
                (
                    ["notifiers", "statuspage", "components", sname],
                    f"expected a service ({known(services)}), found {_found(sname)}",
                )
            )
    return found


def _check_risks(raw: dict[str, Any], services: dict[str, Any], known: _Known) -> list[tuple[list[Any], str]]:
    """Each risk names a drill scenario that exists and services that exist."""
    from controller.drills.names import SCENARIOS

    found: list[tuple[list[Any], str]] = []
    risks = _mapping(raw.get("risks"))
    for rname, risk in risks.items():
        if not isinstance(risk, dict):
            continue
        drill = risk.get("drill")
        if isinstance(drill, str) and drill not in SCENARIOS:
            found.append(
                (
                    ["risks", rname, "drill"],
                    f"expected a drill scenario ({', '.join(SCENARIOS)}), found {_found(drill)}",
                )
            )
        names = risk.get("services")
        for i, sname in enumerate(names if isinstance(names, list) else []):
            if isinstance(sname, str) and sname not in services:
                found.append(
                    (
                        ["risks", rname, "services", i],
                        f"expected a service ({known(services)}), found {_found(sname)}",
                    )
                )
    return found


def _dependency_cycles(services: dict[str, Any]) -> list[tuple[list[Any], str]]:
    """A dependent waits while its dependency is down, so in a cycle every member waits for another
    and an outage of them all would open no incident and page nobody: refused, naming the cycle.
    Iterative, so a chain of thousands of services is no recursion risk."""
    graph: dict[str, list[str]] = {}
    for sname, svc in services.items():
        deps = svc.get("depends_on") if isinstance(svc, dict) else None
        graph[str(sname)] = (
            [d for d in deps if isinstance(d, str) and d in services] if isinstance(deps, list) else []
        )
    found: list[tuple[list[Any], str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in graph:
        if root in state:
            continue
        path: list[str] = [root]
        todo: list[Iterator[str]] = [iter(graph[root])]
        state[root] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                shown = " -> ".join(cycle) if len(cycle) <= 12 else " -> ".join([*cycle[:10], "...", nxt])
                found.append(
                    (
                        ["services", path[-1], "depends_on"],
                        f"expected dependencies without a cycle (in a cycle each service waits for "
                        f"another and none would page), found {shown} ({len(cycle) - 1} services)",
                    )
                )
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(graph[nxt]))
    return found


def _check_steps(
    where: list[Any],
    steps: list[Any],
    probes: dict[str, Any],
    rollback_names: set[Any],
    known: _Known,
) -> list[Problem]:
    """Step names unique, actions known, parameters valid for their action, references resolved."""
    from playbooks.actions import ACTIONS

    found: list[Problem] = []
    names: set[str] = set()
    rollbacks = {str(n): None for n in rollback_names}
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            continue
        at = [*where, i]
        if isinstance(step.get("name"), str):
            if step["name"] in names:
                found.append(
                    ([*at, "name"], f"expected a unique step name, found {_found(step['name'])} twice")
                )
            names.add(step["name"])
        rollback = step.get("rollback")
        if isinstance(rollback, str) and rollback not in rollback_names:
            found.append(
                (
                    [*at, "rollback"],
                    f"expected a step of rollback_steps ({known(rollbacks)}), found {_found(rollback)}",
                )
            )
        for g, guard in enumerate(step.get("guards") or [] if isinstance(step.get("guards"), list) else []):
            refs = guard.get("probes_healthy") if isinstance(guard, dict) else None
            for ref in refs if isinstance(refs, list) else []:
                if ref not in probes:
                    found.append(
                        (
                            [*at, "guards", g, "probes_healthy"],
                            f"expected a defined probe, found {_found(ref)}",
                        )
                    )
        action = step.get("action")
        if not isinstance(action, str):
            continue
        if action not in ACTIONS:
            found.append(
                ([*at, "action"], f"expected one of {', '.join(sorted(ACTIONS))}, found {_found(action)}")
            )
            continue
        params = step.get("with", {})
        try:
            ACTIONS[action].Params.model_validate(params if params is not None else {})
        except ValidationError as exc:
            found.extend(([*at, "with", *err["loc"]], _detached(err)) for err in exc.errors())
            waits: dict[str, float] = {}  # own_waits finds none in parameters that do not validate
        else:
            waits = ACTIONS[action].own_waits(params if isinstance(params, dict) else {})
        timeout = _seconds(step.get("timeout", 60.0))
        for field, wait in waits.items():
            if timeout is not None and wait >= timeout:
                found.append(
                    (
                        [*at, "with", field],
                        f"expected less than the step's timeout ({format_duration(timeout)}): the step's "
                        f"timeout must cover the action's own wait; found {format_duration(wait)} "
                        f"(raise {_path([*at, 'timeout'])} or lower this, or leave it unset to derive "
                        "it from the timeout)",
                    )
                )
        for ref in ACTIONS[action].probe_refs(params if isinstance(params, dict) else {}):
            if ref not in probes:
                found.append(
                    ([*at, "with", "probes"], f"expected the name of a defined probe, found {_found(ref)}")
                )
    return found


def _detached(err: Mapping[str, Any]) -> Mapping[str, Any]:
    """A pydantic error kept for later, without the exception its validator raised: that exception's
    traceback holds the frames that hold the list of errors, a cycle only the garbage collector
    frees (1,240 of them took longer to collect than to find). `_sentence` reads it as text anyway."""
    ctx = err.get("ctx")
    if isinstance(ctx, dict) and isinstance(ctx.get("error"), BaseException):
        return {**err, "ctx": {**ctx, "error": str(ctx["error"])}}
    return err


def _seconds(value: Any) -> float | None:
    """A duration as the config writes it (10s, 5m, 1.5), or None when it is not one (reported
    by pydantic already)."""
    if isinstance(value, float):  # the field's default
        return value
    try:
        return parse_duration(value) if isinstance(value, str) else None
    except ValueError:
        return None


_KNOWN_SHOWN = 8


class _Known:
    """The names an error offers, a few of them: listing all 9,000 probes in each of 9,000 errors made
    a 340 KB file print 558 MB. Computed once per mapping, since one config asks about it often.

    One per `load_config`, passed down to the checks, not a module-level cache: a reload parses in a
    worker thread while `probe` or a test may load another config, and each load's cache dies with
    it (it holds the mappings it describes, so an id is never reused while it is alive)."""

    def __init__(self) -> None:
        self._texts: dict[int, tuple[dict[Any, Any], str]] = {}

    def __call__(self, names: dict[Any, Any]) -> str:
        cached = self._texts.get(id(names))
        if cached is not None and cached[0] is names:
            return cached[1]
        if not names:
            text = "none are defined"
        else:
            shown = sorted(_found(n) if not isinstance(n, str) or len(n) > 60 else n for n in names)
            text = "known: " + ", ".join(shown[:_KNOWN_SHOWN])
            if len(shown) > _KNOWN_SHOWN:
                text += f", ... ({len(shown):,} in all)"
        self._texts[id(names)] = (names, text)
        return text


class _GcPause:
    """Pause Python's cyclic garbage collector while a config is read and checked.

    Building 20,000 YAML values and validating them allocates enough to trigger some 150 collections,
    each scanning every object alive (a third of `load_config`'s CPU on the largest files), and none
    can free anything: the nodes and values form no cycles. The work is bounded (the file's size,
    depth and values are, before anything is built), so the pause is too. Nested and concurrent
    loads (a reload runs in a worker thread) count, and the collector resumes after the last one,
    only if it was on before the first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._depth += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._resume:
                gc.enable()


_GC_PAUSE = _GcPause()


def load_config(path: str | Path) -> Config:
    """Load and validate; raise ConfigError listing every problem."""
    with _GC_PAUSE:
        config, problems, more = _checked(path)
    # Raised here, not where the problems were found: the document is freed with that frame, so the
    # collector does not resume with 20,000 values still alive to scan.
    if problems or config is None:
        raise ConfigError(problems, more)
    return config


def _checked(path: str | Path) -> tuple[Config | None, list[str], int]:
    """The config (None when pydantic refused it), every problem to list, and how many more."""
    raw, origin = load_raw(path)
    default = Path(path)

    def where(loc: list[Any]) -> Path:
        if len(loc) >= 2:
            return origin.get((str(loc[0]), str(loc[1])), origin.get((str(loc[0]), ""), default))
        if loc:
            return origin.get((str(loc[0]), ""), default)
        return default

    problems: list[str] = []
    config: Config | None = None
    more = 0
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        # Only the errors that will be shown are explained (a did-you-mean costs a difflib search).
        problems.extend(_format(exc.errors()[:MAX_PROBLEMS], where))
        more = max(0, exc.error_count() - MAX_PROBLEMS)
    # Only the problems that will be listed are formatted: 2,200 wrong names made 2,200 sentences for 100.
    refs = _cross_references(raw, _Known())
    room = max(0, MAX_PROBLEMS - len(problems))
    problems.extend(
        f"{where(loc)}: {_path(loc)}: {msg if isinstance(msg, str) else _sentence(msg)}"
        for loc, msg in refs[:room]
    )
    more += len(refs) - len(refs[:room])
    if config is not None and config.communications.templates_dir:
        from controller.comms.templates import check_dir

        tdir = Path(config.communications.templates_dir)
        if not tdir.is_absolute():  # relative to the config, so the repo can carry its templates
            tdir = (default if default.is_dir() else default.parent) / tdir
        config.communications.templates_dir = str(tdir)
        problems.extend(f"{file}: {at}: {msg}" for file, at, msg in check_dir(tdir))
    return config, problems, more


def resolve_secret(env_name: str) -> str:
    """Secrets are named in the config, held in the environment."""
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError([f"environment: {env_name}: expected the secret the config names, found it unset"])
    return value


def secret_env_names(config: Config) -> list[tuple[str, str, str]]:
    """Every environment variable the config names for a secret: (variable, where, when it is read).

    `when` is what the README's table says, so `validate` can tell an operator what an unset one
    will do: `run` refuses to start, or the pushes / messages / steps that need it wait or fail."""
    found: list[tuple[str, str, str]] = [
        (
            config.controller.api_token_env,
            "controller.api_token_env",
            "when `run` starts: unset, API writes and every push are refused",
        )
    ]
    notifiers = config.notifiers.model_dump()
    for channel, body in notifiers.items():
        if not isinstance(body, dict):
            continue
        for key, value in body.items():
            if key.endswith("_env") and isinstance(value, str):
                when = (
                    "when `run` starts: unset, `run` refuses to start"
                    if channel == "pagerduty"
                    else "at send time: unset, messages wait in the outbox"
                )
                found.append((value, f"notifiers.{channel}.{key}", when))
    for name, probe in config.probes.items():
        token_env = getattr(probe, "token_env", None)
        if token_env:
            found.append(
                (token_env, f"probes.{name}.token_env", "at each heartbeat: unset, pushes are refused")
            )
    for name, playbook in config.playbooks.items():
        for i, step in enumerate(playbook.steps):
            headers = (step.params or {}).get("headers") if isinstance(step.params, dict) else None
            for header, value in (headers or {}).items():
                if isinstance(value, dict) and isinstance(value.get("env"), str):
                    found.append(
                        (
                            value["env"],
                            f"playbooks.{name}.steps[{i}].params.headers.{header}.env",
                            "when the step runs: unset, the step fails",
                        )
                    )
    return found


def json_schema() -> dict[str, Any]:
    """The JSON Schema an editor uses to complete and check the YAML as the SRE types."""
    schema = Config.model_json_schema(by_alias=True, mode="validation")
    _duration_defaults(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Continuity configuration"
    return schema


def _duration_defaults(node: Any) -> None:
    """Pydantic writes a duration's default as the float it stores (`60.0`), which the config itself
    refuses (a bare number); the schema shows it as the SRE writes it (`60s`, `30m`)."""
    from controller.durations import DURATION_PATTERN, schema_text

    if isinstance(node, dict):
        kinds = [node, *(node.get("anyOf") or [])]
        is_duration = any(isinstance(k, dict) and k.get("pattern") == DURATION_PATTERN for k in kinds)
        default = node.get("default")
        if is_duration and isinstance(default, int | float) and not isinstance(default, bool):
            node["default"] = schema_text(float(default))
        for value in node.values():
            _duration_defaults(value)
    elif isinstance(node, list):
        for value in node:
            _duration_defaults(value)
