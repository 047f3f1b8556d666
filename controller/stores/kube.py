"""The state store as Kubernetes objects, so that a new leader resumes exactly where the old one stopped.

`KubernetesStore` implements the same `Store` protocol as `SQLiteStore`, with the same results (a
contract test suite runs the same assertions against both). Everything is a namespaced object of
group ``continuity.dev/v1alpha1`` and readable with ``kubectl get incidents,playbookruns,...``:

- **Incident** (one per incident). Name: the id lowercased (``INC-20261124-ab12cd`` ->
  ``inc-20261124-ab12cd``, DNS-1123); the original id is ``spec.id`` and the ``continuity.dev/id``
  label. Labels ``continuity.dev/service`` and ``continuity.dev/status`` make
  ``open_incident_for(service)`` one label-selector list. Times are RFC 3339 (``openedAt``,
  ``startedAt``, ``resolvedAt``) for humans and printer columns, and also kept as the exact floats
  the controller recorded in ``spec.epoch`` (RFC 3339 with microseconds would round them; the
  floats feed cooldowns and durations). ``publicStatus`` is ``investigating`` while open and
  ``resolved`` after, unless ``data.public_status`` says otherwise.
- **The timeline** lives in the Incident, ``spec.timeline``, kept sorted by (ts, insertion seq)
  as ``timeline()`` returns it. It is capped at ``TIMELINE_CAP`` (500) entries: beyond that the
  *oldest* entries are dropped and counted in ``spec.timelineDropped``, so the object stays well
  under etcd's 1.5 MiB object limit (an entry is typically < 1 KiB). Why not overflow into
  numbered ConfigMaps: it would need write access to every ConfigMap in the namespace (the chart's
  Role grants only read of its own) and a multi-object write that can half-fail; 500 entries is
  far more than an incident's useful story (probe entries are written only on verdict changes).
  Dropping is therefore the documented, visible trade-off: ``kubectl get inc X -o yaml`` shows
  the count.
- **PlaybookRun** (one per run): name the run id lowercased; ``spec.steps`` is the step journal
  ``[{idx, name, state, attempts, startedAt, endedAt, detail}]``; ``spec.step`` names the current
  step for the printer column.
- **OutboxMessage** (one per message, a kind added for this store): the name is
  ``msg-`` + sha256 of the idempotency key, so a second ``enqueue`` of the same key is a 409
  AlreadyExists from the server itself, atomically, with no read-then-write race.
- **ContinuityState** (one object, ``continuity``): the flags (``spec.flags``, a map) and the
  outbox id counter (``spec.outboxSeq``). A third kind rather than ConfigMaps because the chart's
  Role then needs only ``continuity.dev`` resources; write access to ConfigMaps would reach every
  ConfigMap in the namespace.

**Outbox message ids stay ints**, as in SQLite: `controller.notify.outbox` passes ``msg.id`` back
to ``delivered``/``retry_later``/``give_up`` and humans see it in ``continuity outbox``. The id is
a monotonic counter: ``enqueue`` increments ``ContinuityState.spec.outboxSeq`` (optimistic
concurrency, so two writers never get the same number) and stores it in ``spec.id`` and the
``continuity.dev/outbox-id`` label; ``due`` orders by it, which is creation order, exactly like
SQLite's AUTOINCREMENT. A crash between the increment and the create leaves a gap, which is
harmless. (A stable int derived from the name hash would need no counter but could not give
creation order: ``creationTimestamp`` has one-second resolution.)

**Concurrency.** Every write to an existing object is read-modify-write: GET, apply the change,
PUT (replace) carrying the read ``resourceVersion``; a 409 Conflict means someone wrote in
between, so re-read and re-apply, up to ``CONFLICT_RETRIES`` (8) times with a short jittered
pause, then `StoreError`. Two appends to one timeline from two threads therefore both land.
Within one store instance, writes to the same object also take a per-object lock, so the
controller's own threads never conflict with each other; 409s then only come from another
replica (a leader handover) or a human's ``kubectl edit``.

**Failures.** 5xx, 429, timeouts and connection errors are retried with exponential backoff
(tenacity) a few times; then, as for any other API error, a `StoreError` naming the API call is
raised. No ``ApiException`` leaves this module. The methods are synchronous, like SQLiteStore's:
every call carries ``_request_timeout`` (``object_timeout``, 2 s, for a call on one object;
``request_timeout``, 5 s, for a list) so a hung API server cannot hang the caller for longer than
``attempts * (timeout + backoff)``, and a held write is retried 2 s after it was sent.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
import urllib3
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.rest import ApiException
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from controller.stores.model import (
    FAILOVER_STATES,
    Event,
    FailoverRecord,
    Incident,
    OutboxMessage,
    Run,
    StepRecord,
    StoreError,
    new_id,
    new_incident,
)

log = structlog.get_logger(__name__)

GROUP = "continuity.dev"
VERSION = "v1alpha1"
INCIDENTS = "incidents"
RUNS = "playbookruns"
OUTBOX = "outboxmessages"
STATES = "continuitystates"
STATE_NAME = "continuity"
FAILOVERS = "failoverstates"

TIMELINE_CAP = 500
CONFLICT_RETRIES = 8

L_ID = "continuity.dev/id"
L_SERVICE = "continuity.dev/service"
L_STATUS = "continuity.dev/status"
L_PLAYBOOK = "continuity.dev/playbook"
L_INCIDENT = "continuity.dev/incident"
L_CHANNEL = "continuity.dev/channel"
L_STATE = "continuity.dev/state"
L_OUTBOX_ID = "continuity.dev/outbox-id"
MANAGED = {"app.kubernetes.io/managed-by": "continuity"}

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

T = TypeVar("T")

# Python field -> (spec field, is a time). Times are written as RFC 3339 and as exact epoch floats.
_INCIDENT_FIELDS = {
    "severity": ("severity", False),
    "status": ("status", False),
    "title": ("title", False),
    "resolved_at": ("resolvedAt", True),
    "data": ("data", False),
}
_RUN_FIELDS = {
    "playbook": ("playbook", False),
    "incident_id": ("incident", False),
    "service": ("service", False),
    "state": ("state", False),
    "dry_run": ("dryRun", False),
    "started_at": ("startedAt", True),
    "ended_at": ("endedAt", True),
    "error": ("error", False),
    "owner": ("owner", False),
}
_STEP_FIELDS = {
    "name": ("name", False),
    "state": ("state", False),
    "attempts": ("attempts", False),
    "started_at": ("startedAt", True),
    "ended_at": ("endedAt", True),
    "detail": ("detail", False),
}


def rfc3339(ts: float) -> str:
    """RFC 3339 in UTC with microseconds, as ``kubectl`` and the printer columns read it."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _from_rfc3339(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def object_name(id_: str) -> str:
    """A DNS-1123 name for one of our ids (``INC-20261124-ab12cd`` -> ``inc-20261124-ab12cd``)."""
    name = re.sub(r"[^a-z0-9.-]", "-", id_.lower()).strip("-.")
    if not name or len(name) > 253:
        raise ValueError(f"{id_!r} cannot be made a Kubernetes object name")
    return name


def label_value(value: str) -> str:
    """The value itself when it is a valid label value; otherwise a stable hash of it. Lookups by
    label are always re-checked against the spec, so a hashed value only costs readability."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    return "h-" + hashlib.sha256(value.encode()).hexdigest()[:40]


def failover_name(service: str) -> str:
    """The FailoverState object of a service: its name when that is a DNS-1123 name, else a hash."""
    if len(service) <= 253 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", service):
        return service
    return "svc-" + hashlib.sha256(service.encode()).hexdigest()[:40]


def outbox_name(key: str) -> str:
    return "msg-" + hashlib.sha256(key.encode()).hexdigest()


CACHED = (INCIDENTS, RUNS, OUTBOX, STATES, FAILOVERS)
"""Every kind the store keeps, all of which the read cache holds when it is on."""


def _rv(obj: dict[str, Any]) -> int:
    """An object's (or a list's) resourceVersion as a number. Kubernetes calls it opaque; etcd's
    revisions are integers in practice, and comparing them only decides which of two copies of the
    same object the cache keeps (a wrong guess costs a 409 and a fresh read, never a lost write)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def _label_test(key: str, value: str, negate: bool, labels: dict[str, str]) -> bool:
    return (labels.get(key) == value) != negate


def _selector(text: str) -> list[Callable[[dict[str, str]], bool]]:
    """The label selectors this module writes (``k=v``, ``k==v``, ``k!=v``, comma-joined) as tests."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        negate = "!=" in term
        key, value = (part.strip() for part in term.replace("!=", "=").replace("==", "=").split("=", 1))
        tests.append(functools.partial(_label_test, key, value, negate))
    return tests


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status == 0 or exc.status is None or exc.status == 429 or exc.status >= 500
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError | TimeoutError)


def _reason(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("reason") or exc.reason or "")
    except (ValueError, AttributeError):
        return str(exc.reason or "")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {_reason(exc)}".strip()
    return f"{type(exc).__name__}: {exc}"


def _spec_time(spec: dict[str, Any], field: str) -> float | None:
    exact = (spec.get("epoch") or {}).get(field)
    if exact is not None:
        return float(exact)
    text = spec.get(field)
    return _from_rfc3339(text) if text else None


def _set(spec: dict[str, Any], field: str, value: Any, is_time: bool) -> None:
    """Set a spec field, omitting it when None (a real API server prunes nulls not declared
    nullable); times go in twice, RFC 3339 for humans and the exact float under ``epoch``."""
    if is_time:
        epoch = spec.setdefault("epoch", {})
        if value is None:
            spec.pop(field, None)
            epoch.pop(field, None)
        else:
            spec[field] = rfc3339(value)
            epoch[field] = float(value)
    elif value is None:
        spec.pop(field, None)
    else:
        spec[field] = value


def _guarded(fn: Callable[..., T]) -> Callable[..., T]:
    """Last line of defence: no ApiException (nor urllib3 error) escapes a Store method."""

    @functools.wraps(fn)
    def wrapper(self: KubernetesStore, *args: Any, **kwargs: Any) -> T:
        try:
            return fn(self, *args, **kwargs)
        except StoreError:
            raise
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreError(
                f"Kubernetes API ({self._where}): {fn.__name__} failed: {_describe(exc)}"
            ) from None

    return wrapper


def _object(what: str, answer: object) -> dict[str, Any]:
    """The client types custom objects as `object`; a JSON object is what the API server sends."""
    if not isinstance(answer, dict):
        raise StoreError(f"kubernetes store: {what}: expected a JSON object, got {type(answer).__name__}")
    return answer


class KubernetesStore:
    """The `Store` protocol on Kubernetes custom objects in one namespace (see the module doc)."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        *,
        request_timeout: float = 5.0,
        object_timeout: float = 2.0,
        attempts: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 2.0,
        timeline_cap: int = TIMELINE_CAP,
        cache: bool = False,
        resync: float = 1.0,
    ) -> None:
        self.api = CustomObjectsApi(api_client)
        self._client = api_client
        self.namespace = namespace
        self.request_timeout = request_timeout
        """Per attempt of a LIST (it may carry many objects)."""
        self.object_timeout = min(object_timeout, request_timeout)
        """Per attempt of a call on one object (get, create, replace): the API server's own goal for
        these is 1 s at p99. A call the server holds longer is abandoned and retried, so a held
        write (a hung API server) delays an incident, and its page, by this much past the hang's
        end, not by `request_timeout`."""
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeline_cap = timeline_cap
        self._where = f"{api_client.configuration.host}, namespace {namespace}"
        self._outbox_names: dict[int, str] = {}  # id -> object name; immutable once created
        self._lock = threading.Lock()
        self._object_locks: dict[tuple[str, str], threading.Lock] = {}
        # The read cache (see "Reads" in the module doc): plural -> name -> object as last seen.
        self.caching = cache
        self.resync = resync
        self._cache: dict[str, dict[str, dict[str, Any]]] = {}
        self._synced: set[str] = set()
        self._cache_lock = threading.Lock()
        self._stop_sync = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self.resyncs = 0
        """Completed resyncs of every kind (tests wait on it)."""
        if cache:
            try:
                self.sync()
            except StoreError as exc:  # reads go to the API until a resync succeeds
                log.warning("kubernetes store: first sync of the read cache failed", error=str(exc))
            self._sync_thread = threading.Thread(
                target=self._sync_loop, name="continuity-store-sync", daemon=True
            )
            self._sync_thread.start()

    def close(self) -> None:
        self._stop_sync.set()
        if self._sync_thread is not None:
            self._sync_thread.join(timeout=self.request_timeout + 1)
        self._client.close()

    # ---------------------------------------------------------------- the read cache

    def sync(self) -> None:
        """List every kind once and merge what came back into the cache: objects other writers
        created or changed since the last resync appear, objects they deleted go. An object this
        store wrote after the list was served (a higher resourceVersion) is kept as written."""
        for plural in CACHED:
            items, list_rv = self._list_api(plural)
            with self._cache_lock:
                current = self._cache.setdefault(plural, {})
                listed = {o["metadata"]["name"]: o for o in items}
                for name, obj in listed.items():
                    held = current.get(name)
                    if held is None or _rv(held) <= _rv(obj):
                        current[name] = obj
                for name in [n for n in current if n not in listed]:
                    if _rv(current[name]) <= list_rv:
                        del current[name]
                self._synced.add(plural)
        self.resyncs += 1

    def _sync_loop(self) -> None:
        while not self._stop_sync.wait(self.resync):
            try:
                self.sync()
            except Exception as exc:  # a sick API server: keep serving what we have, try again
                log.debug("kubernetes store: resync failed", error=f"{type(exc).__name__}: {exc}")

    def _cached(self, plural: str) -> bool:
        return self.caching and plural in self._synced

    def _remember(self, plural: str, obj: object) -> None:
        """Write-through: what the API server answered to our own create or replace."""
        if not self.caching or not isinstance(obj, dict) or "metadata" not in obj:
            return
        name = obj["metadata"].get("name")
        with self._cache_lock:
            current = self._cache.setdefault(plural, {})
            held = current.get(name)
            if held is None or _rv(held) <= _rv(obj):
                current[name] = obj

    def _forget(self, plural: str, name: str) -> None:
        if self.caching:
            with self._cache_lock:
                self._cache.get(plural, {}).pop(name, None)

    # ---------------------------------------------------------------- API plumbing

    def _call(
        self, what: str, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> T:
        """One API call with a request timeout (`timeout`, else `object_timeout`), retried with backoff
        on 5xx/429/timeouts/connection errors; after the last attempt, a StoreError naming the call.
        Other ApiExceptions (404, 409, 422...) go to the caller, which knows what they mean."""
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=self.backoff, max=self.max_backoff),
            reraise=True,
        )
        try:
            return retrying(fn, *args, _request_timeout=timeout or self.object_timeout, **kwargs)
        except Exception as exc:
            if _retryable(exc):
                raise StoreError(
                    f"Kubernetes API ({self._where}): {what} failed after {self.attempts} attempts: "
                    f"{_describe(exc)}"
                ) from None
            raise

    def _get(self, plural: str, name: str, fresh: bool = False) -> dict[str, Any] | None:
        """One object (a deep copy: callers change it in place), from the cache unless `fresh`."""
        if not fresh and self._cached(plural):
            with self._cache_lock:
                held = self._cache[plural].get(name)
            return copy.deepcopy(held) if held is not None else None
        try:
            found = self._call(
                f"get {plural}/{name}",
                self.api.get_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                plural,
                name,
            )
        except ApiException as exc:
            if exc.status == 404:
                self._forget(plural, name)
                return None
            raise
        obj = _object(f"get {plural}/{name}", found)
        self._remember(plural, obj)
        return obj

    def _list(self, plural: str, selector: dict[str, str] | str | None = None) -> list[dict[str, Any]]:
        """Objects matching a label selector, from the cache when it holds the kind. Cached objects
        are shared, not copied: callers only read them (the converters copy what they keep)."""
        if isinstance(selector, dict):
            selector = ",".join(f"{k}={v}" for k, v in selector.items())
        if self._cached(plural):
            wanted = _selector(selector or "")
            with self._cache_lock:
                held = list(self._cache[plural].values())
            return [
                o for o in held if all(test((o.get("metadata") or {}).get("labels") or {}) for test in wanted)
            ]
        return self._list_api(plural, selector)[0]

    def _list_api(self, plural: str, selector: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """A LIST from the API server: the items and the list's resourceVersion."""
        kwargs = {"label_selector": selector} if selector else {}
        result = self._call(
            f"list {plural}",
            self.api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            plural,
            timeout=self.request_timeout,
            **kwargs,
        )
        answer = _object(f"list {plural}", result)
        return list(answer.get("items") or []), _rv(answer)

    def _create(
        self, plural: str, kind: str, name: str, labels: dict[str, str], spec: dict[str, Any]
    ) -> None:
        """Create; a 409 AlreadyExists goes to the caller. A create that timed out but landed is
        retried and then reports AlreadyExists: callers treat that as "it is there"."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name, "labels": {**MANAGED, **labels}},
            "spec": spec,
        }
        created = self._call(
            f"create {plural}/{name}",
            self.api.create_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            plural,
            body,
        )
        self._remember(plural, created)

    def _create_own(
        self, plural: str, kind: str, name: str, labels: dict[str, str], spec: dict[str, Any]
    ) -> None:
        """Create an object under a fresh random id. AlreadyExists can then only be our own earlier
        attempt whose response was lost (a timeout after the server acted) and was retried."""
        try:
            self._create(plural, kind, name, labels, spec)
        except ApiException as exc:
            if exc.status != 409:
                raise
            existing = self._get(plural, name, fresh=True)
            if existing is None or existing["spec"].get("id") != spec["id"]:
                raise

    def _mutate(self, plural: str, name: str, change: Callable[[dict[str, Any]], bool | None]) -> bool:
        """Read-modify-write with optimistic concurrency: GET, ``change(obj)`` in place, PUT with the
        read resourceVersion; on 409 re-read and re-apply. ``change`` returns False for "nothing to
        do". Returns False when the object does not exist."""
        with self._lock:
            lock = self._object_locks.setdefault((plural, name), threading.Lock())
        with lock:
            return self._mutate_locked(plural, name, change)

    def _mutate_locked(self, plural: str, name: str, change: Callable[[dict[str, Any]], bool | None]) -> bool:
        for attempt in range(CONFLICT_RETRIES):
            if attempt:  # de-synchronise from the other writer before re-reading
                time.sleep(random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt)))
            # The first read may come from the cache: a stale copy costs a 409 and a fresh read.
            obj = self._get(plural, name, fresh=attempt > 0)
            if obj is None:
                return False
            if change(obj) is False:
                return True
            try:
                replaced = self._call(
                    f"replace {plural}/{name}",
                    self.api.replace_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    plural,
                    name,
                    obj,
                )
                self._remember(plural, replaced)
                return True
            except ApiException as exc:
                if exc.status == 409:
                    continue
                if exc.status == 404:
                    self._forget(plural, name)
                    return False
                raise
        raise StoreError(
            f"Kubernetes API ({self._where}): replace {plural}/{name}: still conflicting after "
            f"{CONFLICT_RETRIES} attempts (too many concurrent writers)"
        )

    # ---------------------------------------------------------------- incidents

    @staticmethod
    def _incident(obj: dict[str, Any]) -> Incident:
        s = obj["spec"]
        return Incident(
            id=s["id"],
            service=s["service"],
            severity=s["severity"],
            status=s["status"],
            title=s.get("title", ""),
            opened_at=_spec_time(s, "openedAt") or 0.0,
            started_at=_spec_time(s, "startedAt") or 0.0,
            resolved_at=_spec_time(s, "resolvedAt"),
            dedup_key=s.get("dedupKey", ""),
            data=copy.deepcopy(s.get("data") or {}),
        )

    @staticmethod
    def _public_status(spec: dict[str, Any]) -> str:
        return str(
            (spec.get("data") or {}).get("public_status")
            or ("resolved" if spec.get("status") == "resolved" else "investigating")
        )

    @_guarded
    def open_incident(
        self,
        service: str,
        severity: str,
        title: str,
        opened_at: float,
        started_at: float,
        data: dict[str, Any],
    ) -> Incident:
        inc = new_incident(service, severity, title, opened_at, started_at, data)
        spec: dict[str, Any] = {
            "id": inc.id,
            "service": service,
            "severity": severity,
            "status": "open",
            "title": title,
            "dedupKey": inc.dedup_key,
            "data": json.loads(json.dumps(data)),
            "timeline": [],
            "timelineSeq": 0,
            "timelineDropped": 0,
        }
        _set(spec, "openedAt", opened_at, True)
        _set(spec, "startedAt", started_at, True)
        spec["publicStatus"] = self._public_status(spec)
        labels = {L_ID: label_value(inc.id), L_SERVICE: label_value(service), L_STATUS: "open"}
        self._create_own(INCIDENTS, "Incident", object_name(inc.id), labels, spec)
        return inc

    @_guarded
    def open_incident_for(self, service: str) -> Incident | None:
        items = self._list(INCIDENTS, {L_SERVICE: label_value(service), L_STATUS: "open"})
        found = [
            self._incident(o)
            for o in items
            if o["spec"].get("service") == service and o["spec"].get("status") == "open"
        ]
        found.sort(key=lambda i: i.opened_at, reverse=True)
        return found[0] if found else None

    @_guarded
    def get_incident(self, incident_id: str) -> Incident | None:
        obj = self._get(INCIDENTS, object_name(incident_id))
        return self._incident(obj) if obj is not None and obj["spec"].get("id") == incident_id else None

    @_guarded
    def list_incidents(self, status: str | None = None, limit: int = 100) -> list[Incident]:
        items = self._list(INCIDENTS, {L_STATUS: label_value(status)} if status else None)
        found = [self._incident(o) for o in items if not status or o["spec"].get("status") == status]
        found.sort(key=lambda i: i.opened_at, reverse=True)
        return found[:limit]

    @_guarded
    def update_incident(self, incident_id: str, **changes: Any) -> None:
        if not changes.keys() <= _INCIDENT_FIELDS.keys():
            raise ValueError(f"cannot update {sorted(changes.keys() - _INCIDENT_FIELDS.keys())}")
        if "data" in changes:
            changes["data"] = json.loads(json.dumps(changes["data"]))

        def change(obj: dict[str, Any]) -> None:
            spec = obj["spec"]
            for key, value in changes.items():
                field, is_time = _INCIDENT_FIELDS[key]
                _set(spec, field, value, is_time)
            spec["publicStatus"] = self._public_status(spec)
            obj["metadata"].setdefault("labels", {})[L_STATUS] = label_value(spec["status"])

        self._mutate(INCIDENTS, object_name(incident_id), change)

    @_guarded
    def append(
        self, incident_id: str, ts: float, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        self._append(incident_id, [Event(incident_id, ts, kind, message, data or {})])

    @_guarded
    def append_many(self, events: list[Event]) -> None:
        """One read-modify-write of each incident named, however many entries it gets: a tick's
        timeline costs one PUT per incident instead of one per entry."""
        by_incident: dict[str, list[Event]] = {}
        for e in events:
            by_incident.setdefault(e.incident_id, []).append(e)
        for incident_id, entries in by_incident.items():
            self._append(incident_id, entries)

    def _append(self, incident_id: str, events: list[Event]) -> None:
        payloads = [json.loads(json.dumps(e.data or {}, default=str)) for e in events]

        def change(obj: dict[str, Any]) -> None:
            spec = obj["spec"]
            seq = int(spec.get("timelineSeq") or 0)
            timeline = list(spec.get("timeline") or [])
            for e, payload in zip(events, payloads, strict=True):
                seq += 1
                entry = {"ts": float(e.ts), "at": rfc3339(e.ts), "seq": seq, "kind": e.kind}
                entry["message"] = e.message
                if payload:
                    entry["data"] = payload
                timeline.append(entry)
            spec["timelineSeq"] = seq
            timeline.sort(key=lambda e: (float(e["ts"]), int(e["seq"])))
            over = len(timeline) - self.timeline_cap
            if over > 0:
                timeline = timeline[over:]
                spec["timelineDropped"] = int(spec.get("timelineDropped") or 0) + over
            spec["timeline"] = timeline

        if not self._mutate(INCIDENTS, object_name(incident_id), change):
            log.warning(
                "timeline entries for an unknown incident dropped",
                incident=incident_id,
                kinds=[e.kind for e in events],
            )

    @_guarded
    def timeline(self, incident_id: str) -> list[Event]:
        obj = self._get(INCIDENTS, object_name(incident_id))
        if obj is None:
            return []
        entries = sorted(obj["spec"].get("timeline") or [], key=lambda e: (float(e["ts"]), int(e["seq"])))
        return [
            Event(incident_id, float(e["ts"]), e["kind"], e["message"], copy.deepcopy(e.get("data") or {}))
            for e in entries
        ]

    # ---------------------------------------------------------------- runs

    @staticmethod
    def _run(obj: dict[str, Any]) -> Run:
        s = obj["spec"]
        return Run(
            id=s["id"],
            incident_id=s.get("incident"),
            service=s.get("service"),
            playbook=s["playbook"],
            state=s["state"],
            dry_run=bool(s.get("dryRun", False)),
            started_at=_spec_time(s, "startedAt") or 0.0,
            ended_at=_spec_time(s, "endedAt"),
            error=s.get("error"),
            owner=s.get("owner"),
        )

    @staticmethod
    def _current_step(spec: dict[str, Any]) -> None:
        """``spec.step`` for the printer column: the running step, else the last one that moved."""
        steps = spec.get("steps") or []
        running = [s for s in steps if s.get("state") == "running"]
        moved = [s for s in steps if s.get("state") != "pending"]
        current = (running or moved or [None])[-1]
        _set(spec, "step", current["name"] if current else None, False)

    @_guarded
    def create_run(
        self,
        playbook: str,
        incident_id: str | None,
        service: str | None,
        dry_run: bool,
        started_at: float,
        steps: list[str],
    ) -> Run:
        run = Run(new_id("RUN"), incident_id, service, playbook, "running", dry_run, started_at, None, None)
        spec: dict[str, Any] = {"id": run.id, "playbook": playbook, "state": "running", "dryRun": dry_run}
        _set(spec, "incident", incident_id, False)
        _set(spec, "service", service, False)
        _set(spec, "startedAt", started_at, True)
        spec["steps"] = [
            {"idx": i, "name": n, "state": "pending", "attempts": 0} for i, n in enumerate(steps)
        ]
        labels = {L_ID: label_value(run.id), L_PLAYBOOK: label_value(playbook)}
        if service is not None:
            labels[L_SERVICE] = label_value(service)
        if incident_id is not None:
            labels[L_INCIDENT] = label_value(incident_id)
        self._create_own(RUNS, "PlaybookRun", object_name(run.id), labels, spec)
        return run

    @_guarded
    def claim_run(self, run_id: str, owner: str, expect: str | None) -> bool:
        """Make `owner` the run's owner if it is still `expect` (None: nobody). The PUT carries the
        resourceVersion read, so a concurrent claim makes it 409; the owner is then re-read and
        re-checked, never overwritten blindly: of two claimants exactly one wins."""
        won: list[bool] = [False]

        def change(obj: dict[str, Any]) -> bool:
            current = obj["spec"].get("owner")
            if current == owner:  # ours already (a retried claim whose answer was lost)
                won[0] = True
                return False
            if current != expect:
                won[0] = False
                return False
            won[0] = True
            obj["spec"]["owner"] = owner
            obj["metadata"].setdefault("labels", {})["continuity.dev/owner"] = label_value(owner)
            return True

        if not self._mutate(RUNS, object_name(run_id), change):
            return False
        return won[0]

    @_guarded
    def update_run(self, run_id: str, **changes: Any) -> None:
        unknown = changes.keys() - _RUN_FIELDS.keys()
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")

        def change(obj: dict[str, Any]) -> None:
            for key, value in changes.items():
                field, is_time = _RUN_FIELDS[key]
                _set(obj["spec"], field, bool(value) if key == "dry_run" else value, is_time)

        self._mutate(RUNS, object_name(run_id), change)

    @_guarded
    def add_step(self, run_id: str, idx: int, name: str) -> None:
        def change(obj: dict[str, Any]) -> bool:
            steps = obj["spec"].setdefault("steps", [])
            if any(int(s["idx"]) == idx for s in steps):
                return False  # INSERT OR IGNORE
            steps.append({"idx": idx, "name": name, "state": "pending", "attempts": 0})
            steps.sort(key=lambda s: int(s["idx"]))
            return True

        self._mutate(RUNS, object_name(run_id), change)

    @_guarded
    def get_run(self, run_id: str) -> Run | None:
        obj = self._get(RUNS, object_name(run_id))
        return self._run(obj) if obj is not None and obj["spec"].get("id") == run_id else None

    @_guarded
    def update_step(self, run_id: str, idx: int, **changes: Any) -> None:
        unknown = changes.keys() - _STEP_FIELDS.keys()
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")

        def change(obj: dict[str, Any]) -> bool:
            for step in obj["spec"].get("steps") or []:
                if int(step["idx"]) == idx:
                    for key, value in changes.items():
                        field, is_time = _STEP_FIELDS[key]
                        _set(step, field, value, is_time)
                    if not step.get("epoch"):
                        step.pop("epoch", None)
                    self._current_step(obj["spec"])
                    return True
            return False

        self._mutate(RUNS, object_name(run_id), change)

    @_guarded
    def runs(self, service: str | None = None, playbook: str | None = None) -> list[Run]:
        selector = {}
        if service is not None:
            selector[L_SERVICE] = label_value(service)
        if playbook is not None:
            selector[L_PLAYBOOK] = label_value(playbook)
        found = [
            self._run(o)
            for o in self._list(RUNS, selector or None)
            if (service is None or o["spec"].get("service") == service)
            and (playbook is None or o["spec"].get("playbook") == playbook)
        ]
        found.sort(key=lambda r: r.started_at)
        return found

    @_guarded
    def steps(self, run_id: str) -> list[StepRecord]:
        obj = self._get(RUNS, object_name(run_id))
        if obj is None:
            return []
        return [
            StepRecord(
                run_id=run_id,
                idx=int(s["idx"]),
                name=s["name"],
                state=s["state"],
                attempts=int(s.get("attempts") or 0),
                started_at=_spec_time(s, "startedAt"),
                ended_at=_spec_time(s, "endedAt"),
                detail=s.get("detail"),
            )
            for s in sorted(obj["spec"].get("steps") or [], key=lambda s: int(s["idx"]))
        ]

    # ---------------------------------------------------------------- failover state

    @staticmethod
    def _failover(obj: dict[str, Any]) -> FailoverRecord:
        s = obj["spec"]
        return FailoverRecord(
            service=s["service"],
            state=s["state"],
            run_id=s.get("run"),
            incident_id=s.get("incident"),
            reason=s.get("reason", ""),
            since=_spec_time(s, "since") or 0.0,
            version=int(s.get("version") or 0),
        )

    @_guarded
    def failover_states(self) -> dict[str, FailoverRecord]:
        found = [self._failover(o) for o in self._list(FAILOVERS)]
        return {f.service: f for f in found}

    @_guarded
    def transition_failover(
        self,
        service: str,
        expect_version: int,
        state: str,
        run_id: str | None,
        incident_id: str | None,
        reason: str,
        at: float,
    ) -> FailoverRecord | None:
        """Compare-and-swap on ``spec.version``, made atomic by the resourceVersion of the PUT (or by
        AlreadyExists for the first write): None when another writer moved the state first."""
        if state not in FAILOVER_STATES:
            raise ValueError(f"unknown failover state {state!r}")
        new = FailoverRecord(service, state, run_id, incident_id, reason, at, expect_version + 1)
        name = failover_name(service)

        def fill(spec: dict[str, Any]) -> None:
            spec.update(service=service, state=state, reason=reason, version=new.version)
            _set(spec, "run", run_id, False)
            _set(spec, "incident", incident_id, False)
            _set(spec, "since", at, True)

        if expect_version == 0:
            spec: dict[str, Any] = {}
            fill(spec)
            try:
                self._create(FAILOVERS, "FailoverState", name, {L_SERVICE: label_value(service)}, spec)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # Ours, if a create that timed out had landed.
                existing = self._get(FAILOVERS, name, fresh=True)
                if existing is None or self._failover(existing) != new:
                    return None
            return new
        won: list[bool] = [False]

        def change(obj: dict[str, Any]) -> bool:
            won[0] = False
            if int(obj["spec"].get("version") or 0) != expect_version:
                won[0] = self._failover(obj) == new  # ours already (a retried write whose answer was lost)
                return False
            fill(obj["spec"])
            obj["metadata"].setdefault("labels", {})[L_STATE] = label_value(state)
            won[0] = True
            return True

        if not self._mutate(FAILOVERS, name, change):
            return None
        return new if won[0] else None

    # ---------------------------------------------------------------- flags and the id counter

    def _state(self) -> dict[str, Any]:
        """The ContinuityState object, created on first use."""
        obj = self._get(STATES, STATE_NAME)
        if obj is not None:
            return obj
        try:
            self._create(STATES, "ContinuityState", STATE_NAME, {}, {"flags": {}, "outboxSeq": 0})
        except ApiException as exc:
            if exc.status != 409:
                raise
        obj = self._get(STATES, STATE_NAME, fresh=True)
        if obj is None:
            raise StoreError(f"Kubernetes API ({self._where}): {STATES}/{STATE_NAME} vanished after create")
        return obj

    def _mutate_state(self, change: Callable[[dict[str, Any]], bool | None]) -> None:
        self._state()
        if not self._mutate(STATES, STATE_NAME, change):
            raise StoreError(f"Kubernetes API ({self._where}): {STATES}/{STATE_NAME} was deleted meanwhile")

    def set_ref(self, channel: str, incident_id: str, ref: str) -> None:
        """A channel's own id for our incident (Statuspage's), kept beside the flags."""
        self.set_flag(f"ref:{channel}:{incident_id}", ref)

    def get_ref(self, channel: str, incident_id: str) -> str | None:
        return self.get_flag(f"ref:{channel}:{incident_id}")

    @_guarded
    def get_flag(self, name: str) -> str | None:
        obj = self._get(STATES, STATE_NAME)
        return None if obj is None else (obj["spec"].get("flags") or {}).get(name)

    @_guarded
    def set_flag(self, name: str, value: str | None) -> None:
        """Small durable switches humans flip: pause, a frozen playbook, an approval decision."""

        def change(obj: dict[str, Any]) -> bool:
            flags = obj["spec"].setdefault("flags", {})
            if flags.get(name) == value:
                return False
            if value is None:
                flags.pop(name, None)
            else:
                flags[name] = value
            return True

        if value is None and self._get(STATES, STATE_NAME) is None:
            return
        self._mutate_state(change)

    @_guarded
    def flags(self, prefix: str = "") -> dict[str, str]:
        obj = self._get(STATES, STATE_NAME)
        flags = {} if obj is None else obj["spec"].get("flags") or {}
        return {k: v for k, v in flags.items() if k.startswith(prefix)}

    def _next_outbox_id(self) -> int:
        allocated: list[int] = []

        def change(obj: dict[str, Any]) -> None:
            allocated.clear()
            allocated.append(int(obj["spec"].get("outboxSeq") or 0) + 1)
            obj["spec"]["outboxSeq"] = allocated[0]

        self._mutate_state(change)
        return allocated[0]

    # ---------------------------------------------------------------- outbox

    def _message(self, obj: dict[str, Any]) -> OutboxMessage:
        s = obj["spec"]
        msg = OutboxMessage(
            id=int(s["id"]),
            channel=s["channel"],
            key=s["key"],
            incident_id=s.get("incident"),
            payload=copy.deepcopy(s.get("payload") or {}),
            created_at=_spec_time(s, "createdAt") or 0.0,
            attempts=int(s.get("attempts") or 0),
            next_attempt_at=_spec_time(s, "nextAttemptAt") or 0.0,
            delivered_at=_spec_time(s, "deliveredAt"),
            dead=bool(s.get("dead", False)),
            last_error=s.get("lastError"),
        )
        with self._lock:
            self._outbox_names[msg.id] = obj["metadata"]["name"]
        return msg

    @_guarded
    def enqueue(
        self, channel: str, key: str, payload: dict[str, Any], incident_id: str | None, now: float
    ) -> bool:
        """Queue a message once; a second enqueue with the same key is a no-op (returns False)."""
        name = outbox_name(key)
        if self._get(OUTBOX, name) is not None:
            return False  # the common duplicate, without spending an id
        msg_id = self._next_outbox_id()
        spec: dict[str, Any] = {
            "id": msg_id,
            "channel": channel,
            "key": key,
            "payload": json.loads(json.dumps(payload)),
            "attempts": 0,
            "dead": False,
            "state": "pending",
        }
        _set(spec, "incident", incident_id, False)
        _set(spec, "createdAt", now, True)
        _set(spec, "nextAttemptAt", now, True)
        labels = {L_OUTBOX_ID: str(msg_id), L_CHANNEL: label_value(channel), L_STATE: "pending"}
        if incident_id is not None:
            labels[L_INCIDENT] = label_value(incident_id)
        try:
            self._create(OUTBOX, "OutboxMessage", name, labels, spec)
        except ApiException as exc:
            if exc.status == 409 and _reason(exc) == "AlreadyExists":
                return False
            raise
        with self._lock:
            self._outbox_names[msg_id] = name
        return True

    @_guarded
    def due(self, now: float, limit: int = 50) -> list[OutboxMessage]:
        msgs = [self._message(o) for o in self._list(OUTBOX, {L_STATE: "pending"})]
        msgs = [m for m in msgs if m.delivered_at is None and not m.dead and m.next_attempt_at <= now]
        msgs.sort(key=lambda m: m.id)
        return msgs[:limit]

    def _update_message(self, msg_id: int, change: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            name = self._outbox_names.get(msg_id)
        if name is None:
            items = self._list(OUTBOX, {L_OUTBOX_ID: str(msg_id)})
            if not items:
                return  # as SQLite: an UPDATE of no row
            name = items[0]["metadata"]["name"]
            with self._lock:
                self._outbox_names[msg_id] = name

        def apply(obj: dict[str, Any]) -> None:
            change(obj["spec"])
            spec = obj["spec"]
            spec["attempts"] = int(spec.get("attempts") or 0) + 1
            spec["state"] = (
                "delivered" if spec.get("deliveredAt") else "dead" if spec.get("dead") else "pending"
            )
            obj["metadata"].setdefault("labels", {})[L_STATE] = spec["state"]

        self._mutate(OUTBOX, name, apply)

    @_guarded
    def delivered(self, msg_id: int, now: float) -> None:
        def change(spec: dict[str, Any]) -> None:
            _set(spec, "deliveredAt", now, True)
            spec.pop("lastError", None)

        self._update_message(msg_id, change)

    @_guarded
    def retry_later(self, msg_id: int, next_at: float, error: str) -> None:
        def change(spec: dict[str, Any]) -> None:
            _set(spec, "nextAttemptAt", next_at, True)
            spec["lastError"] = error

        self._update_message(msg_id, change)

    @_guarded
    def give_up(self, msg_id: int, error: str) -> None:
        def change(spec: dict[str, Any]) -> None:
            spec["dead"] = True
            spec["lastError"] = error

        self._update_message(msg_id, change)

    @_guarded
    def outbox(self, include_delivered: bool = False) -> list[OutboxMessage]:
        selector = None if include_delivered else f"{L_STATE}!=delivered"
        msgs = [self._message(o) for o in self._list(OUTBOX, selector)]
        if not include_delivered:
            msgs = [m for m in msgs if m.delivered_at is None]
        msgs.sort(key=lambda m: m.id)
        return msgs
