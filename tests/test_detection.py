"""Detection, classification and the decision: pure functions, so plain unit tests."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from controller.classify import severity
from controller.config import Classification, Config, Failback, TierRule
from controller.decide import (
    ChangeSeverity,
    FailoverView,
    Hold,
    Observation,
    OpenIncident,
    OpenIncidentView,
    ResolveIncident,
    StartPlaybook,
    approval_state,
    decide,
)
from controller.detect import Health, ProbeState, ServiceHealth, ServiceState, observe, service_health
from probes.base import ProbeResult, StepResult


def result(ok: bool, at: float, reason: str = "expected status 200, found 503") -> ProbeResult:
    steps = () if ok else (StepResult("p", False, 0.01, error=reason),)
    return ProbeResult("p", ok, at, 0.01, steps)


def feed(outcomes: list[bool], state: ProbeState | None = None, start: float = 0.0) -> ProbeState:
    state = state or ProbeState()
    for i, ok in enumerate(outcomes):
        state = observe(state, result(ok, start + 10 * i), failure_threshold=3, success_threshold=2)
    return state


# ----------------------------------------------------------------- observe


def test_unknown_becomes_up_on_first_success() -> None:
    state = observe(ProbeState(), result(True, 5.0), 3, 2)
    assert state.status is Health.UP
    assert state.changed_at == 5.0


def test_unknown_needs_the_full_failure_streak() -> None:
    assert feed([False, False]).status is Health.UNKNOWN
    assert feed([False, False, False]).status is Health.DOWN


def test_two_failures_are_not_down_the_third_is() -> None:
    state = feed([True, False, False])
    assert state.status is Health.UP
    assert state.failures == 2
    state = observe(state, result(False, 30.0), 3, 2)
    assert state.status is Health.DOWN
    assert state.changed_at == 30.0


def test_a_success_in_between_resets_the_streak() -> None:
    state = feed([True, False, False, True, False, False])
    assert state.status is Health.UP
    assert state.failures == 2
    assert state.first_failure_at == 40.0  # the new streak, not the old one


def test_recovery_needs_success_threshold() -> None:
    down = feed([True, False, False, False])
    assert down.status is Health.DOWN
    one = observe(down, result(True, 100.0), 3, 2)
    assert one.status is Health.DOWN
    two = observe(one, result(True, 110.0), 3, 2)
    assert two.status is Health.UP
    assert two.changed_at == 110.0
    assert two.first_failure_at is None


def test_a_failure_during_recovery_restarts_the_success_count() -> None:
    state = feed([False, False, False, True, False, True])
    assert state.status is Health.DOWN


def test_first_failure_at_is_the_start_of_the_streak() -> None:
    state = feed([True, False, False, False, False], start=1000.0)
    assert state.status is Health.DOWN
    assert state.first_failure_at == 1010.0
    assert state.changed_at == 1030.0
    # A recovering probe keeps its outage start.
    state = observe(state, result(True, 2000.0), 3, 2)
    assert state.first_failure_at == 1010.0


# ----------------------------------------------------------- service_health


def states(**status: Health) -> dict[str, ProbeState]:
    out = {}
    for name, health in status.items():
        last = result(health is not Health.DOWN, 50.0, reason=f"{name} broke")
        first = 10.0 if name == "a" else 20.0
        out[name] = ProbeState(health, last=last, first_failure_at=first if health is Health.DOWN else None)
    return out


def test_service_down_when_a_down_impact_probe_is_down() -> None:
    h = service_health("shop", ["a", "b"], states(a=Health.DOWN, b=Health.DOWN), {"b": "degraded"})
    assert h.state is ServiceState.DOWN
    assert h.failing == ("a", "b")
    assert h.since == 10.0
    assert h.summary() == "shop is down: a: request: a broke; b: request: b broke"


def test_service_degraded_when_only_degraded_probes_fail() -> None:
    h = service_health("shop", ["a", "b"], states(a=Health.UP, b=Health.DOWN), {"b": "degraded"})
    assert h.state is ServiceState.DEGRADED
    assert h.failing == ("b",)
    assert h.since == 20.0


def test_service_unknown_until_every_probe_has_an_opinion() -> None:
    """Unknown is not up: one passing probe and one never heard from is not a healthy service."""
    assert service_health("shop", ["a", "b"], {}, {}).state is ServiceState.UNKNOWN
    h = service_health("shop", ["a", "b"], states(a=Health.UP), {})
    assert h.state is ServiceState.UNKNOWN
    assert ("b", "no result yet") in h.unproven
    h = service_health("shop", ["a", "b"], states(a=Health.UP, b=Health.UP), {})
    assert h.state is ServiceState.UP


# ----------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("tier", "state", "expected"),
    [
        ("critical", ServiceState.DOWN, "critical"),
        ("critical", ServiceState.DEGRADED, "moderate"),
        ("important", ServiceState.DOWN, "moderate"),
        ("important", ServiceState.DEGRADED, "moderate"),
        ("supporting", ServiceState.DOWN, "low"),
        ("critical", ServiceState.UP, None),
        ("critical", ServiceState.UNKNOWN, None),
    ],
)
def test_default_severity_rules(tier: str, state: ServiceState, expected: str | None) -> None:
    assert severity(tier, ServiceHealth("s", state), Classification()) == expected


def test_custom_severity_rules() -> None:
    rules = Classification(important=TierRule(down="critical", degraded="low"))
    assert severity("important", ServiceHealth("s", ServiceState.DOWN), rules) == "critical"
    assert severity("important", ServiceHealth("s", ServiceState.DEGRADED), rules) == "low"
    assert severity("critical", ServiceHealth("s", ServiceState.DOWN), rules) == "critical"


# ------------------------------------------------------------------- decide


def config(approval: str = "auto") -> Config:
    return Config.model_validate(
        {
            "services": {
                "checkout": {"tier": "critical", "rto": "5m", "probes": ["p"], "playbook": "fo"},
                "catalog": {"tier": "important", "rto": "15m", "probes": ["q"]},
            },
            "probes": {
                "p": {"kind": "http", "url": "http://127.0.0.1:1/"},
                "q": {"kind": "http", "url": "http://127.0.0.1:1/"},
            },
            "playbooks": {
                "fo": {
                    "cooldown": "30m",
                    "approval": approval,
                    "steps": [{"name": "pause", "action": "wait", "with": {"duration": "1s"}}],
                }
            },
        }
    )


def health(state: ServiceState, service: str = "checkout") -> dict[str, ServiceHealth]:
    failing = ("p",) if state in (ServiceState.DOWN, ServiceState.DEGRADED) else ()
    return {service: ServiceHealth(service, state, failing, tuple((p, "boom") for p in failing), 100.0)}


def obs(state: ServiceState, **kw: Any) -> Observation:
    return Observation(now=10_000.0, health=health(state), **kw)


def test_opens_one_incident_and_starts_the_playbook() -> None:
    out = decide(obs(ServiceState.DOWN), config())
    assert [type(d) for d in out] == [OpenIncident, StartPlaybook]
    opened, start = out
    assert (opened.service, opened.severity) == ("checkout", "critical")
    assert opened.reason == "checkout is down: p: boom"
    assert (start.service, start.playbook) == ("checkout", "fo")


def test_no_duplicate_incident_when_one_is_open() -> None:
    out = decide(obs(ServiceState.DOWN, incidents={"checkout": OpenIncidentView("i1", "critical")}), config())
    assert not any(isinstance(d, OpenIncident) for d in out)
    assert out == [StartPlaybook("checkout", "fo", "i1", "checkout is down and fo is automatic: starting it")]


def test_changes_severity() -> None:
    out = decide(
        obs(ServiceState.DOWN, incidents={"checkout": OpenIncidentView("i1", "moderate", runs=1)}), config()
    )
    assert len(out) == 1
    change = out[0]
    assert isinstance(change, ChangeSeverity)
    assert (change.incident_id, change.old, change.new) == ("i1", "moderate", "critical")


def test_resolves_when_up_and_nothing_running() -> None:
    out = decide(obs(ServiceState.UP, incidents={"checkout": OpenIncidentView("i1", "critical")}), config())
    assert out == [ResolveIncident("i1", "checkout", "checkout is up again: all probes pass")]


def test_does_not_resolve_while_a_playbook_runs() -> None:
    out = decide(
        obs(
            ServiceState.UP,
            incidents={"checkout": OpenIncidentView("i1", "critical", runs=1)},
            running=frozenset({"checkout"}),
        ),
        config(),
    )
    assert out == []


def test_nothing_to_do_when_up_without_incident_or_unknown() -> None:
    assert decide(obs(ServiceState.UP), config()) == []
    assert decide(obs(ServiceState.UNKNOWN), config()) == []


def test_starts_the_playbook_once_per_incident() -> None:
    view = OpenIncidentView("i1", "critical", runs=1)
    assert decide(obs(ServiceState.DOWN, incidents={"checkout": view}), config()) == []
    running = obs(
        ServiceState.DOWN,
        incidents={"checkout": OpenIncidentView("i1", "critical")},
        running=frozenset({"checkout"}),
    )
    assert decide(running, config()) == []


def test_respects_cooldown() -> None:
    out = decide(
        obs(
            ServiceState.DOWN,
            incidents={"checkout": OpenIncidentView("i2", "critical")},
            last_run_started={"checkout": 10_000.0 - 600},
        ),
        config(),
    )
    assert len(out) == 1
    hold = out[0]
    assert isinstance(hold, Hold)
    assert hold.incident_id == "i2"
    assert "cooldown" in hold.reason
    assert hold.reason == "not running fo: it ran 10m00s ago, inside its 30m00s cooldown (20m00s left)"
    # Once the cooldown has passed, it starts again.
    later = decide(
        obs(
            ServiceState.DOWN,
            incidents={"checkout": OpenIncidentView("i2", "critical")},
            last_run_started={"checkout": 10_000.0 - 1801},
        ),
        config(),
    )
    assert [type(d) for d in later] == [StartPlaybook]


def test_manual_approval_asks_a_human() -> None:
    out = decide(
        obs(ServiceState.DOWN, incidents={"checkout": OpenIncidentView("i1", "critical")}), config("manual")
    )
    assert len(out) == 1
    assert isinstance(out[0], StartPlaybook)
    assert out[0].approval is True
    assert "needs approval" in out[0].reason


def test_auto_approve_for_some_severities() -> None:
    cfg = config("manual")
    cfg.playbooks["fo"].auto_approve = ["critical"]
    crit = decide(obs(ServiceState.DOWN, incidents={"checkout": OpenIncidentView("i1", "critical")}), cfg)
    assert isinstance(crit[0], StartPlaybook) and crit[0].approval is False
    mod = decide(obs(ServiceState.DOWN, incidents={"checkout": OpenIncidentView("i1", "moderate")}), cfg)
    assert isinstance(mod[-1], StartPlaybook) and mod[-1].approval is True


def test_pause_freeze_and_hourly_cap_hold() -> None:
    inc = {"checkout": OpenIncidentView("i1", "critical")}
    base = obs(ServiceState.DOWN, incidents=inc)
    paused = decide(dataclasses.replace(base, paused="maintenance by alice"), config())
    assert isinstance(paused[0], Hold) and "paused (maintenance by alice)" in paused[0].reason
    frozen = decide(dataclasses.replace(base, frozen={"checkout": "RUN-1"}), config())
    assert isinstance(frozen[0], Hold) and "continuity ack checkout" in frozen[0].reason
    capped = decide(dataclasses.replace(base, runs_last_hour=3), config())
    assert isinstance(capped[0], Hold) and "cap 3" in capped[0].reason
    free = decide(dataclasses.replace(base, runs_last_hour=2), config())
    assert isinstance(free[0], StartPlaybook)


def test_approval_state_machine() -> None:
    pb = config("manual").playbooks["fo"]  # escalate after 10m, expire after 30m
    assert approval_state(5, None, False, pb) == "wait"
    assert approval_state(601, None, False, pb) == "escalate"
    assert approval_state(601, None, True, pb) == "wait"
    assert approval_state(1801, None, True, pb) == "expire"
    assert approval_state(1801, "approved by alice", True, pb) == "approve"
    assert approval_state(5, "rejected by bob", False, pb) == "reject"


def test_degraded_service_never_starts_a_playbook() -> None:
    out = decide(obs(ServiceState.DEGRADED), config())
    assert [type(d) for d in out] == [OpenIncident]
    assert out[0].severity == "moderate"
    out = decide(
        obs(ServiceState.DEGRADED, incidents={"checkout": OpenIncidentView("i1", "moderate")}), config()
    )
    assert out == []


def test_service_without_playbook_only_opens_an_incident() -> None:
    o = Observation(now=1.0, health=health(ServiceState.DOWN, "catalog"))
    out = decide(o, config())
    assert [type(d) for d in out] == [OpenIncident]
    assert out[0].severity == "moderate"


def test_severity_floor_keeps_an_escalated_incident_critical() -> None:
    floored = OpenIncidentView("i1", "critical", floor="critical", runs=1)
    assert decide(obs(ServiceState.DEGRADED, incidents={"checkout": floored}), config()) == []
    # Without the floor the same observation lowers it.
    plain = OpenIncidentView("i1", "critical", runs=1)
    out = decide(obs(ServiceState.DEGRADED, incidents={"checkout": plain}), config())
    assert [(type(d), d.new) for d in out] == [(ChangeSeverity, "moderate")]


def test_dependent_waits_while_its_dependency_is_only_suspect() -> None:
    """checkout confirmed DOWN while payments is still SUSPECT: no second incident, no second page."""
    cfg = Config.model_validate(
        {
            "services": {
                "checkout": {"tier": "critical", "rto": "5m", "probes": ["c"], "depends_on": ["payments"]},
                "payments": {"tier": "critical", "rto": "5m", "probes": ["p"]},
            },
            "probes": {
                "c": {"kind": "http", "url": "http://127.0.0.1:1/"},
                "p": {"kind": "http", "url": "http://127.0.0.1:1/"},
            },
        }
    )
    checkout = ServiceHealth("checkout", ServiceState.DOWN, ("c",), (("c", "503"),), 100.0)
    forming = ServiceHealth("payments", ServiceState.UP, unsettled=("p",))
    out = decide(Observation(now=200.0, health={"checkout": checkout, "payments": forming}), cfg)
    assert not any(isinstance(d, OpenIncident) for d in out), out
    settled = ServiceHealth("payments", ServiceState.UP)
    out = decide(Observation(now=200.0, health={"checkout": checkout, "payments": settled}), cfg)
    assert [d.service for d in out if isinstance(d, OpenIncident)] == ["checkout"]


def test_failback_waits_for_the_primary_to_be_healthy_long_enough() -> None:
    cfg = config()
    cfg.playbooks["back"] = cfg.playbooks["fo"]
    cfg.services["checkout"].failback = Failback(playbook="back", healthy_probes=["p"], healthy_for="10m")
    up = obs(ServiceState.UP)
    # Failed over: the persisted failover state says so (nothing re-derives it from run history).
    moved = {"checkout": FailoverView("failed_over", "r1", "i1", up.now - 700, "", 2)}
    early = dataclasses.replace(up, failover=moved, up_since={"p": up.now - 100})
    assert not [d for d in decide(early, cfg) if isinstance(d, StartPlaybook)]
    late = dataclasses.replace(early, up_since={"p": up.now - 601})
    [start] = [d for d in decide(late, cfg) if isinstance(d, StartPlaybook)]
    assert (start.playbook, start.incident_id, start.approval) == ("back", "i1", True)  # manual by default
    assert (start.frm, start.version) == ("failed_over", 2)
    done = dataclasses.replace(late, failover={})  # back on the primary: nothing to fail back
    assert not [d for d in decide(done, cfg) if isinstance(d, StartPlaybook)]


def test_an_open_incident_does_not_resolve_while_a_probe_is_only_suspect() -> None:
    """After a restart the first failures make a probe SUSPECT (which counts as up for opening):
    that must never close the incident and page a new one once the burst confirms it DOWN again."""
    suspect = ServiceHealth("checkout", ServiceState.UP, unsettled=("p",))
    view = Observation(
        now=10_000.0, health={"checkout": suspect}, incidents={"checkout": OpenIncidentView("i1", "critical")}
    )
    out = decide(view, config())
    assert not any(isinstance(d, ResolveIncident) for d in out)
    assert any(isinstance(d, Hold) and "unconfirmed" in d.reason for d in out)


def test_failures_seen_while_cut_off_are_forgotten_and_older_outages_stand() -> None:
    """detect.discount: a streak that began inside the cut-off window leaves the probe UNKNOWN (not
    DOWN, not UP) and its failed runs leave the intermittent rate; a streak that began before the
    window is a real outage seen before the cut, and stays DOWN."""
    from controller.detect import Rules, discount

    rules = Rules(failure_threshold=3, success_threshold=2, intermittent_window=600.0)
    state = ProbeState()
    for t in (0.0, 10.0, 20.0):
        state = observe(state, result(True, t), rules=rules)
    cut = state
    for t in (30.0, 40.0, 50.0, 60.0):
        cut = observe(cut, result(False, t), rules=rules)
    assert cut.status is Health.DOWN
    forgotten = discount(cut, 25.0, 70.0)
    assert forgotten.status is Health.UNKNOWN
    assert forgotten.failures == 0 and forgotten.first_failure_at is None
    assert [failed for _, failed in forgotten.runs] == [False, False, False]
    # an outage that began before the window: seen while the controller could still see
    assert discount(cut, 45.0, 70.0).status is Health.DOWN
    # a probe with no failure inside the window is left as it was
    assert discount(state, 25.0, 70.0) is state
