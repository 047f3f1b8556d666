"""KubernetesStore against the real kubernetes client and our fake API server.

The contract tests run the same assertions against SQLiteStore and KubernetesStore: the controller
must not be able to tell them apart. The Kubernetes-specific tests cover what SQLite has no
equivalent of: optimistic concurrency, API outages, a new leader reading the old one's state, and
objects as a human sees them with kubectl.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException

from controller.config import Config, ConfigError, StoreSettings, load_config
from controller.stores import SQLiteStore, Store, StoreError, open_store
from controller.stores.kube import GROUP, VERSION, KubernetesStore, object_name, outbox_name
from tests.fakes.kubeapi import FakeKubeAPI

NS = "continuity"
CRDS = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "continuity" / "crds"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


def kstore(kube: FakeKubeAPI, **kw: Any) -> KubernetesStore:
    """Fast retries so outage tests take well under a second each."""
    kw = {"request_timeout": 2.0, "attempts": 4, "backoff": 0.01, "max_backoff": 0.05, **kw}
    return KubernetesStore(kube.api_client(), NS, **kw)


@pytest.fixture(params=["sqlite", "kubernetes", "kubernetes-cached"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each contract test on SQLite, on Kubernetes, and on Kubernetes with the read cache the
    controller uses (`open_store` turns it on): the cache must change no answer."""
    if request.param == "sqlite":
        s: Store = SQLiteStore(tmp_path)
        yield s
        s.close()
    else:
        with FakeKubeAPI() as api:
            s = kstore(api, cache=request.param == "kubernetes-cached")
            yield s
            s.close()


def obj(kube: FakeKubeAPI, plural: str, name: str) -> dict[str, Any]:
    o = kube.get_object(GROUP, VERSION, NS, plural, name)
    assert o is not None, (plural, name)
    return o


# ---------------------------------------------------------------- the contract, both backends


def test_failover_state_moves_only_by_compare_and_swap(store: Store) -> None:
    """A service never written is primary at version 0; each transition names the version it read,
    and of two writers that read the same version exactly one wins."""
    assert store.failover_states() == {}
    a = store.transition_failover("checkout", 0, "failing_over", "RUN-1", "INC-1", "checkout is down", 10.5)
    assert a is not None and (a.state, a.version, a.since) == ("failing_over", 1, 10.5)
    assert store.transition_failover("checkout", 0, "awaiting_approval", "RUN-2", "INC-1", "x", 11.0) is None
    b = store.transition_failover("checkout", 1, "failed_over", "RUN-1", "INC-1", "run RUN-1 succeeded", 12.0)
    assert b is not None and b.version == 2
    assert store.transition_failover("checkout", 1, "failover_failed", "RUN-1", "INC-1", "late", 13.0) is None
    store.transition_failover("login", 0, "awaiting_approval", "RUN-3", None, "login is down", 14.0)
    states = store.failover_states()
    assert states["checkout"].state == "failed_over" and states["checkout"].reason == "run RUN-1 succeeded"
    assert states["checkout"].run_id == "RUN-1" and states["checkout"].incident_id == "INC-1"
    assert states["login"].incident_id is None and states["login"].version == 1
    c = store.transition_failover("checkout", 2, "primary", None, "INC-1", "failed back", 15.0)
    assert c is not None and store.failover_states()["checkout"].run_id is None
    with pytest.raises(ValueError):
        store.transition_failover("checkout", 3, "sideways", None, None, "", 16.0)


def test_run_ownership_is_a_compare_and_swap(store: Store) -> None:
    """Before any step applies the run is owned; a new owner takes over only from the owner it
    read (one that lost its lease), and of two claimants exactly one wins."""
    run = store.create_run("failover", None, "checkout", False, 1.0, ["a"])
    assert store.get_run(run.id).owner is None
    assert store.claim_run(run.id, "pod-a", None)
    assert store.claim_run(run.id, "pod-a", None), "claiming one's own run again is fine"
    assert not store.claim_run(run.id, "pod-b", None), "owned: not claimable as unowned"
    assert not store.claim_run(run.id, "pod-b", "pod-x"), "the owner it read is not the owner"
    assert store.claim_run(run.id, "pod-b", "pod-a")
    assert not store.claim_run(run.id, "pod-c", "pod-a"), "a second take-over from the same owner loses"
    assert store.get_run(run.id).owner == "pod-b"
    assert [r.owner for r in store.runs()] == ["pod-b"]
    assert not store.claim_run("RUN-20000101-000000", "pod-a", None)


def test_incidents_open_get_list_update(store: Store) -> None:
    a = store.open_incident("checkout", "moderate", "checkout is down", 1000.5, 990.25, {"probe": "p1"})
    b = store.open_incident("login", "low", "login is slow", 1010.0, 1005.0, {})
    assert re.fullmatch(r"INC-\d{8}-[0-9a-f]{6}", a.id)
    assert a.status == "open" and a.dedup_key == f"continuity/{a.id}" and a.resolved_at is None
    assert store.get_incident(a.id) == a
    assert store.get_incident("INC-20000101-000000") is None
    assert [i.id for i in store.list_incidents()] == [b.id, a.id]  # newest first
    assert [i.id for i in store.list_incidents(limit=1)] == [b.id]

    store.update_incident(a.id, severity="critical", data={"probe": "p1", "floor": "critical"})
    store.update_incident(a.id, status="resolved", resolved_at=1100.125)
    got = store.get_incident(a.id)
    assert got is not None
    assert (got.severity, got.status, got.resolved_at) == ("critical", "resolved", 1100.125)
    assert got.data == {"probe": "p1", "floor": "critical"}
    assert (got.opened_at, got.started_at, got.title) == (1000.5, 990.25, "checkout is down")
    assert [i.id for i in store.list_incidents(status="open")] == [b.id]
    assert [i.id for i in store.list_incidents(status="resolved")] == [a.id]
    with pytest.raises(ValueError):
        store.update_incident(a.id, service="other")
    store.update_incident("INC-20000101-000000", status="resolved")  # no such incident: a no-op


def test_open_incident_for_is_the_newest_open_one_of_that_service(store: Store) -> None:
    assert store.open_incident_for("checkout") is None
    old = store.open_incident("checkout", "low", "t", 1000.0, 1000.0, {})
    store.open_incident("login", "low", "t", 1500.0, 1500.0, {})
    new = store.open_incident("checkout", "moderate", "t", 2000.0, 2000.0, {})
    found = store.open_incident_for("checkout")
    assert found is not None and found.id == new.id
    store.update_incident(new.id, status="resolved", resolved_at=2100.0)
    found = store.open_incident_for("checkout")
    assert found is not None and found.id == old.id
    store.update_incident(old.id, status="resolved", resolved_at=2100.0)
    assert store.open_incident_for("checkout") is None


def test_timeline_is_ordered_by_time_then_insertion(store: Store) -> None:
    inc = store.open_incident("checkout", "low", "t", 1000.0, 1000.0, {})
    other = store.open_incident("login", "low", "t", 1000.0, 1000.0, {})
    store.append(inc.id, 1003.0, "probe", "third")
    store.append(inc.id, 1001.0, "decision", "first", {"n": 1})
    store.append(inc.id, 1002.0, "playbook", "second-a")
    store.append(inc.id, 1002.0, "playbook", "second-b", {"when": Path("/x")})  # default=str
    store.append(other.id, 1000.5, "probe", "elsewhere")
    events = store.timeline(inc.id)
    assert [e.message for e in events] == ["first", "second-a", "second-b", "third"]
    assert [e.ts for e in events] == [1001.0, 1002.0, 1002.0, 1003.0]
    assert events[0].data == {"n": 1} and events[2].data == {"when": "/x"} and events[3].data == {}
    assert {e.incident_id for e in events} == {inc.id}
    assert [e.message for e in store.timeline(other.id)] == ["elsewhere"]
    assert store.timeline("INC-20000101-000000") == []


def test_runs_and_their_step_journal(store: Store) -> None:
    run = store.create_run(
        "failover-db", "INC-20261124-ab12cd", "checkout", False, 1000.0, ["snap", "promote"]
    )
    assert run.state == "running" and run.ended_at is None and run.error is None
    assert store.get_run(run.id) == run
    assert store.get_run("RUN-20000101-000000") is None
    steps = store.steps(run.id)
    assert [(s.idx, s.name, s.state, s.attempts) for s in steps] == [
        (0, "snap", "pending", 0),
        (1, "promote", "pending", 0),
    ]
    assert all(s.run_id == run.id and s.started_at is None and s.detail is None for s in steps)

    store.update_step(run.id, 0, state="running", started_at=1001.0)
    store.update_step(run.id, 0, attempts=2)
    store.update_step(run.id, 0, state="done", ended_at=1002.5, detail="snapshot s-1")
    store.add_step(run.id, 2, "notify")
    store.add_step(run.id, 1, "ignored")  # an existing idx is kept, as INSERT OR IGNORE
    store.update_step(run.id, 7, state="done")  # no such step: a no-op
    store.update_run(run.id, state="failed", ended_at=1010.0, error="promote timed out")
    steps = store.steps(run.id)
    assert [(s.idx, s.name, s.state) for s in steps] == [
        (0, "snap", "done"),
        (1, "promote", "pending"),
        (2, "notify", "pending"),
    ]
    assert (steps[0].attempts, steps[0].started_at, steps[0].ended_at, steps[0].detail) == (
        2,
        1001.0,
        1002.5,
        "snapshot s-1",
    )
    got = store.get_run(run.id)
    assert got is not None
    assert (got.state, got.ended_at, got.error, got.dry_run) == ("failed", 1010.0, "promote timed out", False)
    assert store.steps("RUN-20000101-000000") == []


def test_runs_filter_by_service_and_playbook_in_start_order(store: Store) -> None:
    r2 = store.create_run("pb", "INC-1", "checkout", False, 2000.0, ["a"])
    r1 = store.create_run("pb", None, "checkout", True, 1000.0, ["a"])
    r3 = store.create_run("other", None, "login", False, 1500.0, [])
    drill = store.create_run("drill", None, None, True, 500.0, [])
    assert [r.id for r in store.runs()] == [drill.id, r1.id, r3.id, r2.id]
    assert [r.id for r in store.runs(service="checkout")] == [r1.id, r2.id]
    assert [r.id for r in store.runs(playbook="other")] == [r3.id]
    assert [r.id for r in store.runs(service="checkout", playbook="other")] == []
    got = store.get_run(drill.id)
    assert got is not None and got.service is None and got.incident_id is None and got.dry_run is True
    assert store.steps(r3.id) == []


def test_flags_set_get_delete_and_prefix(store: Store) -> None:
    assert store.get_flag("paused") is None and store.flags() == {}
    store.set_flag("paused", None)  # deleting what is not there is fine
    store.set_flag("paused", "by alice")
    store.set_flag("frozen:checkout", "RUN-1")
    store.set_flag("frozen:login", "RUN-2")
    store.set_flag("frozen:checkout", "RUN-3")
    assert store.get_flag("paused") == "by alice"
    assert store.flags("frozen:") == {"frozen:checkout": "RUN-3", "frozen:login": "RUN-2"}
    assert len(store.flags()) == 3
    store.set_flag("frozen:login", None)
    assert store.flags("frozen:") == {"frozen:checkout": "RUN-3"}
    assert store.get_flag("frozen:login") is None


def test_outbox_enqueue_is_idempotent_and_due_is_in_creation_order(store: Store) -> None:
    assert store.enqueue("pagerduty", "INC-1/pagerduty/trigger", {"a": 1}, "INC-1", 1000.0) is True
    assert store.enqueue("pagerduty", "INC-1/pagerduty/trigger", {"a": 2}, "INC-1", 1001.0) is False
    assert store.enqueue("slack", "INC-1/slack/trigger", {"b": 1}, "INC-1", 1002.0) is True
    assert store.enqueue("pagerduty", "drill/trigger", {}, None, 1003.0) is True
    assert store.due(999.0) == []
    due = store.due(1002.0)
    assert [m.key for m in due] == ["INC-1/pagerduty/trigger", "INC-1/slack/trigger"]
    first = due[0]
    assert isinstance(first.id, int) and first.id < due[1].id
    assert (first.channel, first.incident_id, first.payload, first.created_at) == (
        "pagerduty",
        "INC-1",
        {"a": 1},
        1000.0,
    )
    assert (first.attempts, first.next_attempt_at, first.delivered_at, first.dead, first.last_error) == (
        0,
        1000.0,
        None,
        False,
        None,
    )
    assert [m.key for m in store.due(5000.0)] == [
        "INC-1/pagerduty/trigger",
        "INC-1/slack/trigger",
        "drill/trigger",
    ]
    assert [m.key for m in store.due(5000.0, limit=2)] == ["INC-1/pagerduty/trigger", "INC-1/slack/trigger"]
    assert store.due(5000.0)[2].incident_id is None


def test_outbox_delivered_retry_later_give_up_and_listing(store: Store) -> None:
    for i, key in enumerate(["k1", "k2", "k3"]):
        store.enqueue("pagerduty", key, {"i": i}, None, 1000.0)
    k1, k2, k3 = store.due(1000.0)
    store.retry_later(k1.id, 1100.0, "HTTP 503")
    store.retry_later(k1.id, 1200.0, "HTTP 503 again")
    store.give_up(k2.id, "HTTP 400 invalid routing key")
    store.delivered(k3.id, 1000.5)
    assert store.due(1150.0) == []
    (again,) = store.due(1200.0)
    assert (again.key, again.attempts, again.next_attempt_at, again.last_error) == (
        "k1",
        2,
        1200.0,
        "HTTP 503 again",
    )
    store.delivered(k1.id, 1201.0)
    assert store.due(9999.0) == []

    pending = store.outbox()
    assert [m.key for m in pending] == ["k2"]
    assert (pending[0].dead, pending[0].attempts, pending[0].last_error) == (
        True,
        1,
        "HTTP 400 invalid routing key",
    )
    everything = {m.key: m for m in store.outbox(include_delivered=True)}
    assert list(everything) == ["k1", "k2", "k3"]
    assert (everything["k1"].delivered_at, everything["k1"].attempts, everything["k1"].last_error) == (
        1201.0,
        3,
        None,
    )
    assert (everything["k3"].delivered_at, everything["k3"].attempts) == (1000.5, 1)
    store.delivered(10_000, 1.0)  # an unknown id: a no-op, as an UPDATE of no row
    assert store.enqueue("pagerduty", "k3", {}, None, 2000.0) is False  # delivered keys stay taken


# ---------------------------------------------------------------- Kubernetes specifics


def test_objects_read_as_a_human_sees_them(kube: FakeKubeAPI) -> None:
    """Lowercase DNS-1123 names, ids and service/status in labels, every printer column filled."""
    s = kstore(kube)
    inc = s.open_incident("checkout", "critical", "checkout is down", 1764000000.25, 1763999990.0, {})
    s.append(inc.id, 1764000001.0, "probe", "p1 DOWN")
    run = s.create_run("failover-db", inc.id, "checkout", False, 1764000002.0, ["snap", "promote"])
    s.update_step(run.id, 0, state="running", started_at=1764000003.0)
    s.update_run(run.id, error="none yet")
    assert s.claim_run(run.id, "continuity-0", None)
    s.transition_failover("checkout", 0, "failing_over", run.id, inc.id, "checkout is down", 1764000002.0)
    s.enqueue("pagerduty", f"{inc.id}/pagerduty/trigger", {"x": 1}, inc.id, 1764000000.0)
    s.retry_later(s.due(1764000000.0)[0].id, 1764000100.0, "HTTP 503")
    s.set_flag("paused", "by alice")

    i = obj(kube, "incidents", inc.id.lower())
    assert DNS1123.match(i["metadata"]["name"]) and i["spec"]["id"] == inc.id
    labels = i["metadata"]["labels"]
    assert labels["continuity.dev/service"] == "checkout" and labels["continuity.dev/status"] == "open"
    assert i["spec"]["openedAt"] == "2025-11-24T16:00:00.250000Z"
    assert i["spec"]["publicStatus"] == "investigating"
    assert i["spec"]["timeline"][0]["at"] == "2025-11-24T16:00:01.000000Z"
    r = obj(kube, "playbookruns", run.id.lower())
    assert r["spec"]["step"] == "snap" and r["spec"]["steps"][0]["state"] == "running"
    assert r["metadata"]["labels"]["continuity.dev/playbook"] == "failover-db"
    (m,) = [o for o in kube._objects.values() if o["kind"] == "OutboxMessage"]
    assert m["metadata"]["name"] == outbox_name(f"{inc.id}/pagerduty/trigger")
    assert m["metadata"]["labels"]["continuity.dev/state"] == "pending"
    st = obj(kube, "continuitystates", "continuity")
    fo = obj(kube, "failoverstates", "checkout")
    assert fo["spec"]["state"] == "failing_over" and fo["spec"]["since"] == "2025-11-24T16:00:02.000000Z"
    assert r["spec"]["owner"] == "continuity-0"

    by_kind = {
        "Incident": i,
        "PlaybookRun": r,
        "OutboxMessage": m,
        "ContinuityState": st,
        "FailoverState": fo,
    }
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        o = by_kind[crd["spec"]["names"]["kind"]]
        for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
            value: Any = o
            for part in column["jsonPath"].lstrip(".").split("."):
                value = value.get(part) if isinstance(value, dict) else None
            optional = column["name"] in {"Resolved", "Age"}  # unresolved; set by the server
            assert value is not None or optional, (crd["spec"]["names"]["kind"], column["name"])
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        declared = set(schema.get("properties", {}))
        assert set(o["spec"]) <= declared, (crd["spec"]["names"]["kind"], set(o["spec"]) - declared)


def test_names_are_dns_1123() -> None:
    assert object_name("INC-20261124-ab12cd") == "inc-20261124-ab12cd"
    assert object_name("RUN_X") == "run-x"
    assert DNS1123.match(outbox_name("INC-1/PagerDuty/trigger"))


@pytest.mark.parametrize("stores", ["one store", "two stores"])
def test_concurrent_appends_from_two_threads_all_land(kube: FakeKubeAPI, stores: str) -> None:
    """Two threads of one controller, or two replicas racing: every append lands, none twice."""
    a = kstore(kube)
    b = a if stores == "one store" else kstore(kube)
    inc = a.open_incident("checkout", "low", "t", 1000.0, 1000.0, {})
    start = threading.Barrier(2)

    def writer(s: KubernetesStore, tag: str) -> None:
        start.wait()
        for n in range(15):
            s.append(inc.id, 1000.0 + n, "probe", f"{tag}{n}")

    threads = [threading.Thread(target=writer, args=(s, tag)) for s, tag in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    messages = [e.message for e in a.timeline(inc.id)]
    assert sorted(messages) == sorted([f"a{n}" for n in range(15)] + [f"b{n}" for n in range(15)])
    assert [e.ts for e in a.timeline(inc.id)] == sorted(e.ts for e in a.timeline(inc.id))


def test_a_409_is_reread_and_reapplied(kube: FakeKubeAPI) -> None:
    """Deterministic: the next two PUTs are refused with 409; the change still lands once."""
    s = kstore(kube)
    inc = s.open_incident("checkout", "low", "t", 1000.0, 1000.0, {})
    s.append(inc.id, 1001.0, "probe", "before")
    kube.fail(409, count=2, match=lambda method, path: method == "PUT")
    kube.clear_log()
    s.append(inc.id, 1002.0, "probe", "after")
    assert [e.message for e in s.timeline(inc.id)] == ["before", "after"]
    assert [m for m, _ in kube.requests].count("PUT") == 3


def test_a_409_that_never_stops_is_a_store_error(kube: FakeKubeAPI) -> None:
    s = kstore(kube)
    inc = s.open_incident("checkout", "low", "t", 1000.0, 1000.0, {})
    kube.fail(409, match=lambda method, path: method == "PUT")
    with pytest.raises(StoreError, match="conflicting"):
        s.update_incident(inc.id, severity="critical")


def test_a_short_500_burst_is_absorbed(kube: FakeKubeAPI) -> None:
    s = kstore(kube)
    inc = s.open_incident("checkout", "low", "t", 1000.0, 1000.0, {})
    kube.fail(500, count=3)  # attempts=4: the fourth gets through
    s.append(inc.id, 1001.0, "probe", "x")
    kube.fail(503, count=2)
    assert [e.message for e in s.timeline(inc.id)] == ["x"]
    kube.fail(429, count=1)
    assert s.enqueue("pagerduty", "k", {}, inc.id, 1000.0) is True


@pytest.mark.parametrize("how", ["500s", "refused", "timeout"])
def test_a_long_outage_raises_store_error_never_api_exception(kube: FakeKubeAPI, how: str) -> None:
    s = kstore(kube, request_timeout=0.2, attempts=3)
    inc = s.open_incident("checkout", "low", "t", 1000.0, 1000.0, {})
    if how == "500s":
        kube.fail(500)
    elif how == "timeout":
        kube.delay(0.5)
    else:
        kube.stop()
    calls = [
        lambda: s.open_incident_for("checkout"),
        lambda: s.append(inc.id, 1001.0, "probe", "x"),
        lambda: s.enqueue("pagerduty", "k", {}, None, 1000.0),
        lambda: s.flags(),
    ]
    for call in calls[: 1 if how == "timeout" else None]:
        with pytest.raises(StoreError) as caught:
            call()
        assert "Kubernetes API" in str(caught.value) and "after 3 attempts" in str(caught.value)
        assert not isinstance(caught.value, ApiException) and caught.value.__cause__ is None
    if how == "500s":
        assert "HTTP 500" in str(caught.value)


def test_other_api_errors_are_store_errors_too(kube: FakeKubeAPI) -> None:
    s = kstore(kube)
    kube.fail(403, count=1)
    with pytest.raises(StoreError, match=r"Kubernetes API .*list_incidents failed: HTTP 403 Forbidden"):
        s.list_incidents()


def test_a_new_leader_resumes_from_the_old_ones_objects(kube: FakeKubeAPI) -> None:
    old = kstore(kube)
    inc = old.open_incident("checkout", "critical", "checkout is down", 1000.0, 990.0, {"probe": "p1"})
    old.append(inc.id, 1001.0, "decision", "run failover-db")
    run = old.create_run("failover-db", inc.id, "checkout", False, 1002.0, ["snap", "promote"])
    old.update_step(run.id, 0, state="done", started_at=1003.0, ended_at=1004.0)
    old.update_step(run.id, 1, state="running", started_at=1005.0, attempts=1)
    old.enqueue("pagerduty", f"{inc.id}/pagerduty/trigger", {"summary": "down"}, inc.id, 1000.0)
    old.enqueue("pagerduty", "delivered", {}, None, 1000.0)
    old.delivered(old.due(1000.0)[1].id, 1000.5)
    old.set_flag("frozen:search", "RUN-x")
    old.close()

    new = kstore(kube)  # no cache: everything comes from the API server
    found = new.open_incident_for("checkout")
    assert found == inc
    assert [e.message for e in new.timeline(inc.id)] == ["run failover-db"]
    (running,) = [r for r in new.runs(service="checkout") if r.state == "running"]
    assert running.id == run.id
    assert [(s.name, s.state, s.attempts) for s in new.steps(run.id)] == [
        ("snap", "done", 0),
        ("promote", "running", 1),
    ]
    (msg,) = new.due(2000.0)
    assert msg.key == f"{inc.id}/pagerduty/trigger" and msg.payload == {"summary": "down"}
    new.delivered(msg.id, 2000.0)  # the id works across instances
    assert new.due(2000.0) == [] and new.flags() == {"frozen:search": "RUN-x"}
    assert new.enqueue("pagerduty", "next", {}, None, 2001.0) is True
    assert max(m.id for m in new.outbox(include_delivered=True)) == 3  # the counter carried over


def test_the_timeline_keeps_the_last_entries_and_counts_the_rest(kube: FakeKubeAPI) -> None:
    s = kstore(kube, timeline_cap=5)
    inc = s.open_incident("checkout", "low", "t", 1000.0, 1000.0, {})
    for n in range(8):
        s.append(inc.id, 1000.0 + n, "probe", f"e{n}")
    assert [e.message for e in s.timeline(inc.id)] == ["e3", "e4", "e5", "e6", "e7"]
    spec = obj(kube, "incidents", inc.id.lower())["spec"]
    assert (spec["timelineDropped"], spec["timelineSeq"]) == (3, 8)


def test_odd_service_names_still_select_correctly(kube: FakeKubeAPI) -> None:
    s = kstore(kube)
    weird = "Checkout EU/1 " + "x" * 70  # not a valid label value: hashed in the label
    inc = s.open_incident(weird, "low", "t", 1000.0, 1000.0, {})
    s.open_incident("checkout", "low", "t", 1001.0, 1001.0, {})
    found = s.open_incident_for(weird)
    assert found is not None and found.id == inc.id


# ---------------------------------------------------------------- config and factory

MINIMAL = """
services:
  checkout: {tier: critical, rto: 5m, probes: [p1]}
probes:
  p1: {kind: http, url: "http://127.0.0.1:1/health"}
"""


def load_config_text(text: str, tmp_path: Path) -> Config:
    path = tmp_path / "continuity.yaml"
    path.write_text(text)
    return load_config(path)


def test_open_store_sqlite_uses_the_override(tmp_path: Path) -> None:
    cfg = load_config_text(MINIMAL, tmp_path)
    assert cfg.store.backend == "sqlite" and cfg.store.namespace is None
    s = open_store(cfg, str(tmp_path / "state"))
    assert isinstance(s, SQLiteStore) and s.path == tmp_path / "state" / "continuity.db"
    s.close()


def test_store_section_and_kubernetes_without_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config_text(MINIMAL + "store: {backend: kubernetes, namespace: ops}\n", tmp_path)
    assert (cfg.store.backend, cfg.store.resolved_namespace()) == ("kubernetes", "ops")
    sa = tmp_path / "namespace"
    sa.write_text("shop\n")
    assert StoreSettings().resolved_namespace(sa) == "shop"
    assert StoreSettings().resolved_namespace(tmp_path / "missing") == "default"
    with pytest.raises(ConfigError, match=r"store\.backend"):
        load_config_text(MINIMAL + "store: {backend: etcd}\n", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(StoreError, match="no usable cluster credentials"):
        open_store(cfg, None)


def test_a_create_whose_response_was_lost_is_not_an_error(kube: FakeKubeAPI) -> None:
    """The server created the Incident but the client timed out and retried: AlreadyExists."""
    s = kstore(kube, request_timeout=0.3)
    posts: list[str] = []

    def first_post(method: str, path: str) -> bool:  # only the first POST is slow
        if method == "POST":
            posts.append(path)
        return method == "POST" and len(posts) == 1

    kube.delay(0.5, match=first_post)
    inc = s.open_incident("checkout", "low", "t", 1000.0, 1000.0, {})
    kube.clear_faults()
    assert s.get_incident(inc.id) == inc and len(posts) == 2


@pytest.mark.parametrize("backend", ["sqlite", "kubernetes"])
def test_two_processes_racing_for_a_run_or_a_state_one_wins(tmp_path: Path, backend: str) -> None:
    """Two store instances (as two replicas have) race to claim the same runs and to move the same
    failover state from the same version: every time, exactly one of them wins."""
    with FakeKubeAPI() as api:
        if backend == "sqlite":
            one: Store = SQLiteStore(tmp_path)
            two: Store = SQLiteStore(tmp_path)
        else:
            one, two = kstore(api), kstore(api)
        try:
            for i in range(10):
                run = one.create_run("failover", None, "checkout", False, float(i), ["a"])
                wins: list[bool] = []
                version = i  # the state's version before this round
                moved: list[Any] = []
                barrier = threading.Barrier(2)

                def race(
                    s: Store, me: str, run_id: str, v: int, b: threading.Barrier, w: list[bool], m: list[Any]
                ) -> None:
                    b.wait()
                    w.append(s.claim_run(run_id, me, None))
                    m.append(s.transition_failover("checkout", v, "failing_over", run_id, None, me, 1.0))

                threads = [
                    threading.Thread(target=race, args=(s, me, run.id, version, barrier, wins, moved))
                    for s, me in ((one, "a"), (two, "b"))
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert sorted(wins) == [False, True], (i, wins)
                assert sum(m is not None for m in moved) == 1, (i, moved)
                winner = next(m for m in moved if m is not None)
                assert one.failover_states()["checkout"].reason == winner.reason
        finally:
            one.close()
            two.close()
