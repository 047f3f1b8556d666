"""Leader election against the real kubernetes client and our fake API server, plus the file lock.

Most Lease tests drive ``try_acquire_or_renew()`` step by step with a fake monotonic clock, so the
timing rules are checked exactly and without sleeping; the outage and partition tests run the real
loops on the real clock with short timings, because overlap is only meaningful in real time.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry

from controller.leader import Elector, FileLockElector, LeaseElector, format_microtime
from tests.fakes.kubeapi import FakeKubeAPI

NS = "continuity"
LEASE = "continuity-leader"
MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


@pytest.fixture
def api(kube: FakeKubeAPI) -> Iterator[client.ApiClient]:
    c = kube.api_client()
    yield c
    c.close()


def reason(e: ApiException) -> str:
    return str(json.loads(e.body)["reason"])


def lease_obj(kube: FakeKubeAPI) -> dict:
    obj = kube.get_object("coordination.k8s.io", "v1", NS, "leases", LEASE)
    assert obj is not None
    return obj


def elector(api: client.ApiClient, identity: str, clock: FakeClock, **kw: object) -> LeaseElector:
    return LeaseElector(api, NS, LEASE, identity, clock=clock, registry=CollectorRegistry(), **kw)  # type: ignore[arg-type]


# ---- the fake API server ---------------------------------------------------------------------


def test_fake_lease_roundtrip_microtime_and_conflicts(api: client.ApiClient) -> None:
    co = client.CoordinationV1Api(api)
    body = {
        "metadata": {"name": "l"},
        "spec": {"holderIdentity": "a", "renewTime": "2026-11-24T04:30:00.123456Z"},
    }
    created = co.create_namespaced_lease(NS, body)
    assert created.kind == "Lease" and created.api_version == "coordination.k8s.io/v1"
    assert created.spec.renew_time.microsecond == 123456
    assert created.metadata.uid and created.metadata.creation_timestamp is not None

    with pytest.raises(ApiException) as exists:
        co.create_namespaced_lease(NS, body)
    assert exists.value.status == 409 and reason(exists.value) == "AlreadyExists"

    created.spec.holder_identity = "b"
    updated = co.replace_namespaced_lease("l", NS, created)
    assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)
    with pytest.raises(ApiException) as stale:
        co.replace_namespaced_lease("l", NS, created)  # still carries the old resourceVersion
    assert stale.value.status == 409 and reason(stale.value) == "Conflict"

    stale_patch = {
        "metadata": {"resourceVersion": created.metadata.resource_version},
        "spec": {"holderIdentity": "x"},
    }
    with pytest.raises(ApiException) as stale2:
        co.patch_namespaced_lease("l", NS, stale_patch)
    assert reason(stale2.value) == "Conflict"
    assert co.patch_namespaced_lease("l", NS, {"spec": {"holderIdentity": "c"}}).spec.holder_identity == "c"

    # The real server insists on six fractional digits for MicroTime.
    with pytest.raises(ApiException) as bad:
        co.patch_namespaced_lease("l", NS, {"spec": {"renewTime": "2026-11-24T04:30:00Z"}})
    assert bad.value.status == 400

    co.delete_namespaced_lease("l", NS)
    with pytest.raises(ApiException) as gone:
        co.read_namespaced_lease("l", NS)
    assert gone.value.status == 404 and reason(gone.value) == "NotFound"


def test_fake_deployment_scale_subresource(api: client.ApiClient) -> None:
    apps = client.AppsV1Api(api)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        NS,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "w", "image": "x"}]},
                },
            },
        },
    )
    scale = apps.read_namespaced_deployment_scale("web", NS)
    assert scale.kind == "Scale" and scale.spec.replicas == 2 and scale.status.selector == "app=web"
    assert apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": 5}}).spec.replicas == 5
    dep = apps.read_namespaced_deployment("web", NS)
    assert dep.spec.replicas == 5 and dep.status.ready_replicas == 5 and dep.status.replicas == 5

    scale.spec.replicas = 0  # scale still carries the resourceVersion from before the patch
    with pytest.raises(ApiException) as stale:
        apps.replace_namespaced_deployment_scale("web", NS, scale)
    assert reason(stale.value) == "Conflict"
    assert apps.read_namespaced_deployment("web", NS).spec.replicas == 5


def test_fake_configmaps_custom_objects_selectors_and_version(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    for name, tier in (("a", "critical"), ("b", "supporting")):
        core.create_namespaced_config_map(
            NS,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=name, labels={"tier": tier}), data={"k": name}
            ),
        )
    picked = core.list_namespaced_config_map(NS, label_selector="tier in (critical,important)")
    assert [c.metadata.name for c in picked.items] == ["a"]
    assert [
        c.metadata.name for c in core.list_namespaced_config_map(NS, label_selector="tier!=critical").items
    ] == ["b"]

    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object(
        "continuity.io",
        "v1",
        NS,
        "incidents",
        {
            "apiVersion": "continuity.io/v1",
            "kind": "Incident",
            "metadata": {"name": "i1", "labels": {"open": "y"}},
        },
    )
    listed = co.list_namespaced_custom_object("continuity.io", "v1", NS, "incidents", label_selector="open")
    assert listed["kind"] == "IncidentList" and [i["metadata"]["name"] for i in listed["items"]] == ["i1"]
    patched = co.patch_namespaced_custom_object(
        "continuity.io", "v1", NS, "incidents", "i1", {"spec": {"sev": 1}}
    )
    assert patched["spec"] == {"sev": 1} and patched["kind"] == "Incident"
    assert client.VersionApi(api).get_code().major == "1"


def test_fake_fault_injection_and_request_log(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    v = client.VersionApi(api)
    kube.fail(503, count=2)
    for _ in range(2):
        with pytest.raises(ApiException) as e:
            v.get_code()
        assert e.value.status == 503 and reason(e.value) == "ServiceUnavailable"
    assert v.get_code().major == "1"

    kube.fail(500, seconds=0.2)
    with pytest.raises(ApiException):
        v.get_code()
    time.sleep(0.25)
    assert v.get_code().major == "1"

    kube.delay(0.5)
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.TimeoutError):
        v.get_code(_request_timeout=0.1)
    assert time.monotonic() - started < 0.4
    kube.delay(0)

    kube.clear_log()
    client.CoordinationV1Api(api).list_namespaced_lease(NS)
    assert kube.requests == [("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases")]


# ---- Lease elector, deterministic (fake clock) -----------------------------------------------


def test_constructor_rejects_unsafe_timings(api: client.ApiClient) -> None:
    with pytest.raises(ValueError, match="lease_duration"):
        LeaseElector(api, NS, LEASE, "a", lease_duration=10, renew_deadline=10, registry=None)
    with pytest.raises(ValueError, match="renew_deadline"):
        LeaseElector(api, NS, LEASE, "a", lease_duration=15, renew_deadline=2, retry_period=2, registry=None)
    with pytest.raises(ValueError, match="request_timeout"):
        LeaseElector(api, NS, LEASE, "a", request_timeout=5, registry=None)


def test_two_electors_one_leader_that_stays(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    clock = FakeClock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)

    async def scenario() -> None:
        assert await a.try_acquire_or_renew() is True
        assert await b.try_acquire_or_renew() is False
        first = lease_obj(kube)["spec"]
        for _ in range(30):  # 60 s of renewals: far beyond the 15 s lease
            clock.advance(2.0)
            assert await a.try_acquire_or_renew() is True
            assert await b.try_acquire_or_renew() is False
            assert a.is_leader() and not b.is_leader()
        spec = lease_obj(kube)["spec"]
        assert spec["holderIdentity"] == "a" and spec["leaseTransitions"] == 0
        assert spec["acquireTime"] == first["acquireTime"]  # a renewal keeps acquireTime
        assert MICROTIME.match(spec["renewTime"]) and MICROTIME.match(spec["acquireTime"])
        assert spec["leaseDurationSeconds"] == 15

    asyncio.run(scenario())
    assert a.leading.is_set() and not b.leading.is_set()
    assert isinstance(a, Elector)


def test_crashed_leader_taken_over_only_after_lease_expiry(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    clock = FakeClock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)

    async def scenario() -> None:
        assert await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()  # b first sees a's lease at t0
        t0 = clock.now
        # a "crashes": no more renewals. b keeps trying every half second.
        while clock.now - t0 < 15.0 - 1e-9:
            assert not await b.try_acquire_or_renew(), f"took over after {clock.now - t0} s"
            if clock.now - t0 >= 10.0:
                assert not a.is_leader()  # a stopped acting at its renew deadline, before expiry
            else:
                assert a.is_leader()
            clock.advance(0.5)
        assert clock.now - t0 == pytest.approx(15.0)
        assert await b.try_acquire_or_renew()
        spec = lease_obj(kube)["spec"]
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
        # The old leader, if it comes back, sees it lost and does not take the lease back.
        assert not await a.try_acquire_or_renew()
        assert lease_obj(kube)["spec"]["holderIdentity"] == "b"

    asyncio.run(scenario())


def test_renewals_restart_the_standbys_expiry_clock(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    clock = FakeClock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)

    async def scenario() -> None:
        await a.try_acquire_or_renew()
        await b.try_acquire_or_renew()
        clock.advance(9.0)
        assert await a.try_acquire_or_renew()  # renewed at t0+9
        clock.advance(1.0)
        assert not await b.try_acquire_or_renew()  # b sees the change at t0+10
        clock.advance(14.5)  # t0+24.5: 14.5 s since b saw the change
        assert not await b.try_acquire_or_renew()
        clock.advance(0.5)
        assert await b.try_acquire_or_renew()

    asyncio.run(scenario())


def test_release_hands_over_at_once(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    clock = FakeClock()
    stopped: list[str] = []
    a = elector(api, "a", clock, on_stopped_leading=lambda: stopped.append("a"))
    b = elector(api, "b", clock)

    async def scenario() -> None:
        await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()
        await a.release()
        assert not a.is_leader() and stopped == ["a"]
        spec = lease_obj(kube)["spec"]
        assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1
        assert await b.try_acquire_or_renew()  # no clock advance needed
        assert lease_obj(kube)["spec"]["leaseTransitions"] == 1

    asyncio.run(scenario())


def test_409_race_exactly_one_wins(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    clock = FakeClock()
    old, a, b = elector(api, "old", clock), elector(api, "a", clock), elector(api, "b", clock)

    async def scenario() -> None:
        await old.try_acquire_or_renew()
        assert not await a.try_acquire_or_renew() and not await b.try_acquire_or_renew()
        clock.advance(16.0)  # old is gone; both see the lease expired at the same resourceVersion
        kube.delay(0.3, match=lambda method, path: method == "PUT")  # both read before either writes
        kube.clear_log()
        results = await asyncio.gather(a.try_acquire_or_renew(), b.try_acquire_or_renew())
        kube.delay(0)
        assert sorted(results) == [False, True]
        assert [m for m, _ in kube.requests].count("PUT") == 2
        winner = "a" if results[0] else "b"
        spec = lease_obj(kube)["spec"]
        assert spec["holderIdentity"] == winner and spec["leaseTransitions"] == 1
        assert a.is_leader() == (winner == "a") and b.is_leader() == (winner == "b")

    asyncio.run(scenario())


def test_api_errors_are_caught_not_raised(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    clock = FakeClock()
    a = elector(api, "a", clock, retry_period=0.2, renew_deadline=1.0, lease_duration=1.5)

    async def scenario() -> None:
        for status in (401, 403, 500):
            kube.fail(status, count=1)
            assert await a.try_acquire_or_renew() is False
        kube.delay(0.5)  # longer than the 0.2 s request timeout
        started = time.monotonic()
        assert await a.try_acquire_or_renew() is False
        assert time.monotonic() - started < 0.45
        kube.delay(0)
        assert await a.try_acquire_or_renew() is True
        kube.stop()  # connection refused
        clock.advance(0.2)
        assert await a.try_acquire_or_renew() is False
        assert a.is_leader()  # still inside its renew deadline
        clock.advance(1.0)
        assert not a.is_leader()

    asyncio.run(scenario())


# ---- Lease elector, real time ----------------------------------------------------------------

FAST = {"lease_duration": 1.5, "renew_deadline": 1.0, "retry_period": 0.2}


async def _watch(electors: list[LeaseElector], stop: asyncio.Event, seen: list[tuple[float, str]]) -> None:
    """Sample every 5 ms; fail loudly the moment two replicas both believe they lead."""
    while not stop.is_set():
        leaders = [e.identity for e in electors if e.is_leader()]
        assert len(leaders) <= 1, f"split brain: {leaders}"
        seen.append((time.monotonic(), leaders[0] if leaders else ""))
        await asyncio.sleep(0.005)


async def _settle(electors: list[LeaseElector], within: float = 3.0) -> LeaseElector:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        leaders = [e for e in electors if e.is_leader()]
        if len(leaders) == 1:
            return leaders[0]
        await asyncio.sleep(0.01)
    raise AssertionError("no single leader emerged")


def _last_true(seen: list[tuple[float, str]], identity: str) -> float:
    return max(t for t, who in seen if who == identity)


def test_total_api_outage_leader_steps_down_before_lease_expiry(kube: FakeKubeAPI) -> None:
    clients = [kube.api_client(user_agent=n) for n in ("a", "b")]
    electors = [
        LeaseElector(c, NS, LEASE, n, registry=CollectorRegistry(), **FAST)
        for c, n in zip(clients, ("a", "b"), strict=True)
    ]

    async def scenario() -> None:
        stop, watch_stop = asyncio.Event(), asyncio.Event()
        seen: list[tuple[float, str]] = []
        tasks = [asyncio.create_task(e.run(stop)) for e in electors]
        watcher = asyncio.create_task(_watch(electors, watch_stop, seen))
        leader = await _settle(electors)
        await asyncio.sleep(0.3)
        outage_start = time.monotonic()
        kube.fail(500, seconds=2.0)
        await asyncio.sleep(2.0)
        # The leader stopped within renew_deadline of its last renewal, i.e. before any lease expiry.
        stepped_down = _last_true(seen, leader.identity)
        assert stepped_down - outage_start < FAST["renew_deadline"] + 0.05
        assert not any(who for t, who in seen if t > stepped_down)  # nobody led during the outage
        assert not leader.leading.is_set()
        await _settle(electors, within=2.5)  # API back: exactly one leader again
        await asyncio.sleep(0.5)
        stop.set()
        watch_stop.set()
        await asyncio.gather(*tasks, watcher)

    try:
        asyncio.run(scenario())
    finally:
        for c in clients:
            c.close()
    assert lease_obj(kube)["spec"]["holderIdentity"] == ""  # released on the way out


def test_partitioned_leader_yields_and_standby_takes_over_without_overlap(kube: FakeKubeAPI) -> None:
    clients = [kube.api_client(user_agent=n) for n in ("a", "b")]
    reg = CollectorRegistry()
    a = LeaseElector(clients[0], NS, LEASE, "a", registry=reg, **FAST)
    b = LeaseElector(clients[1], NS, LEASE, "b", registry=reg, **FAST)

    async def scenario() -> None:
        stop, watch_stop = asyncio.Event(), asyncio.Event()
        seen: list[tuple[float, str]] = []
        ta = asyncio.create_task(a.run(stop))
        await _settle([a])
        tb = asyncio.create_task(b.run(stop))
        watcher = asyncio.create_task(_watch([a, b], watch_stop, seen))
        await asyncio.sleep(0.5)
        assert a.is_leader() and not b.is_leader()
        assert reg.get_sample_value("continuity_leader", {"lock": f"lease/{NS}/{LEASE}"}) == 1
        cut = time.monotonic()
        kube.fail(503, user_agent="a")  # only a loses the API; b still reads the lease
        assert await _settle([b], within=5.0) is b
        await asyncio.sleep(0.05)  # let the 5 ms watcher record what _settle already saw
        took_over = min(t for t, who in seen if who == "b")
        # b must wait a full lease duration (rounded up to whole seconds) from the last renewal it saw.
        assert took_over - cut > FAST["lease_duration"] - FAST["retry_period"]
        assert _last_true(seen, "a") < took_over
        kube.clear_faults()
        await asyncio.sleep(0.6)  # a is back and must not snatch the lease back
        assert b.is_leader() and not a.is_leader()
        stop.set()
        watch_stop.set()
        await asyncio.gather(ta, tb, watcher)

    try:
        asyncio.run(scenario())
    finally:
        for c in clients:
            c.close()
    assert lease_obj(kube)["spec"]["leaseTransitions"] == 1


def test_run_fires_callbacks_gauge_and_releases_on_stop(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    reg = CollectorRegistry()
    events: list[str] = []
    e = LeaseElector(
        api,
        NS,
        LEASE,
        "solo",
        registry=reg,
        on_started_leading=lambda: events.append("started"),
        on_stopped_leading=lambda: events.append("stopped"),
        **FAST,
    )
    labels = {"lock": f"lease/{NS}/{LEASE}"}

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(e.run(stop))
        await asyncio.wait_for(e.leading.wait(), timeout=2)
        assert reg.get_sample_value("continuity_leader", labels) == 1
        await asyncio.sleep(0.5)  # a few renewals, no repeated "started"
        stop.set()
        await task

    asyncio.run(scenario())
    assert events == ["started", "stopped"]
    assert reg.get_sample_value("continuity_leader", labels) == 0
    assert lease_obj(kube)["spec"]["holderIdentity"] == ""


def test_format_microtime_keeps_six_digits_at_zero_microseconds() -> None:
    from datetime import UTC, datetime

    assert format_microtime(datetime(2026, 11, 24, 4, 30, tzinfo=UTC)) == "2026-11-24T04:30:00.000000Z"


# ---- file lock -------------------------------------------------------------------------------


def test_file_lock_one_winner_and_release_hands_over(tmp_path: Path) -> None:
    path = tmp_path / "leader.lock"
    a = FileLockElector(path, "a", registry=CollectorRegistry())
    b = FileLockElector(path, "b", registry=CollectorRegistry())

    async def scenario() -> None:
        assert await a.try_acquire_or_renew() is True
        assert await b.try_acquire_or_renew() is False
        assert await a.try_acquire_or_renew() is True  # renew keeps it
        assert json.loads(path.read_text())["identity"] == "a"
        await a.release()
        assert not a.is_leader()
        assert await b.try_acquire_or_renew() is True
        assert await a.try_acquire_or_renew() is False
        await b.release()

    asyncio.run(scenario())
    assert isinstance(a, Elector)


def test_file_lock_replaced_file_means_lost_leadership(tmp_path: Path) -> None:
    path = tmp_path / "leader.lock"
    a = FileLockElector(path, "a", registry=None)

    async def scenario() -> None:
        assert await a.try_acquire_or_renew()
        path.unlink()  # someone deleted it: a newcomer could now lock a fresh file here
        b = FileLockElector(path, "b", registry=None)
        assert await b.try_acquire_or_renew()
        assert await a.try_acquire_or_renew() is False
        assert not a.is_leader()
        await b.release()

    asyncio.run(scenario())


def test_file_lock_freed_when_holder_is_sigkilled(tmp_path: Path) -> None:
    path = tmp_path / "leader.lock"
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        e = FileLockElector(path, "parent", registry=None)
        assert asyncio.run(e.try_acquire_or_renew()) is False
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=5)
        assert child.returncode == -signal.SIGKILL
        assert asyncio.run(e.try_acquire_or_renew()) is True
        asyncio.run(e.release())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
