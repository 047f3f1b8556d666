"""The decision: observed state in, a list of decisions out, each with the sentence that explains it.

Like Patroni's `run_cycle`, every branch of what the controller will do is visible in one place,
and given the same observation it decides the same thing every time. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.classify import higher, severity
from controller.config import Config
from controller.detect import ServiceHealth, ServiceState
from controller.durations import format_duration


@dataclass(frozen=True)
class OpenIncident:
    service: str
    severity: str
    health: ServiceHealth
    reason: str


@dataclass(frozen=True)
class ChangeSeverity:
    incident_id: str
    service: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True)
class ResolveIncident:
    incident_id: str
    service: str
    reason: str


@dataclass(frozen=True)
class StartPlaybook:
    service: str
    playbook: str
    incident_id: str | None
    reason: str


@dataclass(frozen=True)
class Hold:
    """A decision not to act, recorded so the timeline explains the silence."""

    service: str
    incident_id: str | None
    reason: str
    key: str = field(default="", compare=False)
    """What stays the same while the same hold lasts (the reason may carry a countdown); the
    controller records a hold on the timeline once per key, not on every tick."""


Decision = OpenIncident | ChangeSeverity | ResolveIncident | StartPlaybook | Hold


@dataclass(frozen=True)
class OpenIncidentView:
    id: str
    severity: str
    floor: str | None = None
    """A severity the incident may not drop below (raised after a failed playbook)."""
    runs: int = 0
    """Playbook runs already started for this incident."""


@dataclass(frozen=True)
class Observation:
    now: float
    health: dict[str, ServiceHealth]
    incidents: dict[str, OpenIncidentView] = field(default_factory=dict)
    """Open incident per service."""
    running: frozenset[str] = frozenset()
    """Services with a playbook run in progress."""
    last_run_started: dict[str, float] = field(default_factory=dict)
    """Service -> when its playbook last started (any incident), for the cooldown."""


def decide(obs: Observation, config: Config) -> list[Decision]:
    out: list[Decision] = []
    for name, svc in config.services.items():
        health = obs.health.get(name)
        if health is None:
            continue
        incident = obs.incidents.get(name)
        wanted = severity(svc.tier, health, config.classification)
        if wanted is not None:
            if incident is None:
                out.append(OpenIncident(name, wanted, health, health.summary()))
            else:
                target = higher(wanted, incident.floor) if incident.floor else wanted
                if target != incident.severity:
                    out.append(
                        ChangeSeverity(
                            incident.id,
                            name,
                            incident.severity,
                            target,
                            f"{health.summary()}; severity {incident.severity} -> {target}",
                        )
                    )
        elif health.state is ServiceState.UP and incident is not None and name not in obs.running:
            out.append(ResolveIncident(incident.id, name, f"{name} is up again: all probes pass"))
        if health.state is ServiceState.DOWN and svc.playbook:
            out.extend(_failover(obs, config, name, svc.playbook, incident))
    return out


def _failover(
    obs: Observation, config: Config, service: str, playbook: str, incident: OpenIncidentView | None
) -> list[Decision]:
    incident_id = incident.id if incident else None
    if service in obs.running:
        return []
    if incident is not None and incident.runs > 0:
        return []  # one automatic run per incident; a failed run waits for a human
    cooldown = config.playbooks[playbook].cooldown
    last = obs.last_run_started.get(service)
    if last is not None and obs.now - last < cooldown:
        left = format_duration(cooldown - (obs.now - last))
        return [
            Hold(
                service,
                incident_id,
                f"not running {playbook}: it ran {format_duration(obs.now - last)} ago, "
                f"inside its {format_duration(cooldown)} cooldown ({left} left)",
                key=f"cooldown:{playbook}:{last}",
            )
        ]
    if config.playbooks[playbook].approval == "manual":
        return [
            Hold(
                service,
                incident_id,
                f"{playbook} needs manual approval: run `continuity playbook run {playbook}` to start it",
            )
        ]
    return [
        StartPlaybook(
            service, playbook, incident_id, f"{service} is down and {playbook} is automatic: starting it"
        )
    ]
