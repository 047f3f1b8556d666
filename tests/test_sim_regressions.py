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
    """Invariant `hang-like-refused`: over several phases of the probe's interval, the mean time
    to open the incident for a hanging primary is at most 1.5x that for a refusing one."""
    phases = [100.0 + k * 1.7 for k in range(5)]
    refused = mean(_time_to_incident("refused", p) for p in phases)
    hang = mean(_time_to_incident("hang", p) for p in phases)
    assert hang <= 1.5 * refused, (
        f"[hang-like-refused] a hang took {hang:.1f}s on average to open the incident, "
        f"a refusal {refused:.1f}s ({hang / refused:.2f}x > 1.5x)"
    )


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
