"""Nothing slow shares a thread pool with the lease: renewals stay on time while the default executor
and the playbook actions' pool are full of calls that do not come back (a five-minute Aurora wait).

Real parts: the real kubernetes client and LeaseElector against the fake API server, real threads
blocked on an event. The control case runs the same elector on the default executor and shows it
cannot even acquire the lease, so the first test would fail if the elector shared that pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controller.executors import ACTIONS, LEADER, Pool, run_in
from controller.leader import LeaseElector
from tests.fakes.kubeapi import FakeKubeAPI

NS = "continuity"
LEASE = "continuity-leader"
TIMING = {"lease_duration": 3.0, "renew_deadline": 2.0, "retry_period": 0.3}
WATCH = 3.0
"""Seconds the elector runs with both pools saturated: ten retry periods, more than a renew deadline."""


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


async def _saturated(gate: threading.Event) -> list[asyncio.Future[Any]]:
    """Fill a two-thread default executor and the whole ACTIONS pool with calls that block on `gate`,
    and prove both are full: a trivial call on either does not start within half a second."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2, thread_name_prefix="test-default"))
    blocked: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(asyncio.to_thread(gate.wait, 60)) for _ in range(4)
    ]
    blocked += [asyncio.ensure_future(run_in(ACTIONS, gate.wait, 60)) for _ in range(ACTIONS.max_workers + 4)]
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.to_thread(int), 0.5)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_in(ACTIONS, int), 0.5)
    return blocked


def _lead_for(kube: FakeKubeAPI, pool: Pool | None) -> list[bool]:
    """Run one elector on `pool` for WATCH seconds with the other pools saturated; is_leader() every
    50 ms."""
    api = kube.api_client()
    gate = threading.Event()
    elector = LeaseElector(api, NS, LEASE, "a", registry=CollectorRegistry(), pool=pool, **TIMING)

    async def scenario() -> list[bool]:
        blocked = await _saturated(gate)
        stop = asyncio.Event()
        task = asyncio.create_task(elector.run(stop))
        seen: list[bool] = []
        try:
            for _ in range(int(WATCH / 0.05)):
                await asyncio.sleep(0.05)
                seen.append(elector.is_leader())
        finally:
            stop.set()
            gate.set()
            await asyncio.gather(task, *blocked, return_exceptions=True)
        return seen

    try:
        return asyncio.run(scenario())
    finally:
        gate.set()
        api.close()


def test_lease_renewals_stay_on_time_while_default_and_actions_pools_are_saturated(kube: FakeKubeAPI) -> None:
    seen = _lead_for(kube, LEADER)
    first = seen.index(True)  # acquired, although no other pool had a free thread
    assert first * 0.05 < 1.5, f"acquired only after {first * 0.05:.2f} s"
    lost = [i for i, leading in enumerate(seen) if i > first and not leading]
    # Never missed the renew deadline: every renewal got a thread at once.
    assert not lost, f"stopped leading at {[round(i * 0.05, 2) for i in lost]} s"
    lease = kube.get_object("coordination.k8s.io", "v1", NS, "leases", LEASE)
    assert lease is not None and lease["spec"]["holderIdentity"] == ""  # released on the way out


def test_control_an_elector_on_the_default_executor_never_leads_while_it_is_saturated(
    kube: FakeKubeAPI,
) -> None:
    seen = _lead_for(kube, None)
    assert not any(seen)
    assert kube.get_object("coordination.k8s.io", "v1", NS, "leases", LEASE) is None  # never created


def test_pools_are_named_and_bounded() -> None:
    async def names() -> set[str]:
        return {
            await run_in(LEADER, lambda: threading.current_thread().name),
            await run_in(ACTIONS, lambda: threading.current_thread().name),
        }

    found = asyncio.run(names())
    assert {n.rsplit("_", 1)[0] for n in found} == {"continuity-leader", "continuity-actions"}
    assert LEADER.executor()._max_workers == LEADER.max_workers == 4
    assert ACTIONS.executor()._max_workers == ACTIONS.max_workers == 16
    with pytest.raises(ValueError, match="max_workers"):
        Pool("x", 0)
