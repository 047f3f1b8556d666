"""A human's resolve is an event `decide` consumes, not a write the communicator makes by itself.

`continuity incident resolve` (and the API, the console, a PagerDuty "resolved" our probes agree
with) leaves a request in the store. `decide` reads it from the tick's observation and returns a
`ResolveIncident`, which `Effects` carries out like any other resolution (timeline, PagerDuty
resolve, RTO verdict); the communicator then announces it with the human's message.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.comms import commands as comms_commands
from controller.decide import OpenIncidentView, ResolveIncident, StartPlaybook, decide
from controller.detect import ServiceState
from controller.observation import resolve_requests
from controller.stores.aio import Snapshot
from tests.comms_env import FakeClock, controller, cycle, feed, load, receivers, slack_heads, write_config
from tests.test_detection import config, obs


def test_decide_resolves_an_incident_a_human_resolved_whatever_the_probes_say() -> None:
    open_ = {"checkout": OpenIncidentView("i1", "critical")}
    out = decide(obs(ServiceState.DOWN, incidents=open_, resolve_requests={"i1": "bob"}), config())
    assert out == [ResolveIncident("i1", "checkout", "resolved by bob")], "nothing else for it this cycle"
    # Without the request the same observation starts the failover, as before.
    assert any(
        isinstance(x, StartPlaybook) for x in decide(obs(ServiceState.DOWN, incidents=open_), config())
    )
    # A request about another incident changes nothing here.
    other = decide(obs(ServiceState.DOWN, incidents=open_, resolve_requests={"i9": "bob"}), config())
    assert not any(isinstance(x, ResolveIncident) for x in other)


def test_the_observation_reads_resolve_requests_from_the_snapshot_in_order() -> None:
    def snap(*requests: str, extra: dict[str, str] | None = None) -> Snapshot:
        flags = {f"comms:request:{n:020d}:aaaaaa": r for n, r in enumerate(requests)} | (extra or {})
        return Snapshot(open_incidents=[], all_flags=flags, failover={}, runs=[], outbox=[])

    resolve_i1 = '{"op": "resolve", "incident": "i1", "by": "bob"}'
    ack_i1 = '{"op": "ack", "incident": "i1", "by": "al"}'
    ack_i2 = '{"op": "ack", "incident": "i2", "by": "al"}'
    assert resolve_requests(snap(resolve_i1, ack_i1, extra={"paused": "x"})) == {"i1": "bob"}
    assert resolve_requests(snap("not json", ack_i2, resolve_i1)) == {"i1": "bob"}, "others do not wait"
    # An ack queued before the resolve is applied first (by the communicator): not yet decide's.
    assert resolve_requests(snap(ack_i1, resolve_i1)) == {}


def test_a_human_resolve_goes_through_decide_and_is_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with receivers(tmp_path, monkeypatch) as r:
            clock = FakeClock()
            ctrl = controller(load(write_config(tmp_path, r)), clock)
            store = ctrl.astore.store
            try:
                feed(ctrl, False, clock)
                await cycle(ctrl)
                [inc] = store.list_incidents(status="open")
                await cycle(ctrl)  # the run finishes; the service stays down
                comms_commands.resolve(store, inc.id, "bob", "Payments confirmed working by hand.")

                # The communicator's own cycle does not resolve it: the request waits for decide.
                await ctrl.astore.call(ctrl.communicator.cycle, clock())
                assert store.get_incident(inc.id).status == "open"  # type: ignore[union-attr]
                assert store.flags("comms:request:"), "the request is still pending"

                # One reconcile: decide resolves it (the probes still say down), then it is announced.
                clock.advance(30)
                await cycle(ctrl)
                done = store.get_incident(inc.id)
                assert done is not None and done.status == "resolved" and done.resolved_at == clock()
                timeline = [e.message for e in store.timeline(inc.id)]
                assert any(
                    m.startswith("incident resolved: resolved by bob; outage lasted") for m in timeline
                )
                assert not store.flags("comms:request:"), "applied once, then dropped"
                assert done.data["comms"]["resolved_sent"]
                assert any(
                    "Payments confirmed working by hand." in u["text"] for u in done.data["comms"]["updates"]
                )
                assert [e["event_action"] for e in r.pd.events].count("resolve") == 1
                assert any("resolved" in head.lower() for head in slack_heads(r))
            finally:
                store.close()

    asyncio.run(main())
