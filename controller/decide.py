"""The decision: observed state in, a list of decisions out, each with the sentence that explains it.

Like Patroni's `run_cycle`, every branch of what the controller will do is visible in one place,
and given the same observation it decides the same thing every time. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller import grouping
from controller.classify import higher, severity
from controller.config import Config, Failback, Playbook
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
    approval: bool = False
    """True: create the run, show its plan and wait for a human to approve it."""


@dataclass(frozen=True)
class Hold:
    """A decision not to act, recorded so the timeline explains the silence."""

    service: str
    incident_id: str | None
    reason: str
    key: str = field(default="", compare=False)
    """What stays the same while the same hold lasts (the reason may carry a countdown); the
    controller records a hold on the timeline once per key, not on every tick."""


@dataclass(frozen=True)
class JoinIncident:
    """A dependent service's failure recorded on its dependency's incident: one outage pages once."""

    incident_id: str
    service: str
    reason: str


Decision = OpenIncident | ChangeSeverity | ResolveIncident | StartPlaybook | Hold | JoinIncident


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
    runs_last_hour: int = 0
    """Automatic runs started in the last hour, all services together."""
    paused: str | None = None
    """Why a human paused all automatic actions, or None."""
    frozen: dict[str, str] = field(default_factory=dict)
    """Service -> the failed run that froze its playbook until a human acknowledges it."""
    silenced: dict[str, str] = field(default_factory=dict)
    """Service -> why it is silenced (an ad-hoc silence or a maintenance window)."""
    failed_over: dict[str, str] = field(default_factory=dict)
    """Service -> the incident whose failover succeeded and has not been failed back yet."""
    up_since: dict[str, float] = field(default_factory=dict)
    """Probe -> since when it has been UP (absent when it is not UP)."""
    references_ok: bool = True
    """False while any reference target fails: the controller may be the one cut off."""
    references_note: str = ""


def decide(obs: Observation, config: Config) -> list[Decision]:
    out: list[Decision] = []
    for name, svc in config.services.items():
        health = obs.health.get(name)
        if health is None:
            continue
        incident = obs.incidents.get(name)
        iid = incident.id if incident else None
        wanted = severity(svc.tier, health, config.classification)
        if name in obs.silenced:
            if wanted is not None:
                out.append(
                    Hold(
                        name,
                        iid,
                        f"{name} is {health.state} but silenced ({obs.silenced[name]}): "
                        "no incident, no action",
                        key=f"silence:{obs.silenced[name]}",
                    )
                )
            continue
        if wanted is not None and not obs.references_ok:
            # If the reference targets fail too, the controller may be the one cut off: wait.
            out.append(
                Hold(
                    name,
                    iid,
                    f"{name} looks {health.state}, but the reference targets are failing "
                    f"too ({obs.references_note}): not acting until the controller's own view is "
                    "trusted again",
                    key="references",
                )
            )
            continue
        parent = _failing_dependency(obs, svc.depends_on)
        region = grouping.lead(obs, config, name) if parent is None and wanted is not None else None
        if wanted is not None and region is not None:  # one regional outage: one incident, one page
            if region.incident_id is not None:
                out.append(JoinIncident(region.incident_id, name, f"{health.summary()}; {region.reason}"))
                if health.state is ServiceState.DOWN and svc.playbook and not health.flapping:
                    view = obs.incidents[region.leader]
                    out.extend(_failover(obs, config, name, svc.playbook, view, wanted))
            continue
        if wanted is not None and parent is not None and incident is None:
            dep, dep_incident = parent
            if dep_incident is not None:
                out.append(
                    JoinIncident(
                        dep_incident,
                        name,
                        f"{health.summary()}; it depends on {dep}, which is "
                        f"down: part of {dep}'s incident, not a new one",
                    )
                )
            continue  # the dependency's incident (or the one it is about to open) covers this
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
            if health.unsettled:
                # SUSPECT counts as up for opening, never for closing: after a restart the first
                # failures make a probe SUSPECT before the burst confirms it still DOWN.
                out.append(
                    Hold(
                        name,
                        iid,
                        f"{name} looks up but {', '.join(health.unsettled)} is still "
                        "failing or unconfirmed: the incident stays open",
                        key="unsettled",
                    )
                )
            elif health.flapping:
                out.append(
                    Hold(
                        name,
                        iid,
                        f"{name} passes now but {', '.join(health.flapping)} is flapping: "
                        "the incident stays open until it is stable",
                        key="flapping-open",
                    )
                )
            elif members := grouping.members_failing(obs, config, name):
                out.append(
                    Hold(
                        name,
                        iid,
                        f"{name} is up but {', '.join(members)} in the same outage still fails: "
                        "the incident stays open",
                        key=f"members:{','.join(members)}",
                    )
                )
            else:
                out.append(ResolveIncident(incident.id, name, f"{name} is up again: all probes pass"))
        if svc.failback is not None and incident is None and name not in obs.running:
            out.extend(_failback(obs, name, svc.failback))
        if health.state is ServiceState.DOWN and svc.playbook:
            if health.flapping:
                out.append(
                    Hold(
                        name,
                        iid,
                        f"not running {svc.playbook}: {', '.join(health.flapping)} is "
                        "flapping; waiting until it is stable",
                        key="flapping",
                    )
                )
            else:
                out.extend(_failover(obs, config, name, svc.playbook, incident, wanted))
    return out


def _failback(obs: Observation, service: str, fb: Failback) -> list[Decision]:
    """After a successful failover, once the primary has been healthy for `healthy_for`, move back."""
    incident_id = obs.failed_over.get(service)
    if incident_id is None or obs.paused is not None or service in obs.frozen:
        return []
    since = [obs.up_since.get(p) for p in fb.healthy_probes]
    if any(s is None for s in since):
        return []
    healthy = obs.now - max(s for s in since if s is not None)
    if healthy < fb.healthy_for:
        return []
    return [
        StartPlaybook(
            service,
            fb.playbook,
            incident_id,
            f"{', '.join(fb.healthy_probes)} healthy for {format_duration(healthy)} "
            f"(>= {format_duration(fb.healthy_for)}): failing {service} back with {fb.playbook}",
            approval=fb.approval == "manual",
        )
    ]


def _failing_dependency(obs: Observation, depends_on: list[str]) -> tuple[str, str | None] | None:
    """A dependency that is down, has an incident, or is unsettled (suspect or failing, not yet
    confirmed): in each case the dependent waits, so one outage opens one incident and pages once,
    whichever of the two probes happens to cross its threshold first."""
    for dep in depends_on:
        h = obs.health.get(dep)
        dep_incident = obs.incidents.get(dep)
        forming = h is not None and (h.state is ServiceState.DOWN or bool(h.unsettled))
        if forming or dep_incident is not None:
            return dep, dep_incident.id if dep_incident else None
    return None


def _failover(
    obs: Observation,
    config: Config,
    service: str,
    playbook: str,
    incident: OpenIncidentView | None,
    wanted: str | None,
) -> list[Decision]:
    incident_id = incident.id if incident else None
    if service in obs.running:
        return []
    if incident is not None and incident.runs > 0:
        return []  # one automatic run per incident; a failed run waits for a human
    if obs.paused is not None:
        return [
            Hold(
                service,
                incident_id,
                f"not running {playbook}: automatic actions are paused "
                f"({obs.paused}); `continuity resume` lifts the pause",
                key=f"paused:{obs.paused}",
            )
        ]
    if service in obs.frozen:
        return [
            Hold(
                service,
                incident_id,
                f"not running {playbook}: frozen since run {obs.frozen[service]} "
                f"failed; `continuity ack {service}` after a human has looked",
                key=f"frozen:{obs.frozen[service]}",
            )
        ]
    pb = config.playbooks[playbook]
    last = obs.last_run_started.get(service)
    if last is not None and obs.now - last < pb.cooldown:
        left = format_duration(pb.cooldown - (obs.now - last))
        return [
            Hold(
                service,
                incident_id,
                f"not running {playbook}: it ran {format_duration(obs.now - last)} ago, "
                f"inside its {format_duration(pb.cooldown)} cooldown ({left} left)",
                key=f"cooldown:{playbook}:{last}",
            )
        ]
    cap = config.controller.max_runs_per_hour
    if obs.runs_last_hour >= cap:
        return [
            Hold(
                service,
                incident_id,
                f"not running {playbook}: {obs.runs_last_hour} automatic runs in the "
                f"last hour already (cap {cap}); something larger is wrong, a human must decide",
                key=f"cap:{cap}",
            )
        ]
    if pb.needs_approval(incident.severity if incident is not None else wanted):
        return [
            StartPlaybook(
                service,
                playbook,
                incident_id,
                f"{service} is down: {playbook} needs approval; asking a human",
                approval=True,
            )
        ]
    return [
        StartPlaybook(
            service, playbook, incident_id, f"{service} is down and {playbook} is automatic: starting it"
        )
    ]


def approval_state(waited: float, answer: str | None, escalated: bool, pb: Playbook) -> str:
    """What to do with a run awaiting approval: approve, reject, expire, escalate or wait."""
    if answer is not None:
        return "approve" if answer.startswith("approved") else "reject"
    if waited >= pb.approval_timeout:
        return "expire"
    if waited >= pb.escalate_after and not escalated:
        return "escalate"
    return "wait"
