"""The decision: observed state in, a list of decisions out, each with the sentence that explains it.

Like Patroni's `run_cycle`, every branch of what the controller will do is visible in one place,
and given the same observation it decides the same thing every time. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """False while any reference target fails (or has not reported): automatic actions are held."""
    references_note: str = ""
    isolated: bool = False
    """True while `isolation_quorum` reference targets are DOWN (the controller is the one cut off;
    its own alert pages) or failing and not yet confirmed: no incident opens and nothing runs."""


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
        if wanted is not None and obs.isolated:
            # Enough reference targets are down that the controller itself is cut off: its own
            # "controller isolated" alert is the page; opening an incident per service would page
            # for an outage that is ours.
            out.append(
                Hold(
                    name,
                    iid,
                    f"{name} looks {health.state}, but the controller is isolated (reference targets "
                    f"{obs.references_note}): no incident and no action until its view is trusted again",
                    key="isolated",
                )
            )
            continue
        parent = _failing_dependency(obs, svc.depends_on)
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
        elif (
            health.state in (ServiceState.UP, ServiceState.UNKNOWN)
            and incident is not None
            and name not in obs.running
        ):
            if health.state is ServiceState.UNKNOWN or health.unproven:
                # Unknown is not up: after a restart, or while a probe's results are stale or it
                # has not yet passed success_threshold times, the outage is not known to be over.
                why = "; ".join(f"{p}: {w}" for p, w in health.unproven) or "no fresh result"
                out.append(
                    Hold(
                        name,
                        iid,
                        f"{name} is not proven up ({why}): the incident stays open",
                        key="unproven",
                    )
                )
            elif health.unsettled:
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
            else:
                out.append(ResolveIncident(incident.id, name, f"{name} is up again: all probes pass"))
        if svc.failback is not None and incident is None and name not in obs.running:
            out.extend(_held_by_references(obs, name, _failback(obs, name, svc.failback)))
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
                out.extend(
                    _held_by_references(
                        obs, name, _failover(obs, config, name, svc.playbook, incident, wanted)
                    )
                )
    return out


def _held_by_references(obs: Observation, service: str, decisions: list[Decision]) -> list[Decision]:
    """While a reference target fails, every playbook start becomes a hold: the controller's view
    may be the broken one. Incidents still open and page; only automatic actions wait."""
    if obs.references_ok:
        return decisions
    out: list[Decision] = []
    for dec in decisions:
        if isinstance(dec, StartPlaybook):
            out.append(
                Hold(
                    service,
                    dec.incident_id,
                    f"not running {dec.playbook}: reference targets are failing "
                    f"({obs.references_note}); automatic actions are held until they pass again",
                    key="references",
                )
            )
        else:
            out.append(dec)
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
