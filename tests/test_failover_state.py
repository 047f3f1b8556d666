"""The failover state machine in `decide`: pure, one action per service, every run started, resumed,
approved and ended through it. Observations are built by hand; the controller-level behaviour is in
tests/test_controller.py and tests/test_playbook_safety.py."""

from __future__ import annotations

import itertools

import pytest

from controller import decide as d
from controller.config import Config, load_config
from controller.detect import ServiceHealth, ServiceState

DOWN = ServiceHealth("shop", ServiceState.DOWN, ("shop-public",), (("shop-public", "HTTP 503"),), 100.0)
UP = ServiceHealth("shop", ServiceState.UP)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(
        """
services:
  shop:
    tier: critical
    rto: 5m
    probes: [shop-public]
    playbook: to-secondary
    failback: {playbook: to-primary, healthy_probes: [shop-primary], healthy_for: 10m, approval: manual}
probes:
  shop-public: {kind: http, url: "http://127.0.0.1:9/"}
  shop-primary: {kind: http, url: "http://127.0.0.1:9/primary"}
playbooks:
  to-secondary: {cooldown: 0s, steps: [{name: s, action: wait, with: {duration: 10ms}}]}
  to-primary:
    approval: manual
    approval_timeout: 30m
    escalate_after: 10m
    steps: [{name: s, action: wait, with: {duration: 10ms}}]
""",
        encoding="utf-8",
    )
    return load_config(path)


def obs(health: ServiceHealth, fo: d.FailoverView, *runs: d.RunView, **kw: object) -> d.Observation:
    return d.Observation(
        now=10_000.0,
        health={"shop": health},
        failover={"shop": fo},
        runs={r.id: r for r in runs},
        identity="me",
        **kw,  # type: ignore[arg-type]
    )


def run(state: str, playbook: str = "to-secondary", **kw: object) -> d.RunView:
    return d.RunView("RUN-1", "shop", playbook, state, "INC-1", 9_800.0, **kw)  # type: ignore[arg-type]


def moves(decisions: list[d.Decision]) -> list[d.Decision]:
    """The decisions that act on the failover state (not the incident)."""
    kinds = (d.StartPlaybook, d.Transition, d.ResumeRun, d.AbandonRun, d.Escalate)
    return [x for x in decisions if isinstance(x, kinds)]


def test_failback_and_failover_never_start_in_one_cycle(cfg: Config) -> None:
    """Issue 10: failed over, the primary's own probe healthy for long, and the public probe DOWN
    again: before, both playbooks started 1 ms apart. Now: failed_over holds, nothing starts."""
    fo = d.FailoverView("failed_over", "RUN-1", "INC-1", 1.0, "", 2)
    out = d.decide(obs(DOWN, fo, up_since={"shop-primary": 1.0}), cfg)
    assert moves(out) == []
    [hold] = [x for x in out if isinstance(x, d.Hold) and x.key.startswith("failed-over-down")]
    assert "already failed over (run RUN-1)" in hold.reason


def test_failback_starts_only_from_failed_over_with_its_checks(cfg: Config) -> None:
    fo = d.FailoverView("failed_over", "RUN-1", "INC-1", 1.0, "", 2)
    [start] = moves(d.decide(obs(UP, fo, up_since={"shop-primary": 1.0}), cfg))
    assert isinstance(start, d.StartPlaybook) and start.playbook == "to-primary"
    assert (start.frm, start.to, start.version, start.approval) == (
        "failed_over",
        "awaiting_failback_approval",
        2,
        True,
    )
    assert "no incident open" in start.checks and any("UP for" in c for c in start.checks)
    assert moves(d.decide(obs(UP, fo, up_since={"shop-primary": 9_999.0}), cfg)) == [], "not long enough"
    primary = d.FailoverView()
    assert moves(d.decide(obs(UP, primary, up_since={"shop-primary": 1.0}), cfg)) == [], "never from primary"


def test_a_down_service_starts_its_failover_with_every_check_that_passed(cfg: Config) -> None:
    [start] = moves(d.decide(obs(DOWN, d.FailoverView()), cfg))
    assert isinstance(start, d.StartPlaybook)
    assert (start.frm, start.to, start.version) == ("primary", "failing_over", 0)
    for check in ("shop is DOWN", "not paused", "not frozen", "cooldown", "approval: auto"):
        assert any(check in c for c in start.checks), (check, start.checks)


def test_a_failed_run_is_decided_freeze_critical_page_and_a_failed_state(cfg: Config) -> None:
    fo = d.FailoverView("failing_over", "RUN-1", "INC-1", 1.0, "", 1)
    [t] = moves(d.decide(obs(DOWN, fo, run("failed", error="step s failed: boom")), cfg))
    assert isinstance(t, d.Transition) and (t.frm, t.to, t.version) == ("failing_over", "failover_failed", 1)
    assert t.freeze == d.Freeze("to-secondary", "step s failed: boom", blocked=False)
    assert "frozen for shop until `continuity ack shop`" in t.reason
    [b] = moves(d.decide(obs(DOWN, fo, run("blocked", error="guard failed")), cfg))
    assert isinstance(b, d.Transition) and b.freeze is not None and b.freeze.blocked


def test_a_succeeded_run_moves_to_failed_over_and_a_failback_to_primary(cfg: Config) -> None:
    fo = d.FailoverView("failing_over", "RUN-1", "INC-1", 1.0, "", 1)
    [t] = moves(d.decide(obs(UP, fo, run("succeeded")), cfg))
    assert isinstance(t, d.Transition) and t.to == "failed_over" and t.freeze is None
    back = d.FailoverView("failing_back", "RUN-1", "INC-1", 1.0, "", 4)
    [t] = moves(d.decide(obs(UP, back, run("succeeded", "to-primary")), cfg))
    assert isinstance(t, d.Transition) and t.to == "primary"
    [t] = moves(d.decide(obs(UP, fo, run("succeeded", dry_run=True)), cfg))
    assert isinstance(t, d.Transition) and t.to == "primary", "a dry run changed nothing"


def test_approvals_are_answered_through_decide(cfg: Config) -> None:
    fo = d.FailoverView("awaiting_failback_approval", "RUN-1", "INC-1", 1.0, "", 3)
    waiting = run("awaiting_approval", "to-primary")
    assert moves(d.decide(obs(UP, fo, waiting), cfg)) == []
    [t] = moves(d.decide(obs(UP, fo, run("awaiting_approval", "to-primary", answer="approved by ann")), cfg))
    assert isinstance(t, d.Transition) and t.to == "failing_back" and t.launch
    [t] = moves(d.decide(obs(UP, fo, run("awaiting_approval", "to-primary", answer="rejected by bob")), cfg))
    assert isinstance(t, d.Transition) and t.to == "failed_over" and t.close_run == "rejected"
    late = d.Observation(
        now=9_800.0 + 11 * 60, health={"shop": UP}, failover={"shop": fo}, runs={"RUN-1": waiting}
    )
    [e] = moves(d.decide(late, cfg))
    assert isinstance(e, d.Escalate)
    expired = d.Observation(
        now=9_800.0 + 31 * 60, health={"shop": UP}, failover={"shop": fo}, runs={"RUN-1": waiting}
    )
    [t] = moves(d.decide(expired, cfg))
    assert isinstance(t, d.Transition) and t.close_run == "expired" and t.to == "failed_over"


def test_a_humans_ack_moves_a_failed_state_on(cfg: Config) -> None:
    fo = d.FailoverView("failover_failed", "RUN-1", "INC-1", 1.0, "", 2)
    out = d.decide(obs(DOWN, fo, run("failed"), frozen={"shop": "RUN-1"}), cfg)
    assert moves(out) == [] and any(
        isinstance(x, d.Hold) and "frozen since run RUN-1" in x.reason for x in out
    )
    [t] = moves(d.decide(obs(DOWN, fo, run("failed")), cfg))
    assert isinstance(t, d.Transition) and t.to == "primary" and "acknowledged" in t.reason


def test_a_run_nobody_is_executing_is_resumed_from_the_owner_that_lost_it(cfg: Config) -> None:
    fo = d.FailoverView("failing_over", "RUN-1", "INC-1", 1.0, "", 1)
    [r] = moves(d.decide(obs(DOWN, fo, run("running", owner="old-pod")), cfg))
    assert isinstance(r, d.ResumeRun) and r.owner == "old-pod" and "old-pod" in r.reason
    assert moves(d.decide(obs(DOWN, fo, run("running", owner="me", live=True)), cfg)) == []


def test_a_run_no_state_owns_is_adopted_or_abandoned(cfg: Config) -> None:
    [t] = moves(d.decide(obs(DOWN, d.FailoverView(), run("running")), cfg))
    assert isinstance(t, d.Transition) and (t.to, t.run_id) == ("failing_over", "RUN-1")
    fo = d.FailoverView("failed_over", "RUN-0", "INC-1", 1.0, "", 2)
    [a] = moves(d.decide(obs(DOWN, fo, run("running")), cfg))
    assert isinstance(a, d.AbandonRun)


STATES = ["primary", *sorted(d.FAILOVER_RUN_STATES), "failed_over", "failover_failed", "failback_failed"]
RUN_STATES = [None, "running", "awaiting_approval", "succeeded", "failed", "blocked", "rejected"]


@pytest.mark.parametrize("state", STATES)
def test_at_most_one_action_per_service_whatever_the_state(cfg: Config, state: str) -> None:
    """Every combination of state, run outcome, health, answer, liveness, freeze, pause and orphan:
    decide never returns more than one action on a service's failover state."""
    count = 0
    for run_state, health, answer, live, frozen, paused, orphan in itertools.product(
        RUN_STATES,
        (UP, DOWN),
        (None, "approved by a", "rejected by b"),
        (False, True),
        (False, True),
        (None, "by c"),
        (False, True),
    ):
        runs = []
        if run_state is not None:
            playbook = "to-primary" if "back" in state else "to-secondary"
            runs.append(run(run_state, playbook, answer=answer, live=live))
        if orphan:
            runs.append(d.RunView("RUN-9", "shop", "to-secondary", "running", None, 1.0))
        fo = d.FailoverView(state, "RUN-1" if state != "primary" else None, "INC-1", 1.0, "", 5)
        o = obs(
            health,
            fo,
            *runs,
            frozen={"shop": "RUN-1"} if frozen else {},
            paused=paused,
            up_since={"shop-primary": 1.0, "shop-public": 1.0} if health is UP else {"shop-primary": 1.0},
        )
        out = moves(d.decide(o, cfg))
        assert len(out) <= 1, (state, run_state, health.state, answer, live, frozen, paused, orphan, out)
        count += 1
    assert count == len(RUN_STATES) * 2 * 3 * 2 * 2 * 2 * 2
