"""The store off the event loop (issue 11 item 3): the Kubernetes store's read cache, batched
timeline writes, and the loop staying responsive while the API server is slow or failing.

Everything runs the real kubernetes client against tests/fakes/kubeapi.py; faults are the fake's
`fail` and `delay`. Timing assertions are loose (a loaded 2-core machine): what they tell apart is a
loop that waited on the API (seconds) from one that did not (milliseconds)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from controller.config import load_config
from controller.loop import Controller
from controller.stores import Event, SQLiteStore, Store
from controller.stores.aio import AsyncStore, TimelineBatch
from controller.stores.kube import KubernetesStore
from tests.fakes.kubeapi import FakeKubeAPI

NS = "continuity"


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


def kstore(kube: FakeKubeAPI, **kw: Any) -> KubernetesStore:
    kw = {"request_timeout": 2.0, "attempts": 2, "backoff": 0.01, "max_backoff": 0.05, **kw}
    return KubernetesStore(kube.api_client(), NS, **kw)


def wait_resyncs(store: KubernetesStore, n: int = 2, limit: float = 10.0) -> None:
    """Wait until `n` more resyncs completed (so one started after the caller's write)."""
    target = store.resyncs + n
    end = time.monotonic() + limit
    while store.resyncs < target:
        assert time.monotonic() < end, "the read cache stopped resyncing"
        time.sleep(0.01)


# ---------------------------------------------------------------- the read cache


def test_cached_reads_make_no_api_call_and_see_our_own_writes_at_once(kube: FakeKubeAPI) -> None:
    s = kstore(kube, cache=True, resync=3600)  # no resync during the test: only write-through
    try:
        inc = s.open_incident("checkout", "critical", "down", 1.0, 1.0, {})
        s.set_flag("paused", "by alice")
        kube.clear_log()
        assert s.open_incident_for("checkout") == inc
        assert s.get_flag("paused") == "by alice"
        assert [i.id for i in s.list_incidents(status="open")] == [inc.id]
        assert s.failover_states() == {} and s.runs() == []
        assert kube.requests == []  # every read above came from memory
    finally:
        s.close()


def test_the_cache_sees_what_other_writers_did_after_a_resync(kube: FakeKubeAPI) -> None:
    """Another replica (or a human with kubectl) creates, changes and deletes objects: the cache
    follows within a resync, without any write of its own."""
    mine = kstore(kube, cache=True, resync=0.05)
    other = kstore(kube)
    try:
        inc = other.open_incident("checkout", "critical", "down", 1.0, 1.0, {})
        other.set_flag("paused", "by bob")
        other.transition_failover("checkout", 0, "failing_over", "RUN-1", inc.id, "down", 2.0)
        wait_resyncs(mine)
        assert mine.open_incident_for("checkout") == inc
        assert mine.get_flag("paused") == "by bob"
        assert mine.failover_states()["checkout"].state == "failing_over"

        other.update_incident(inc.id, status="resolved", resolved_at=3.0)
        other.set_flag("paused", None)
        kube.delete_object("continuity.dev", "v1alpha1", NS, "failoverstates", "checkout")
        wait_resyncs(mine)
        assert mine.open_incident_for("checkout") is None
        assert mine.get_flag("paused") is None
        assert mine.failover_states() == {}
    finally:
        mine.close()
        other.close()


def test_a_stale_cache_never_wins_a_compare_and_swap(kube: FakeKubeAPI) -> None:
    """Writes are checked by the server (resourceVersion), not by the cache: a copy that missed
    another writer's change costs a 409 and a fresh read, never an overwrite."""
    mine = kstore(kube, cache=True, resync=3600)
    other = kstore(kube)
    try:
        mine.transition_failover("checkout", 0, "failing_over", "RUN-1", None, "down", 1.0)
        run = mine.create_run("failover", None, "checkout", False, 1.0, ["a"])
        assert other.transition_failover("checkout", 1, "failed_over", "RUN-1", None, "done", 2.0)
        assert other.claim_run(run.id, "B", None)
        # The cache still says version 1 and no owner; the server says otherwise.
        assert mine.transition_failover("checkout", 1, "failover_failed", "RUN-1", None, "late", 3.0) is None
        assert not mine.claim_run(run.id, "A", None)
        assert mine.get_run(run.id).owner == "B"  # type: ignore[union-attr]  # re-read after the 409
        mine.set_flag("x", "1")  # a write to a stale copy of another object still lands
        assert other.get_flag("x") == "1"
    finally:
        mine.close()
        other.close()


def test_reads_keep_answering_from_memory_while_the_api_is_down(kube: FakeKubeAPI) -> None:
    s = kstore(kube, cache=True, resync=0.05)
    try:
        inc = s.open_incident("checkout", "critical", "down", 1.0, 1.0, {})
        kube.fail(503)
        wait_resyncs(s, 0)
        time.sleep(0.2)  # resyncs fail meanwhile
        assert s.open_incident_for("checkout") == inc
        assert s.get_flag("paused") is None
        kube.clear_faults()
    finally:
        s.close()


# ---------------------------------------------------------------- batched timeline writes


@pytest.fixture(params=["sqlite", "kubernetes"])
def store(request: pytest.FixtureRequest, tmp_path: Path, kube: FakeKubeAPI) -> Iterator[Store]:
    s: Store = SQLiteStore(tmp_path) if request.param == "sqlite" else kstore(kube)
    yield s
    s.close()


def test_append_many_writes_every_entry_in_order(store: Store) -> None:
    a = store.open_incident("checkout", "critical", "down", 1.0, 1.0, {})
    b = store.open_incident("login", "critical", "down", 1.0, 1.0, {})
    store.append(a.id, 1.0, "probe", "first")
    store.append_many(
        [
            Event(a.id, 2.0, "decision", "second", {"k": 1}),
            Event(b.id, 2.0, "probe", "other"),
            Event(a.id, 2.0, "notification", "third"),
        ]
    )
    assert [(e.ts, e.message) for e in store.timeline(a.id)] == [
        (1.0, "first"),
        (2.0, "second"),
        (2.0, "third"),
    ]
    assert store.timeline(a.id)[1].data == {"k": 1}
    assert [e.message for e in store.timeline(b.id)] == ["other"]


def test_a_flush_is_one_write_per_incident(kube: FakeKubeAPI) -> None:
    s = kstore(kube)
    batch = TimelineBatch(s, pool=None)
    try:
        inc = s.open_incident("checkout", "critical", "down", 1.0, 1.0, {})
        for i in range(20):
            batch.add(inc.id, float(i), "probe", f"entry {i}", None)
        kube.clear_log()
        assert asyncio.run(batch.flush()) == 20
        assert [m for m, _ in kube.requests] == ["GET", "PUT"]
        assert [e.message for e in s.timeline(inc.id)] == [f"entry {i}" for i in range(20)]
    finally:
        s.close()


def test_a_failed_flush_loses_nothing_and_the_next_one_writes_it_all(kube: FakeKubeAPI) -> None:
    s = kstore(kube)
    batch = TimelineBatch(s, pool=None)
    try:
        inc = s.open_incident("checkout", "critical", "down", 1.0, 1.0, {})

        async def scenario() -> None:
            batch.add(inc.id, 1.0, "probe", "one", None)
            batch.add(inc.id, 2.0, "decision", "two", None)
            kube.fail(503)
            assert await batch.flush() == 0
            assert [e.message for e in batch.pending()] == ["one", "two"]
            batch.add(inc.id, 3.0, "notification", "three", None)  # queued while the store is sick
            assert await batch.flush() == 0
            kube.clear_faults()
            assert await batch.flush() == 3

        asyncio.run(scenario())
        assert batch.failures == 2 and batch.pending() == []
        assert [e.message for e in s.timeline(inc.id)] == ["one", "two", "three"]
    finally:
        s.close()


def test_stop_flushes_what_is_queued_retrying_through_a_short_outage(kube: FakeKubeAPI) -> None:
    s = kstore(kube)
    astore = AsyncStore(s, pool=None)
    try:
        inc = s.open_incident("checkout", "critical", "down", 1.0, 1.0, {})

        async def scenario() -> bool:
            astore.append(inc.id, 1.0, "probe", "queued before stop")
            assert [e.message for e in await astore.timeline(inc.id)] == ["queued before stop"]
            kube.fail(503, seconds=0.3)
            return await astore.close()

        assert asyncio.run(scenario()) is True
        assert [e.message for e in s.timeline(inc.id)] == ["queued before stop"]
    finally:
        s.close()


def test_a_full_batch_flushes_without_waiting_for_the_tick(kube: FakeKubeAPI) -> None:
    s = kstore(kube)
    batch = TimelineBatch(s, pool=None, flush_at=5)
    try:
        inc = s.open_incident("checkout", "critical", "down", 1.0, 1.0, {})

        async def scenario() -> None:
            for i in range(5):
                batch.add(inc.id, float(i), "probe", f"e{i}", None)
            for _ in range(200):
                if not batch.pending():
                    return
                await asyncio.sleep(0.01)

        asyncio.run(scenario())
        assert len(s.timeline(inc.id)) == 5
    finally:
        s.close()


def test_the_batching_view_queues_appends_and_deferred_flags_survive_an_error(kube: FakeKubeAPI) -> None:
    """What effects and runs are handed: `append` costs no API call, `timeline` already shows the
    queued entry; a deferred flag (a heartbeat) whose write failed is written by the next flush,
    and only its latest value."""
    s = kstore(kube)
    astore = AsyncStore(s, pool=None)
    view = astore.batching
    try:
        inc = s.open_incident("checkout", "critical", "down", 1.0, 1.0, {})
        kube.clear_log()
        view.append(inc.id, 2.0, "decision", "queued")
        assert kube.requests == []
        assert [e.message for e in view.timeline(inc.id)] == ["queued"]

        async def scenario() -> None:
            kube.fail(503)
            astore.defer_flag("heartbeat:job", "1.0")
            await astore.flush()
            assert astore.deferred_flags() == {"heartbeat:job": "1.0"}
            assert [e.message for e in astore.batch.pending()] == ["queued"]
            astore.defer_flag("heartbeat:job", "2.0")
            kube.clear_faults()
            await astore.flush()

        asyncio.run(scenario())
        assert astore.deferred_flags() == {} and astore.batch.pending() == []
        assert s.get_flag("heartbeat:job") == "2.0"
        assert [e.message for e in s.timeline(inc.id)] == ["queued"]
    finally:
        s.close()


# ---------------------------------------------------------------- the loop stays free


async def _max_lag(work: Any) -> tuple[float, Any]:
    """Run `work` while a 10 ms ticker measures how late the loop wakes it; (worst lag, result)."""
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    tick = asyncio.create_task(ticker())
    try:
        result = await work
    finally:
        done.set()
        await tick
    return max(lags, default=0.0), result


def test_a_slow_or_failing_api_server_does_not_stall_the_loop(kube: FakeKubeAPI) -> None:
    """Each call held 0.3 s, then every call failing with retries: the awaiting coroutine waits
    seconds, the loop never more than a fraction of one."""
    s = kstore(kube, attempts=3, backoff=0.2, max_backoff=0.5)
    astore = AsyncStore(s)
    try:
        inc = s.open_incident("checkout", "critical", "down", 1.0, 1.0, {})

        async def slow() -> None:
            await astore.update_incident(inc.id, severity="moderate")
            await astore.set_flag("paused", "x")

        async def failing() -> None:
            with pytest.raises(Exception, match="failed after 3 attempts"):
                await astore.get_incident(inc.id)
            astore.append(inc.id, 1.0, "probe", "kept")
            await astore.flush()

        kube.delay(0.3)
        began = time.monotonic()
        lag, _ = asyncio.run(_max_lag(slow()))
        assert time.monotonic() - began >= 0.6  # the calls really were slow (two GET+PUT at 0.3 s)
        assert lag < 0.4, f"the loop stalled {lag:.2f} s behind a slow API call"
        kube.delay(0)
        kube.fail(503)
        lag, _ = asyncio.run(_max_lag(failing()))
        assert lag < 0.4, f"the loop stalled {lag:.2f} s behind a failing API call"
        assert [e.message for e in astore.batch.pending()] == ["kept"]
    finally:
        kube.clear_faults()
        s.close()


class _Target(BaseHTTPRequestHandler):
    """200, or 500 on the paths the test lists in `failing`."""

    failing: set[str] = set()

    def do_GET(self) -> None:
        self.send_response(500 if self.path in self.failing else 200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_controller_keeps_probing_on_time_through_an_api_brownout(
    kube: FakeKubeAPI, tmp_path: Path
) -> None:
    """The real Controller on the cached Kubernetes store. Every API call fails for 2 s (each store
    call retrying for about a second and a half) while one service goes down, so the controller has
    an incident to write: the loop is never late by more than a few hundred milliseconds, no result
    of the healthy service's probes fails, and the incident is opened once the API is back."""
    target = ThreadingHTTPServer(("127.0.0.1", 0), _Target)
    threading.Thread(target=target.serve_forever, args=(0.05,), daemon=True).start()
    port = target.server_address[1]
    probes = "".join(
        f'\n  {n}: {{kind: http, url: "http://127.0.0.1:{port}/{n}", interval: 200ms, timeout: 500ms}}'
        for n in ("ok0", "ok1", "down0", "down1")
    )
    path = tmp_path / "c.yaml"
    path.write_text(
        "services:\n  shop: {tier: critical, rto: 5m, probes: [down0, down1]}\n"
        "  other: {tier: critical, rto: 5m, probes: [ok0, ok1]}\n"
        f"probes:{probes}\n"
        "detection: {failure_threshold: 2, success_threshold: 2}\n"
        f'controller: {{tick: 200ms, data_dir: "{tmp_path}"}}\n'
    )
    cfg = load_config(path)
    store = kstore(kube, cache=True, resync=0.2, attempts=4, backoff=0.25, max_backoff=1.0)
    failed: list[str] = []

    async def scenario() -> tuple[float, float | None]:
        c = Controller(cfg, store)
        inner = c.detection.ingest

        def ingest(result: Any) -> None:
            if not result.ok and result.probe.startswith("ok"):
                failed.append(f"{result.probe}: {result.error or result.prober_error}")
            inner(result)

        c.detection.ingest = ingest  # type: ignore[method-assign]
        await c.start()
        try:
            for _ in range(100):
                if all(c.detection.probe_healthy(n) for n in ("ok0", "ok1", "down0", "down1")):
                    break
                await asyncio.sleep(0.05)
            kube.fail(503, seconds=2.0)
            _Target.failing.update({"/down0", "/down1"})
            lag, _ = await _max_lag(asyncio.sleep(2.0))
            ended = time.monotonic()
            for _ in range(200):
                if await asyncio.to_thread(store.open_incident_for, "shop") is not None:
                    return lag, time.monotonic() - ended
                await asyncio.sleep(0.05)
            return lag, None
        finally:
            _Target.failing.clear()
            await c.stop()

    try:
        lag, opened_after = asyncio.run(scenario())
    finally:
        target.shutdown()
        store.close()
    assert lag < 0.3, f"the loop stalled {lag:.2f} s during the brownout"
    assert failed == []
    assert opened_after is not None and opened_after < 5.0, opened_after


# ---------------------------------------------------------------- a held call holds nothing else


def _hold_first(method: str, path_part: str) -> Any:
    """A `delay` match holding only the first request of `method` to a path containing `path_part`."""
    seen: list[str] = []

    def match(m: str, path: str) -> bool:
        if m == method and path_part in path and not seen:
            seen.append(path)
            return True
        return False

    return match


def test_a_held_call_on_one_object_is_abandoned_and_retried(kube: FakeKubeAPI) -> None:
    """A hung API server holds a create for 3 s: the store gives up on it after `object_timeout` and
    retries, so the incident is written (once) long before the held request would have answered."""
    s = kstore(kube, request_timeout=5.0, object_timeout=0.3, attempts=4, backoff=0.05, max_backoff=0.1)
    try:
        kube.delay(3.0, match=_hold_first("POST", "/incidents"))
        began = time.monotonic()
        inc = s.open_incident("checkout", "critical", "down", 1.0, 1.0, {})
        took = time.monotonic() - began
        assert took < 2.0, f"the held create held the caller {took:.1f} s"
        time.sleep(3.2)  # the held request lands now, and is refused: the object exists
        assert [i.id for i in s.list_incidents()] == [inc.id]
    finally:
        kube.delay(0)
        s.close()


def test_a_retried_failover_transition_whose_first_attempt_landed_is_ours(kube: FakeKubeAPI) -> None:
    """The first PUT of a transition is held past the client's timeout but lands before the retry:
    the retry's 409 re-reads the state, finds its own transition, and reports it won (a compare-and-
    swap lost to ourselves would stall the failover)."""
    s = kstore(kube, request_timeout=5.0, object_timeout=0.3, attempts=3, backoff=0.6, max_backoff=0.6)
    try:
        first = s.transition_failover("shop", 0, "failing_over", "RUN-1", "INC-1", "down", 10.0)
        assert first is not None
        kube.delay(0.5, match=_hold_first("PUT", "/failoverstates/"))
        won = s.transition_failover("shop", first.version, "failed_over", "RUN-1", "INC-1", "done", 20.0)
        assert won is not None and won.state == "failed_over" and won.version == first.version + 1
        assert s.failover_states()["shop"] == won
        # Another writer's transition is still a lost compare-and-swap.
        assert s.transition_failover("shop", first.version, "primary", None, None, "late", 30.0) is None
    finally:
        kube.delay(0)
        s.close()


def test_a_held_timeline_write_does_not_hold_the_tick(kube: FakeKubeAPI, tmp_path: Path) -> None:
    """The tick's timeline flush is held by the API server for 3 s: the reconcile returns after at
    most FLUSH_WAIT, the next one does not wait on it again, and the entries are written when the
    write gets through, none lost and none twice."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "services:\n  shop: {tier: critical, rto: 5m, probes: [p]}\n"
        'probes:\n  p: {kind: http, url: "http://127.0.0.1:9/", interval: 10s, timeout: 1s}\n'
        f'controller: {{data_dir: "{tmp_path}"}}\n'
        # The communicator's own incident writes are synchronous (controller/comms): not this test's.
        "communications: {enabled: false}\n"
    )
    cfg = load_config(path)
    store = kstore(kube, cache=True, resync=3600, request_timeout=5.0, object_timeout=5.0)

    async def scenario() -> tuple[float, float, list[str]]:
        c = Controller(cfg, store)
        inc = await c.astore.open_incident("shop", "critical", "down", 1.0, 1.0, {})
        c.store.append(inc.id, 2.0, "note", "first")
        kube.delay(3.0, match=_hold_first("PUT", "/incidents/"))
        began = time.monotonic()
        await c.reconcile()
        first = time.monotonic() - began
        c.store.append(inc.id, 3.0, "note", "second")
        began = time.monotonic()
        await c.reconcile()
        second = time.monotonic() - began
        await c.astore.close()  # waits for the held flush, then writes what is left
        return first, second, [e.message for e in await asyncio.to_thread(store.timeline, inc.id)]

    try:
        first, second, messages = asyncio.run(scenario())
    finally:
        kube.delay(0)
        store.close()
    assert first < 2.0, f"the tick waited {first:.1f} s on a held timeline write"
    assert second < 1.0, f"the next tick waited {second:.1f} s on it again"
    assert [m for m in messages if m in ("first", "second")] == ["first", "second"]
