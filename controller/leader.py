"""Leader election: only one Continuity replica may act (fail over, page, write incidents) at a time.

Two electors share one interface, :class:`Elector`:

- :class:`LeaseElector` uses a ``coordination.k8s.io/v1`` Lease, for replicas of a Kubernetes
  Deployment;
- :class:`FileLockElector` uses ``flock`` on a local file, for running on a laptop or one VM.

Why our own Lease elector rather than ``kubernetes.leaderelection`` from the client package
(read in the installed kubernetes 37.0.2):

- it judges expiry and the renew deadline with ``time.time()``, the wall clock, so an NTP step
  on either host can make a standby take over early or a leader believe it is still inside its
  deadline; client-go uses only the local monotonic clock and the time it *observed* a change;
- it has no "am I leader right now" check bounded by the renew deadline: the leader learns it
  lost only when ``renew_loop`` returns, and its API calls carry no request timeout, so one hung
  call can keep a partitioned leader "leading" past the point where a standby takes over;
- non-``ApiException`` errors (connection refused, urllib3 timeouts) escape ``try_acquire_or_renew``
  and kill the election thread;
- it does not release the lease on shutdown (a standby then waits a full lease duration), never
  increments ``leaseTransitions``, and ``LeaseLock`` builds its own ``CoordinationV1Api()`` from
  the global default configuration rather than an ``ApiClient`` we pass in;
- it is thread-based and its config ``sys.exit``\\ s on bad values and refuses retry periods under
  one second (which our fast tests need).

The algorithm is client-go's, in a small asyncio class over ``CoordinationV1Api``; the blocking
client calls run on the elector's own thread pool (``controller.executors.LEADER``, shared with
nothing slow) with a per-call timeout no longer than the retry period.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

import structlog
from kubernetes.client import ApiClient, CoordinationV1Api
from kubernetes.client.rest import ApiException
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from controller.executors import LEADER, Pool, run_in

log = structlog.get_logger(__name__)

T = TypeVar("T")

# client-go's JitterFactor: a candidate waits retry_period * [1, 1.2) between attempts so that
# standbys started together do not hammer the API in lockstep.
JITTER_FACTOR = 1.2

_gauges: weakref.WeakKeyDictionary[CollectorRegistry, Gauge] = weakref.WeakKeyDictionary()
_gauges_lock = threading.Lock()


def leader_gauge(registry: CollectorRegistry | None = REGISTRY) -> Gauge | None:
    """One ``continuity_leader`` gauge per registry: several electors (or test cases) in one process
    must not register the metric twice, which prometheus_client refuses."""
    if registry is None:
        return None
    with _gauges_lock:
        gauge = _gauges.get(registry)
        if gauge is None:
            gauge = Gauge(
                "continuity_leader",
                "1 when this replica holds the leadership lock and may act, else 0.",
                ["lock"],
                registry=registry,
            )
            _gauges[registry] = gauge
        return gauge


def format_microtime(moment: datetime) -> str:
    """Kubernetes MicroTime: always six fractional digits and ``Z``. ``datetime.isoformat()`` drops
    the fraction when microseconds are zero, which the API server rejects about once a million
    renewals — hence our own formatting instead of the client's serialiser."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@runtime_checkable
class Elector(Protocol):
    """What the controller needs from leader election, whichever lock backs it.

    ``is_leader()`` is checked before every action; ``leading`` lets a task wait for leadership;
    ``run()`` keeps the election going until ``stop_event`` is set and then releases.
    """

    identity: str
    leading: asyncio.Event

    def is_leader(self) -> bool: ...

    async def try_acquire_or_renew(self) -> bool: ...

    async def release(self) -> None: ...

    async def run(self, stop_event: asyncio.Event) -> None: ...


Callback = Callable[[], None]


class _LeadershipSignals:
    """Turns "is_leader() changed" into the gauge, the event, the callbacks and one log line, so both
    electors announce transitions identically and exactly once each."""

    def __init__(
        self,
        identity: str,
        lock_name: str,
        on_started_leading: Callback | None,
        on_stopped_leading: Callback | None,
        registry: CollectorRegistry | None,
    ) -> None:
        self.identity = identity
        self.leading = asyncio.Event()
        self._lock_name = lock_name
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._announced = False
        self._gauge = leader_gauge(registry)
        if self._gauge is not None:
            self._gauge.labels(lock=lock_name).set(0)
        self._log = log.bind(identity=identity, lock=lock_name)

    def is_leader(self) -> bool:
        raise NotImplementedError

    def _sync_leading(self) -> None:
        """Announce a change of ``is_leader()``. Callbacks are the controller's to keep cheap; one
        that raises is logged and does not stop the election loop."""
        now_leading = self.is_leader()
        if now_leading == self._announced:
            return
        self._announced = now_leading
        if self._gauge is not None:
            self._gauge.labels(lock=self._lock_name).set(1 if now_leading else 0)
        if now_leading:
            self.leading.set()
            self._log.info("leader.started_leading")
            callback = self._on_started
        else:
            self.leading.clear()
            self._log.warning("leader.stopped_leading")
            callback = self._on_stopped
        if callback is not None:
            try:
                callback()
            except Exception:
                self._log.exception("leader.callback_failed", started=now_leading)

    async def try_acquire_or_renew(self) -> bool:
        raise NotImplementedError

    async def release(self) -> None:
        raise NotImplementedError

    def _next_wait(self, retry_period: float) -> float:
        if self.is_leader():
            return retry_period
        return retry_period * random.uniform(1.0, JITTER_FACTOR)

    async def _run(self, stop_event: asyncio.Event, retry_period: float) -> None:
        """Attempt, wait a retry period (or until stopped), repeat; release on the way out, also when
        cancelled, so a standby need not wait out the lease after a clean shutdown."""
        try:
            while not stop_event.is_set():
                try:
                    await self.try_acquire_or_renew()
                except Exception:  # a bug in one attempt must not end the election
                    self._log.exception("leader.attempt_crashed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_event.wait(), timeout=self._next_wait(retry_period))
        finally:
            await self.release()


class LeaseElector(_LeadershipSignals):
    """Leader election on a Kubernetes Lease with client-go's semantics.

    Safety rests on three rules:

    - a candidate takes a held lease only after ``lease_duration`` (or the holder's own
      ``leaseDurationSeconds``, if longer) has passed on *its own monotonic clock* since it last saw
      the lease change; remote timestamps are for humans, never for expiry;
    - every write is a PUT at the resourceVersion just read, so of two candidates racing for an
      expired lease the API server lets exactly one through (the other gets 409);
    - the leader's ``is_leader()`` counts from the *start* of its last successful renewal and is
      False once ``renew_deadline`` has passed. Anyone else saw that renewal no earlier than it
      started, so their takeover comes at least ``lease_duration - renew_deadline`` after we stop.
      That assumes monotonic clocks tick at about the same rate, not that they agree.
    """

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        request_timeout: float | None = None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_started_leading: Callback | None = None,
        on_stopped_leading: Callback | None = None,
        registry: CollectorRegistry | None = REGISTRY,
        pool: Pool | None = LEADER,
    ) -> None:
        if not identity:
            raise ValueError("identity must not be empty: an empty holderIdentity means 'no leader'")
        if retry_period <= 0:
            raise ValueError(f"retry_period must be positive, got {retry_period}")
        if lease_duration <= renew_deadline:
            raise ValueError(
                f"lease_duration ({lease_duration}) must be greater than renew_deadline ({renew_deadline}):"
                " a leader must stop acting before its lease can expire elsewhere"
            )
        if renew_deadline <= JITTER_FACTOR * retry_period:
            raise ValueError(
                f"renew_deadline ({renew_deadline}) must be greater than {JITTER_FACTOR} * retry_period"
                f" ({retry_period}): the leader needs more than one attempt inside its deadline"
            )
        timeout = retry_period if request_timeout is None else request_timeout
        if not 0 < timeout <= retry_period:
            raise ValueError(f"request_timeout must be in (0, retry_period], got {timeout}")
        super().__init__(
            identity, f"lease/{namespace}/{name}", on_started_leading, on_stopped_leading, registry
        )
        self.namespace = namespace
        self.name = name
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.request_timeout = timeout
        self._pool = pool  # its own threads: a slow boto3 wait elsewhere never delays a renewal
        self._api = CoordinationV1Api(api_client)
        self._serialize = api_client.sanitize_for_serialization
        self._clock = clock
        self._wall_clock = wall_clock
        # What we last saw of the lease, and when (our monotonic clock) it last changed.
        self._observed: tuple[str, str, str] | None = None
        self._observed_at = 0.0
        self._observed_duration = 0.0
        # Start time (monotonic) of our last successful create/renew; None when not holding.
        self._renewed_at: float | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None

    # ---- public interface ------------------------------------------------------------------
    def is_leader(self) -> bool:
        return self._renewed_at is not None and self._clock() - self._renewed_at < self.renew_deadline

    async def try_acquire_or_renew(self) -> bool:
        """One election step: read the lease, then create, renew or take it over if allowed.

        Never raises for API trouble: every failure is logged and reported as False, and the
        caller simply tries again next period."""
        started = self._clock()
        try:
            won = await self._attempt(started)
        except ApiException as e:
            self._log.warning("leader.api_error", status=e.status, reason=_reason(e))
            won = False
        except Exception as e:  # timeouts, connection refused, bad payloads
            self._log.warning("leader.api_unreachable", error=f"{type(e).__name__}: {e}")
            won = False
        if won:
            self._renewed_at = started
        self._sync_leading()
        self._arm_deadline_timer()
        return won and self.is_leader()

    async def release(self) -> None:
        """Give the lease up so a standby takes over on its next attempt instead of waiting out the
        lease. We stop considering ourselves leader *before* the write: if the write fails, the
        lease simply expires as if we had crashed."""
        held = self._renewed_at is not None
        self._renewed_at = None
        self._sync_leading()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if not held:
            return
        try:
            lease = await self._call(self._api.read_namespaced_lease, self.name, self.namespace)
            body = self._serialize(lease)
            spec = body.setdefault("spec", {})
            if spec.get("holderIdentity") != self.identity:
                return
            now = format_microtime(self._wall_clock())
            spec.update(holderIdentity="", leaseDurationSeconds=1, acquireTime=now, renewTime=now)
            await self._call(self._api.replace_namespaced_lease, self.name, self.namespace, body)
            self._log.info("leader.released")
        except Exception as e:
            self._log.warning("leader.release_failed", error=f"{type(e).__name__}: {e}")

    async def run(self, stop_event: asyncio.Event) -> None:
        await self._run(stop_event, self.retry_period)

    # ---- internals -------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking client call off the event loop on the elector's own pool, bounded twice:
        urllib3 gets ``_request_timeout`` and we stop waiting at the same time even if the client
        retries."""
        return await asyncio.wait_for(
            run_in(self._pool, fn, *args, _request_timeout=self.request_timeout),
            timeout=self.request_timeout,
        )

    async def _attempt(self, started: float) -> bool:
        try:
            lease = await self._call(self._api.read_namespaced_lease, self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            return await self._create()

        body = self._serialize(lease)
        spec: dict[str, Any] = body.setdefault("spec", {}) or {}
        body["spec"] = spec
        holder = spec.get("holderIdentity") or ""
        # Observed *after* the read returned: a renewal we see may have been sent after `started`,
        # and dating our observation earlier would shorten the holder's lease.
        self._observe(holder, spec, body["metadata"].get("resourceVersion", ""), self._clock())

        now = format_microtime(self._wall_clock())
        if holder == self.identity:
            # Renewal: keep acquireTime and leaseTransitions as they are.
            acquire = _microtime_field(lease.spec.acquire_time if lease.spec else None) or now
            spec.update(acquireTime=acquire, renewTime=now, leaseDurationSeconds=self._lease_seconds())
        else:
            if self._renewed_at is not None:
                self._log.warning("leader.lease_taken", holder=holder)
                self._renewed_at = None
            if holder and self._clock() < self._observed_at + self._observed_duration:
                self._log.debug("leader.lease_held", holder=holder)
                return False
            spec.update(
                holderIdentity=self.identity,
                acquireTime=now,
                renewTime=now,
                leaseDurationSeconds=self._lease_seconds(),
                leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1,
            )
            self._log.info("leader.taking_over", previous=holder or None)

        try:
            updated = await self._call(self._api.replace_namespaced_lease, self.name, self.namespace, body)
        except ApiException as e:
            if e.status == 409:
                self._log.info("leader.lost_race", reason=_reason(e))
                return False
            raise
        self._observe_written(updated, started)
        return True

    async def _create(self) -> bool:
        now = format_microtime(self._wall_clock())
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self._lease_seconds(),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            created = await self._call(self._api.create_namespaced_lease, self.namespace, body)
        except ApiException as e:
            if e.status == 409:
                self._log.info("leader.lost_race", reason=_reason(e))
                return False
            raise
        self._log.info("leader.created_lease")
        self._observe_written(created, self._clock())
        return True

    def _lease_seconds(self) -> int:
        """The Lease field is whole seconds; round up so we never promise less than we honour."""
        return max(1, math.ceil(self.lease_duration))

    def _observe(self, holder: str, spec: dict[str, Any], resource_version: str, at: float) -> None:
        """Restart the expiry clock whenever the record changes. The holder's advertised duration is
        honoured if longer than ours, so a replica with shorter settings (say, mid rolling update)
        cannot take over while the holder still believes itself inside its deadline."""
        fingerprint = (holder, str(spec.get("renewTime")), resource_version)
        if fingerprint != self._observed:
            self._observed = fingerprint
            self._observed_at = at
        self._observed_duration = max(self.lease_duration, float(spec.get("leaseDurationSeconds") or 0))

    def _observe_written(self, lease: Any, at: float) -> None:
        spec = self._serialize(lease.spec) if lease.spec else {}
        self._observe(self.identity, spec, lease.metadata.resource_version or "", at)

    def _arm_deadline_timer(self) -> None:
        """Announce "stopped leading" the moment the renew deadline passes, even while the loop is
        stuck waiting on a slow API call; ``is_leader()`` is already False by then regardless."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if self._renewed_at is None or not self.is_leader():
            return
        remaining = self._renewed_at + self.renew_deadline - self._clock()
        self._deadline_timer = asyncio.get_running_loop().call_later(max(0.0, remaining), self._sync_leading)


class FileLockElector(_LeadershipSignals):
    """Leader election on one machine with ``flock``: the kernel drops the lock when the holder dies,
    however it dies, so there is no lease to expire and no deadline to keep.

    The lock file is never deleted: deleting it would let a newcomer lock a fresh inode at the same
    path while the old holder still locks the unlinked one. For the same reason the holder checks,
    on every renewal, that the path still names the inode it locked.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        identity: str,
        retry_period: float = 2.0,
        *,
        on_started_leading: Callback | None = None,
        on_stopped_leading: Callback | None = None,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.path = os.fspath(path)
        super().__init__(identity, f"file/{self.path}", on_started_leading, on_stopped_leading, registry)
        self.retry_period = retry_period
        self._fd: int | None = None

    def is_leader(self) -> bool:
        return self._fd is not None

    async def try_acquire_or_renew(self) -> bool:
        try:
            if self._fd is not None and not self._still_ours(self._fd):
                self._log.warning("leader.lock_file_replaced", path=self.path)
                self._close()
            if self._fd is None:
                self._fd = self._try_lock()
        except OSError as e:
            self._log.warning("leader.lock_error", path=self.path, error=f"{type(e).__name__}: {e}")
            self._close()
        self._sync_leading()
        return self._fd is not None

    async def release(self) -> None:
        if self._fd is not None:
            self._close()
            self._log.info("leader.released")
        self._sync_leading()

    async def run(self, stop_event: asyncio.Event) -> None:
        await self._run(stop_event, self.retry_period)

    def _try_lock(self) -> int | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if not self._still_ours(fd):  # replaced between open() and flock()
            os.close(fd)
            return None
        # For humans (`cat` the file to see who leads); not used for the decision.
        record = json.dumps({"identity": self.identity, "pid": os.getpid()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
        return fd

    def _still_ours(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _microtime_field(value: datetime | None) -> str | None:
    return format_microtime(value) if value is not None else None


def _reason(e: ApiException) -> str:
    """The Kubernetes Status ``reason`` (NotFound, Conflict, ...), falling back to the HTTP phrase
    when something in front of the API server answered with a non-Status body."""
    try:
        return str(json.loads(e.body or "")["reason"])
    except (TypeError, ValueError, KeyError):
        return str(e.reason)
