"""One deterministic simulation scenario per bug of issue 10, run on the real controller (tests/sim).

Each scenario is the bug's situation written as a fault timeline; it asserts the invariant the bug
breaks, by name, so a failure says which promise and when. They failed on the code of issue 10's
filing (the report of the `sim` branch lists the violation each one produced).
"""

from __future__ import annotations

from statistics import mean

import pytest

from tests.sim.runner import Outcome, run
from tests.sim.scenarios import Scenario
from tests.sim.world import Event, Fault

pytestmark = pytest.mark.timeout(300)


def _assert_clean(out: Outcome) -> None:
    assert not out.violations, out.report()


def test_restart_during_an_outage_keeps_the_incident_open() -> None:
    """A rolling update in the middle of an outage: the journey is broken (pay step), the plain
    health probe passes; the controller restarts. The restarted one must not resolve the incident
    on the first passing health probe while the journey has not reported yet."""
    s = Scenario(
        seed=101,
        name="restart-mid-outage",
        duration=1500,
        playbook=False,
        faults=[Fault("step", 100, 1000, "eu", step="pay")],
        events=[Event("crash", 400, value=5.0, target="A")],
        checks=("no-resolve-while-failing", "one-incident-per-outage", "one-page-per-incident"),
    )
    _assert_clean(run(s))


def test_one_failing_reference_target_does_not_silence_incidents() -> None:
    """One of two reference targets is down (a third party has an outage); the controller is not
    isolated. A real outage of the primary must still open an incident and page."""
    s = Scenario(
        seed=102,
        name="one-reference-down",
        duration=1500,
        references=True,
        playbook=False,
        faults=[Fault("refused", 50, 1000, "ref-a"), Fault("refused", 200, 800, "eu")],
        checks=("outage-opens-an-incident", "one-page-per-incident"),
    )
    _assert_clean(run(s))


def test_failback_and_failover_never_start_in_one_cycle() -> None:
    """After a failover to us, the secondary fails while the primary has been healthy long enough
    to fail back; a full disk holds every decision until both are due in the same cycle."""
    s = Scenario(
        seed=103,
        name="failback-and-failover",
        duration=1500,
        failback=True,
        cooldown=0.0,
        faults=[Fault("refused", 100, 200, "eu"), Fault("refused", 400, 900, "us")],
        events=[Event("store_error", 400, 560)],
        checks=("one-run-per-service",),
    )
    _assert_clean(run(s))


def test_a_slow_http_step_is_applied_once() -> None:
    """The failover's http step has `timeout: 1s`; the endpoint answers in 3 s. The step must not
    be retried while the first request may still be in flight, and a request whose answer never
    came is "outcome unknown", not "failed"."""
    s = Scenario(
        seed=104,
        name="slow-http-step",
        duration=1200,
        http_step=True,
        http_timeout=1.0,
        faults=[Fault("refused", 100, 600, "eu")],
        events=[Event("hook_slow", 0, 1200, value=3.0)],
        checks=("change-applied-once", "unknown-outcome-not-failed", "idempotency-key"),
    )
    _assert_clean(run(s))


def test_store_errors_do_not_end_paging() -> None:
    """PagerDuty is unreachable while the disk is full for 12 s now and then; once both are back,
    every queued page must be delivered, without a restart."""
    s = Scenario(
        seed=105,
        name="store-error-dispatcher",
        duration=1500,
        playbook=False,
        faults=[Fault("refused", 100, 700, "eu")],
        events=[
            Event("receiver_down", 100, 420, target="pagerduty"),
            *(Event("store_error", at, at + 12.0) for at in range(130, 400, 30)),
        ],
        checks=("notification-exactly-once",),
    )
    _assert_clean(run(s))


def test_file_descriptor_exhaustion_is_not_an_outage() -> None:
    """The controller's process runs out of file descriptors; every target is healthy."""
    s = Scenario(
        seed=106,
        name="emfile",
        duration=1200,
        faults=[Fault("emfile", 200, 600)],
        checks=("prober-fault-not-target", "failover-only-when-primary-down"),
    )
    _assert_clean(run(s))


def test_a_stalled_resolver_is_not_an_outage() -> None:
    """Name resolution on the controller's host stalls; every target is healthy."""
    s = Scenario(
        seed=107,
        name="resolver-stall",
        duration=1200,
        faults=[Fault("resolver", 200, 600)],
        checks=("prober-fault-not-target", "failover-only-when-primary-down"),
    )
    _assert_clean(run(s))


def _time_to_incident(kind: str, start: float) -> float:
    s = Scenario(
        seed=108,
        name=f"detect-{kind}",
        duration=start + 400,
        playbook=False,
        faults=[Fault(kind, start, start + 300, "eu")],
        checks=("outage-opens-an-incident",),
    )
    out = run(s)
    opened = [i.opened_at - out.world.t0 for i in out.incidents if i.service == "checkout"]
    assert opened, out.report()
    return opened[0] - start


@pytest.mark.timeout(600)
def test_a_hang_is_declared_down_within_one_and_a_half_times_a_refusal() -> None:
    """Invariant `hang-like-refused`: at every phase of the probe's interval, the time to open the
    incident for a hanging primary is at most 1.5x that for a refusing one, and a hang costs at most
    one timeout more (checkout-api: timeout 3 s; the burst's tries overlap the scheduled runs, so
    nothing waits a second timeout: before, a hang cost two, 6 s)."""
    phases = [100.0 + k * 1.7 for k in range(5)]
    refused = [_time_to_incident("refused", p) for p in phases]
    hang = [_time_to_incident("hang", p) for p in phases]
    for p, r, h in zip(phases, refused, hang, strict=True):
        assert h <= 1.5 * r, (
            f"[hang-like-refused] at {p:g}s a hang took {h:.1f}s to open the incident, "
            f"a refusal {r:.1f}s ({h / r:.2f}x > 1.5x)"
        )
        assert h - r <= 3.0 + 0.5, (
            f"[hang-like-refused] at {p:g}s a hang took {h:.1f}s, a refusal {r:.1f}s: "
            f"{h - r:.1f}s more, over one timeout (3 s)"
        )
    assert mean(hang) <= 1.5 * mean(refused)


def test_sustained_intermittent_journey_failures_are_reported_with_their_rate() -> None:
    """26% of requests fail for ten minutes: 59% of three-step checkout journeys fail. A moderate
    incident must open stating the measured rate, and nothing fails over."""
    s = Scenario(
        seed=109,
        name="intermittent-59",
        duration=1500,
        faults=[Fault("flaky", 100, 800, "eu", rate=0.26)],
        checks=("intermittent-is-degraded", "failover-only-when-primary-down"),
    )
    _assert_clean(run(s))


def test_a_resolve_on_results_older_than_a_new_fault_is_not_a_resolve_while_failing() -> None:
    """Seed 73 of the random set: eu answers 503, checkout fails over to us; us's pay step breaks at
    304 s, 4 s after the journey's last (passing) run. The incident resolves at 330 s, 40 ms before
    the next journey run (started at 330 s) reports the failure: every result the controller held
    predated the fault, so it could not know (the resolve is within one journey period + timeout +
    tick of the fault). The invariant allowed only 15 s and called this a resolve while failing; the
    journey's run that did see the fault kept the next incident honest (it opened at 370 s)."""
    s = Scenario(
        seed=73,
        name="resolve-before-a-new-fault-is-visible",
        duration=1000,
        failback=True,
        faults=[Fault("http5xx", 128.18, 444.65, "eu"), Fault("step", 304.34, 465.82, "us", step="pay")],
        events=[Event("store_error", 453.77, 488.72)],
        checks=("no-resolve-while-failing", "outage-opens-an-incident"),
    )
    out = run(s)
    _assert_clean(out)
    # the situation this is about did happen: the first incident was resolved after the us fault
    # began, before the journey could have seen it, and a later incident covered the us fault
    first = [i for i in out.incidents if i.service == "checkout" and i.resolved_at is not None]
    assert first, out.report()
    resolved = min(i.resolved_at - out.world.t0 for i in first)
    assert 304.34 < resolved < 304.34 + 30 + 10 + 10, (resolved, out.report())
    later = [i for i in out.incidents if i.service == "checkout" and i.opened_at - out.world.t0 > resolved]
    assert later, out.report()


def test_verdicts_built_while_isolated_are_not_acted_on_when_the_cut_ends() -> None:
    """Seed 153 of the random set: the controller is cut off from everything for 102 s (both
    reference targets fail with the rest). Its journey went DOWN on runs made while isolated, and
    checkout-api DEGRADED (56% of runs failed in the window, nearly all during the cut). When the
    references passed again the stale DOWN opened a critical incident and failed checkout over to us
    at 580 s, although eu never failed. Failures seen while the references failed together are not
    evidence: they are forgotten when the cut ends, and nothing opens or fails over."""
    s = Scenario(
        seed=153,
        name="isolation-verdicts-forgotten",
        duration=1000,
        references=True,
        faults=[
            Fault("emfile", 342.79, 395.44),
            Fault("isolation", 447.89, 550.0),
            Fault("slow", 453.05, 550.0, "eu", latency=2.5),
        ],
        events=[Event("aws", 121.89, 479.16, target="timeout_after")],
        checks=("failover-only-when-primary-down", "prober-fault-not-target"),
    )
    out = run(s)
    _assert_clean(out)
    assert not [i for i in out.incidents if i.service == "checkout"], out.report()


def test_a_real_outage_after_an_isolation_is_still_failed_over() -> None:
    """The other side of forgetting the cut-off window: eu goes down for real right after the
    controller's isolation ends; fresh failures must still open the incident and fail over."""
    s = Scenario(
        seed=154,
        name="outage-after-isolation",
        duration=1200,
        references=True,
        faults=[Fault("isolation", 300, 400), Fault("refused", 400, 900, "eu")],
        checks=("outage-opens-an-incident", "failover-only-when-primary-down"),
    )
    out = run(s)
    _assert_clean(out)
    assert [c for c in out.world.calls if c.kind == "route53" and c.applied], out.report()


# ====================================================== the newer promises, each shown able to fail
#
# Each invariant added for pushed inputs, approvals, email/Statuspage, the real Lease elector and the
# controller's own prober alert is run twice on one scenario: on the production code it holds, and
# with one part deliberately broken (a monkeypatched check or edge) it fails, naming itself.


def _names(out: Outcome) -> set[str]:
    return {v.invariant for v in out.violations}


def _pushes(seed: int, *, faults: list[Fault], checks: tuple[str, ...], agents: bool = False) -> Scenario:
    events = [Event("forged_push", 100, 700)]
    if agents:
        events.append(Event("agent_skew", 150, 450, target="agent-a", value=900.0))
        events.append(Event("agent_skew", 150, 450, target="agent-b", value=-600.0))
    return Scenario(
        seed=seed,
        name="forged-pushes",
        duration=1100,
        playbook=False,
        pushes=True,
        agents=agents,
        faults=faults,
        events=events,
        checks=checks,
    )


def test_a_push_without_the_token_never_acts(monkeypatch: pytest.MonkeyPatch) -> None:
    """An attacker posts firing alerts, heartbeats, results and approvals without the token (or
    with a wrong one) while the worker's job is really down: nothing opens for payments, and the
    worker's outage is still detected. With the API's token comparison broken (any token passes),
    the forged alert opens an incident and the forged heartbeats hide the worker's outage."""
    checks = ("no-action-from-unauthenticated-push", "pushed-outage-detected")
    s = _pushes(201, faults=[Fault("worker_down", 200, 700)], checks=checks)
    out = run(s)
    _assert_clean(out)
    assert any(who == "attacker" for _, _, who, _ in out.world.pushes), "the attacker must have pushed"
    import controller.api

    monkeypatch.setattr(controller.api.hmac, "compare_digest", lambda a, b: True)
    broken = run(s)
    assert {"no-action-from-unauthenticated-push", "pushed-outage-detected"} <= _names(broken), (
        broken.report()
    )


def test_a_missed_heartbeat_and_a_firing_alert_are_outages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alertmanager (with the token) says payments is failing; the worker stops checking in. Both
    open incidents. If the controller drops what Alertmanager pushes, the outage goes unseen."""
    s = _pushes(
        202,
        faults=[Fault("payments_down", 150, 600), Fault("worker_down", 300, 800)],
        checks=("pushed-outage-detected", "no-action-from-unauthenticated-push"),
    )
    _assert_clean(run(s))
    from controller.inputs import ProbeInputs

    monkeypatch.setattr(ProbeInputs, "alertmanager", lambda self, payload: (0, 0))
    broken = run(s)
    assert "pushed-outage-detected" in _names(broken), broken.report()


def test_stale_and_future_results_never_vote(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two agents with skewed clocks (one 15 min ahead, one 10 min behind) post through /results;
    none of their results may vote. With `remote.admit` accepting everything, they do."""
    s = _pushes(203, faults=[], checks=("no-vote-from-stale-or-future-results",), agents=True)
    out = run(s)
    _assert_clean(out)
    assert any(not may for *_, may, _ in out.world.result_posts), "skewed results must have been posted"
    import controller.remote

    monkeypatch.setattr(controller.remote, "admit", lambda result, now, freshness: (result, "accepted"))
    broken = run(s)
    assert "no-vote-from-stale-or-future-results" in _names(broken), broken.report()


def _approval(seed: int, answer: str, checks: tuple[str, ...]) -> Scenario:
    return Scenario(
        seed=seed,
        name=f"approval-{answer}",
        duration=1400,
        approval=answer,
        db_step=True,
        faults=[Fault("refused", 150, 900, "eu")],
        checks=checks,
    )


@pytest.mark.parametrize("answer", ["approve", "reject"])
def test_no_step_applies_before_its_approval(answer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The failover needs a human, who approves (or rejects) 45 s after being asked: nothing moves
    before the approval, nothing ever after a rejection. With approval switched off in the engine's
    reading of the playbook, the steps run unapproved."""
    checks = ("no-step-before-approval", "rejected-approval-never-runs", "one-run-per-service")
    s = _approval(204, answer, checks)
    out = run(s)
    _assert_clean(out)
    assert out.world.approvals and out.world.approvals[0][2] == answer, out.world.approvals
    if answer == "approve":
        assert any(c.kind == "route53" for c in out.world.calls), "the approved failover must run"
    from controller.config import Playbook

    monkeypatch.setattr(Playbook, "needs_approval", lambda self, severity: False)
    broken = run(s)
    expected = "no-step-before-approval" if answer == "approve" else "rejected-approval-never-runs"
    assert expected in _names(broken), broken.report()


def test_an_unanswered_approval_expires_and_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody answers: the run expires after `approval_timeout` and nothing applies. If the
    controller's playbook had no effective timeout, the approval would wait for ever."""
    s = _approval(205, "never", ("approval-expires", "rejected-approval-never-runs"))
    out = run(s)
    _assert_clean(out)
    assert any(r.state == "expired" for r in out.runs), [(r.id, r.state) for r in out.runs]
    import tests.sim.runner as runner_module
    from tests.sim.scenarios import config as real_config

    def no_expiry(scenario: Scenario) -> object:
        cfg = real_config(scenario)
        cfg.playbooks["region-failover"].approval_timeout = 1e9
        return cfg

    monkeypatch.setattr(runner_module, "config", no_expiry)
    broken = run(s)
    assert "approval-expires" in _names(broken), broken.report()


def test_a_prober_fault_raises_the_controllers_own_alert(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the file-descriptor limit the controller counts `continuity_prober_errors_total{kind=
    "emfile"}` and emits its prober-error event; a controller that swallowed the error silently
    (no incident, but no alert either) breaks the promise."""
    s = Scenario(
        seed=206,
        name="emfile-own-alert",
        duration=900,
        faults=[Fault("emfile", 150, 400)],
        checks=("prober-fault-not-target",),
    )
    _assert_clean(run(s))
    from controller.tracker import DetectionTracker

    monkeypatch.setattr(DetectionTracker, "_prober_error", lambda self, result: None)
    broken = run(s)
    assert any("raised no alert" in str(v) for v in broken.violations), broken.report()


def test_the_real_lease_elector_lets_one_replica_act(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas elect with the production LeaseElector; the leader is cut off from the API
    server for 45 s in the middle of an outage (its lease expires, the other takes over), then the
    new leader crashes. Every world-changing call and delivery comes from the Lease's holder. With
    `is_leader` always true, both act."""
    s = Scenario(
        seed=207,
        name="lease-partition",
        duration=1400,
        replicas=2,
        lease=True,
        failback=True,
        faults=[Fault("refused", 150, 500, "eu")],
        events=[Event("leader_change", 200, value=15.0), Event("crash", 600, value=30.0, target="B")],
        checks=("one-actor-at-a-time", "one-page-per-incident", "notification-exactly-once"),
    )
    out = run(s)
    _assert_clean(out)
    holders = {who for _, who in out.world.leadership if who}
    assert len(holders) >= 2, f"the lease should have changed hands: {out.world.leadership}"
    from controller.leader import LeaseElector

    monkeypatch.setattr(LeaseElector, "is_leader", lambda self: True)
    broken = run(s)
    assert "one-actor-at-a-time" in _names(broken), broken.report()


def test_email_and_statuspage_are_delivered_exactly_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Email (SMTP) and Statuspage carry the incident to customers while the relay answers 451 and
    Statuspage is down for a while: each message arrives once. A relay that loses its reply after
    accepting (a resend then duplicates) shows the check covers email."""
    s = Scenario(
        seed=208,
        name="email-statuspage",
        duration=1500,
        comms=True,
        playbook=False,
        faults=[Fault("refused", 150, 700, "eu")],
        events=[Event("smtp_451", 100, 260), Event("receiver_down", 120, 400, target="statuspage")],
        checks=("notification-exactly-once",),
    )
    out = run(s)
    _assert_clean(out)
    channels = {d.detail.get("channel") for d in out.world.deliveries}
    assert {"email", "statuspage"} <= channels, channels
    import smtplib

    from tests.sim.edges import SimSMTP

    accept = SimSMTP.send_message

    def lost_reply(self: SimSMTP, msg: object, from_addr: str | None = None, to_addrs: object = None) -> None:
        accept(self, msg, from_addr, to_addrs)
        raise smtplib.SMTPServerDisconnected("sim: connection lost after DATA")

    monkeypatch.setattr(SimSMTP, "send_message", lost_reply)
    broken = run(s)
    assert "notification-exactly-once" in _names(broken), broken.report()
