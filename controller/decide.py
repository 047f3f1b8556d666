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
    """Create a run and move the service's failover state to the run's state in one
    compare-and-swap (`version` is the state's version this decision read)."""

    service: str
    playbook: str
    incident_id: str | None
    reason: str
    approval: bool = False
    """True: create the run, show its plan and wait for a human to approve it."""
    frm: str = "primary"
    to: str = "failing_over"
    version: int = 0
    checks: tuple[str, ...] = field(default=(), compare=False)
    """Every check that passed on the way to this decision, for the timeline (explanation, not
    identity: two decisions to do the same thing are equal whatever was checked on the way)."""


@dataclass(frozen=True)
class Freeze:
    """A failed run freezes the playbook for the service, raises the incident to critical and pages."""

    playbook: str
    error: str
    blocked: bool


@dataclass(frozen=True)
class Transition:
    """Move a service's persisted failover state (compare-and-swap on `version`). Its effects run
    in this order: `freeze`, `close_run`, the transition itself, then `launch` of the owning run."""

    service: str
    frm: str
    to: str
    version: int
    run_id: str | None
    incident_id: str | None
    reason: str
    checks: tuple[str, ...] = ()
    freeze: Freeze | None = None
    close_run: str | None = None
    """End the owning run in this state first (rejected, expired, abandoned)."""
    launch: bool = False
    """Then run the owning run (an approved one)."""


@dataclass(frozen=True)
class ResumeRun:
    """Continue a run no live task of this process executes: a restart, or a new leader taking over
    from one that lost its lease. Steps already done are skipped; the step in hand is checked."""

    service: str
    run_id: str
    playbook: str
    incident_id: str | None
    owner: str | None
    """The owner it had when decided: the take-over is a compare-and-swap from this owner."""
    reason: str


@dataclass(frozen=True)
class AbandonRun:
    """A run that no failover state owns and that cannot be adopted: ended, never executed again."""

    service: str
    run_id: str
    incident_id: str | None
    reason: str


@dataclass(frozen=True)
class Escalate:
    """An approval still unanswered after `escalate_after`: page again."""

    service: str
    run_id: str
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


@dataclass(frozen=True)
class JoinIncident:
    """A dependent service's failure recorded on its dependency's incident: one outage pages once."""

    incident_id: str
    service: str
    reason: str


Decision = (
    OpenIncident
    | ChangeSeverity
    | ResolveIncident
    | StartPlaybook
    | Hold
    | JoinIncident
    | Transition
    | ResumeRun
    | AbandonRun
    | Escalate
)

FAILOVER_RUN_STATES = {"failing_over", "failing_back", "awaiting_approval", "awaiting_failback_approval"}
LIVE_RUN_STATES = ("running", "awaiting_approval")


@dataclass(frozen=True)
class FailoverView:
    """A service's persisted failover state as decide reads it (see `controller.stores.FailoverRecord`)."""

    state: str = "primary"
    run_id: str | None = None
    incident_id: str | None = None
    since: float = 0.0
    reason: str = ""
    version: int = 0


@dataclass(frozen=True)
class RunView:
    id: str
    service: str | None
    playbook: str
    state: str
    incident_id: str | None
    started_at: float
    error: str | None = None
    dry_run: bool = False
    owner: str | None = None
    live: bool = False
    """A task of this process is executing it right now."""
    answer: str | None = None
    """A human's answer to its approval request, if any."""
    escalated: bool = False


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
    failover: dict[str, FailoverView] = field(default_factory=dict)
    """Service -> its persisted failover state (absent: primary, never written)."""
    runs: dict[str, RunView] = field(default_factory=dict)
    """Runs by id: those a failover state names, and every run still running or awaiting approval."""
    identity: str = ""
    """This controller process, as run owners name it."""
    isolated: bool = False
    """True while `isolation_quorum` reference targets are DOWN (the controller is the one cut off;
    its own alert pages) or failing and not yet confirmed: no incident opens and nothing runs."""
    resolve_requests: dict[str, str] = field(default_factory=dict)
    """Open incident id -> who asked to resolve it by hand (`continuity incident resolve`, the API,
    the console, PagerDuty): a human's word, carried out as a `ResolveIncident` like any other."""


def decide(obs: Observation, config: Config) -> list[Decision]:
    out: list[Decision] = []
    unowned = _unowned_runs(obs, config)
    out.extend(x for x in unowned if isinstance(x, ResumeRun))  # runs started by hand
    for name, svc in config.services.items():
        fo = obs.failover.get(name) or FailoverView()
        # A run that ended, an approval answered, a human's ack: these move the state whatever the
        # health says, silenced or not. While one is pending nothing new starts for the service.
        # Then a run no state owns (adopted or abandoned). One action per service per cycle.
        moving = (
            _lifecycle(obs, config, name, fo)
            or [x for x in unowned if not isinstance(x, ResumeRun) and x.service == name][:1]
        )
        out.extend(moving)
        asked = obs.incidents.get(name)
        if asked is not None and (by := obs.resolve_requests.get(asked.id)) is not None:
            # A human resolved it: whatever the probes say (if it is still down, the next cycle opens
            # a new incident). Nothing else about the incident this cycle.
            out.append(ResolveIncident(asked.id, name, f"resolved by {by}"))
            continue
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
        region = grouping.lead(obs, config, name) if parent is None and wanted is not None else None
        if wanted is not None and region is not None:  # one regional outage: one incident, one page
            if region.incident_id is not None:
                out.append(JoinIncident(region.incident_id, name, f"{health.summary()}; {region.reason}"))
                # Each member still fails over by itself, through its own failover state: never
                # while a run owns it, never again once failed over.
                if (
                    health.state is ServiceState.DOWN
                    and svc.playbook
                    and not health.flapping
                    and not moving
                    and fo.state == "primary"
                ):
                    view = obs.incidents[region.leader]
                    failover = _failover(obs, config, name, svc.playbook, view, wanted, health, fo)
                    out.extend(_held_by_references(obs, name, failover))
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
        if moving or fo.state not in ("primary", "failed_over"):
            continue  # one action per service: a run owns the state, or it is moving this cycle
        if fo.state == "failed_over":
            # Failover and failback of one service never overlap: from failed_over only a failback
            # can start, and only while the primary is healthy.
            if health.state is ServiceState.DOWN and svc.playbook:
                out.append(
                    Hold(
                        name,
                        iid or fo.incident_id,
                        f"{name} is {health.state} but already failed over (run {fo.run_id}): "
                        f"{svc.playbook} is not run again; a human must decide",
                        key=f"failed-over-down:{fo.run_id}",
                    )
                )
            elif svc.failback is not None and incident is None and name not in obs.running:
                out.extend(_held_by_references(obs, name, _failback(obs, name, svc.failback, fo)))
            continue
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
                        obs, name, _failover(obs, config, name, svc.playbook, incident, wanted, health, fo)
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


def _unowned_runs(obs: Observation, config: Config) -> list[Decision]:
    """Runs still running or awaiting approval that no failover state owns. A service's run is
    adopted by its state when it is what that state would start (the controller stopped between
    creating the run and moving the state), else abandoned; a run started by hand is resumed."""
    owned = {fo.run_id for fo in obs.failover.values() if fo.run_id}
    out: list[Decision] = []
    for run in obs.runs.values():
        if run.state not in LIVE_RUN_STATES or run.id in owned or run.live:
            continue
        svc = config.services.get(run.service or "")
        if svc is None:
            if run.state == "running" and run.playbook in config.playbooks:
                out.append(
                    ResumeRun(
                        run.service or "manual",
                        run.id,
                        run.playbook,
                        run.incident_id,
                        run.owner,
                        f"resuming run {run.id} of {run.playbook} after a controller restart",
                    )
                )
            continue
        name = run.service or ""
        fo = obs.failover.get(name) or FailoverView()
        waiting = run.state == "awaiting_approval"
        to = None
        if fo.state == "primary" and run.playbook == svc.playbook:
            to = "awaiting_approval" if waiting else "failing_over"
        elif fo.state == "failed_over" and svc.failback is not None and run.playbook == svc.failback.playbook:
            to = "awaiting_failback_approval" if waiting else "failing_back"
        if to is not None and not any(isinstance(o, Transition) and o.service == name for o in out):
            out.append(
                Transition(
                    name,
                    fo.state,
                    to,
                    fo.version,
                    run.id,
                    run.incident_id or fo.incident_id,
                    f"run {run.id} of {run.playbook} was created but its service's state never moved "
                    "(the controller stopped in between): adopting it",
                    ("the run belongs to no failover state", f"{name} is {fo.state}"),
                )
            )
        else:
            out.append(
                AbandonRun(
                    name,
                    run.id,
                    run.incident_id,
                    f"run {run.id} of {run.playbook} belongs to no failover state and {name} is "
                    f"{fo.state}: abandoned, never executed further",
                )
            )
    return out


def _lifecycle(obs: Observation, config: Config, name: str, fo: FailoverView) -> list[Decision]:
    """What moves a service's state besides a new start: the owning run ended, its approval was
    answered or timed out, a human acknowledged a failed run, or the run needs resuming."""
    st = fo.state
    if st in ("primary", "failed_over"):
        return []
    back = st in ("awaiting_failback_approval", "failing_back", "failback_failed")
    rest = "failed_over" if back else "primary"
    svc = config.services[name]

    def move(
        to: str,
        reason: str,
        *checks: str,
        freeze: Freeze | None = None,
        close_run: str | None = None,
        launch: bool = False,
    ) -> list[Decision]:
        return [
            Transition(
                name, st, to, fo.version, fo.run_id, fo.incident_id, reason, checks, freeze, close_run, launch
            )
        ]

    if st in ("failover_failed", "failback_failed"):
        if name in obs.frozen:
            open_now = obs.incidents.get(name)
            return [
                Hold(
                    name,
                    open_now.id if open_now else fo.incident_id,
                    f"not running {svc.playbook}: {name} is {st}, frozen since run {fo.run_id} failed; "
                    f"`continuity ack {name}` after a human has looked",
                    key=f"frozen:{fo.run_id}:{open_now.id if open_now else ''}",
                )
            ]
        return move(
            rest,
            f"a human acknowledged failed run {fo.run_id}: {name} counts as {rest} again and "
            "automatic runs are allowed",
            "the freeze was acknowledged",
        )
    run = obs.runs.get(fo.run_id or "")
    if run is None:
        return move(rest, f"run {fo.run_id} is not in the store any more: {name} is {rest} again")
    if st in ("awaiting_approval", "awaiting_failback_approval"):
        moving = "failing_back" if back else "failing_over"
        if run.state == "running":
            return move(moving, f"run {run.id} is already running: {name} is {moving}")
        if run.state != "awaiting_approval":
            return move(rest, f"run {run.id} ended {run.state} before it was approved: {name} is {rest}")
        pb = config.playbooks.get(run.playbook)
        if pb is None:
            return move(
                rest,
                f"playbook {run.playbook} is no longer configured: run {run.id} abandoned",
                close_run="abandoned",
            )
        verdict = approval_state(obs.now - run.started_at, run.answer, run.escalated, pb)
        if verdict == "approve":
            return move(
                moving,
                f"run {run.id} {run.answer}; starting it",
                "a human approved the run",
                "the run is still awaiting approval",
                launch=True,
            )
        if verdict == "reject":
            return move(rest, f"run {run.id} {run.answer}; nothing was changed", close_run="rejected")
        if verdict == "expire":
            return move(
                rest,
                f"run {run.id} expired: nobody answered within {format_duration(pb.approval_timeout)}; "
                "nothing was changed",
                close_run="expired",
            )
        if verdict == "escalate":
            return [
                Escalate(
                    name,
                    run.id,
                    run.playbook,
                    run.incident_id or fo.incident_id,
                    f"run {run.id} still unanswered after {format_duration(pb.escalate_after)}: paging again",
                )
            ]
        return []
    # failing_over / failing_back
    if run.state in LIVE_RUN_STATES:
        if run.live:
            return []  # in progress here
        why = (
            f"its owner {run.owner} is not running it any more (restart or lost lease)"
            if run.owner and run.owner != obs.identity
            else "no task of this controller is running it"
        )
        return [
            ResumeRun(
                name,
                run.id,
                run.playbook,
                run.incident_id or fo.incident_id,
                run.owner,
                f"resuming run {run.id} of {run.playbook}: {why}",
            )
        ]
    if run.state == "succeeded":
        if run.dry_run:
            return move(rest, f"run {run.id} was a dry run: nothing changed, {name} stays {rest}")
        if back:
            return move("primary", f"failback run {run.id} succeeded: {name} is on its primary again")
        if svc.failback is None:
            return move(
                "primary",
                f"run {run.id} of {run.playbook} succeeded; no failback is configured, so where it "
                "runs now is its primary",
            )
        return move(
            "failed_over",
            f"run {run.id} of {run.playbook} succeeded: {name} is failed over; "
            f"{svc.failback.playbook} moves it back once {', '.join(svc.failback.healthy_probes)} "
            f"{'has' if len(svc.failback.healthy_probes) == 1 else 'have'} been healthy for "
            f"{format_duration(svc.failback.healthy_for)}",
        )
    if run.state in ("failed", "blocked", "rolled_back"):
        failed = "failback_failed" if back else "failover_failed"
        what = "a guard stopped" if run.state == "blocked" else f"{run.state.replace('_', ' ')}:"
        return move(
            failed,
            f"run {run.id} of {run.playbook} {what} {run.error or ''}".rstrip()
            + f"; {run.playbook} is frozen for {name} until `continuity ack {name}`",
            freeze=None
            if run.dry_run
            else Freeze(run.playbook, run.error or run.state, run.state == "blocked"),
        )
    return move(rest, f"run {run.id} ended {run.state}: {name} is {rest}")


def _failback(obs: Observation, service: str, fb: Failback, fo: FailoverView) -> list[Decision]:
    """After a successful failover, once the primary has been healthy for `healthy_for`, move back."""
    incident_id = fo.incident_id
    if obs.paused is not None or service in obs.frozen:
        return []
    since = [obs.up_since.get(p) for p in fb.healthy_probes]
    if any(s is None for s in since):
        return []
    healthy = obs.now - max(s for s in since if s is not None)
    if healthy < fb.healthy_for:
        return []
    manual = fb.approval == "manual"
    return [
        StartPlaybook(
            service,
            fb.playbook,
            incident_id,
            f"{', '.join(fb.healthy_probes)} healthy for {format_duration(healthy)} "
            f"(>= {format_duration(fb.healthy_for)}): failing {service} back with {fb.playbook}",
            approval=manual,
            frm="failed_over",
            to="awaiting_failback_approval" if manual else "failing_back",
            version=fo.version,
            checks=(
                f"{service} is failed_over (run {fo.run_id})",
                "no incident open",
                "no run in progress",
                "automatic actions not paused",
                "not frozen",
                f"{', '.join(fb.healthy_probes)} UP for {format_duration(healthy)}",
                "approval: a human must approve" if manual else "approval: auto",
            ),
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
    health: ServiceHealth | None = None,
    fo: FailoverView | None = None,
) -> list[Decision]:
    fo = fo or FailoverView()
    incident_id = incident.id if incident else None
    if service in obs.running:
        return []
    if incident is not None and incident.runs > 0:
        return []  # one automatic run per incident; a failed run waits for a human
    checks: list[str] = [
        f"{service} is DOWN" + (f": {health.summary()}" if health is not None else ""),
        "no probe flapping",
        f"{service} is {fo.state}",
        "no run in progress",
        "first automatic run for this incident",
    ]
    if not obs.references_ok:
        # The controller's own view may be the broken one: the incident opens and pages, the
        # playbook waits (the sentence is `_held_by_references`', one place for it).
        return _held_by_references(obs, service, [StartPlaybook(service, playbook, incident_id, "")])
    checks.append("reference targets pass (or none are configured)")
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
    checks.append("automatic actions not paused")
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
    checks.append("not frozen")
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
    checks.append(
        f"cooldown {format_duration(pb.cooldown)}: "
        + (f"last run {format_duration(obs.now - last)} ago" if last is not None else "no earlier run")
    )
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
    checks.append(f"{obs.runs_last_hour} automatic runs in the last hour (cap {cap})")
    if pb.needs_approval(incident.severity if incident is not None else wanted):
        return [
            StartPlaybook(
                service,
                playbook,
                incident_id,
                f"{service} is down: {playbook} needs approval; asking a human",
                approval=True,
                frm=fo.state,
                to="awaiting_approval",
                version=fo.version,
                checks=(*checks, "approval: a human must approve"),
            )
        ]
    return [
        StartPlaybook(
            service,
            playbook,
            incident_id,
            f"{service} is down and {playbook} is automatic: starting it",
            frm=fo.state,
            to="failing_over",
            version=fo.version,
            checks=(*checks, "approval: auto"),
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
