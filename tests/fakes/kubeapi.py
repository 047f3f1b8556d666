"""A fake Kubernetes API server for tests.

No real API server can run where our tests run, yet the code under test talks to Kubernetes through
the real ``kubernetes`` Python client. Mocking the client would test our assumptions about it rather
than the client itself, so this module serves the real REST paths and JSON shapes over loopback HTTP
and lets the real client (de)serialise them. It covers only what Continuity uses: Leases, ConfigMaps,
Services, Deployments (with the ``scale`` subresource), StatefulSets, generic namespaced custom
objects and ``/version``.

What it keeps faithful, because our correctness depends on it:

- optimistic concurrency: one global resourceVersion bumped by every write; a PUT, or a PATCH that
  carries ``metadata.resourceVersion``, at a stale version is refused with 409 ``Conflict``; a POST
  of an existing name with 409 ``AlreadyExists``;
- errors as ``Status`` objects with ``reason`` and ``code``, as the client expects in ``e.body``;
- Lease ``acquireTime``/``renewTime`` as MicroTime: exactly six fractional digits, as the real
  server's ``time.Parse(RFC3339Micro, ...)`` demands, so a client sending ``isoformat()`` of a
  datetime whose microseconds happen to be zero is caught here rather than in production.

Faults (``fail``, ``delay``) and a request log let tests simulate an unreachable or sick API server
and assert on what was sent.

Two opt-in checks make it judge what a chart deploys, as a real server would:

- ``enforce_rbac(objects, tokens)`` loads rendered Roles, ClusterRoles and their bindings and maps
  bearer tokens to ServiceAccounts; from then on every request is authorised like Kubernetes RBAC
  (verb from method and path, resource with its subresource, resourceNames): anything not granted
  is a 403 ``Forbidden`` with the real message, an unknown token a 401. ``ADMIN_TOKEN`` (what
  ``api_client()`` sends) stands for the test's own cluster-admin.
- ``install_crds(crds)`` registers rendered CustomResourceDefinitions: custom objects of other
  types are a 404, and every write is pruned of fields the structural schema does not declare
  (as the real server silently drops them) and validated against ``openAPIV3Schema`` with
  jsonschema (types, required, enums, minimum, date-time), a 422 ``Invalid`` when it fails.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes.client

JSON = dict[str, Any]

# (group, version, plural) -> kind, for the built-in types whose kind the server knows without a body.
BUILTIN_KINDS: dict[tuple[str, str, str], str] = {
    ("", "v1", "configmaps"): "ConfigMap",
    ("coordination.k8s.io", "v1", "leases"): "Lease",
    ("apps", "v1", "deployments"): "Deployment",
    ("apps", "v1", "statefulsets"): "StatefulSet",
    ("", "v1", "services"): "Service",
    ("", "v1", "pods"): "Pod",
}

ADMIN_TOKEN = "fake-cluster-admin"
"""The bearer token of the test itself: allowed everything when RBAC is enforced."""

_MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")

_PATH = re.compile(
    r"^/(?:api/(?P<core_version>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/namespaces/(?P<namespace>[^/]+)/(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<subresource>[^/]+))?)?/?$"
)

_REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """Carries an HTTP status and a Kubernetes ``reason`` up to the handler, which renders a Status."""

    def __init__(self, code: int, message: str, reason: str | None = None, details: JSON | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details or {}


def status_body(code: int, message: str, reason: str, details: JSON | None = None) -> JSON:
    """Build the ``Status`` object real servers send, so clients parse ``reason`` the same way."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason if code >= 400 else "",
        "details": details or {},
        "code": code,
    }


def _now_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch. Strategic merge is treated the same: our objects have no lists
    whose merge keys would make a difference."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _parse_selector(selector: str) -> list[Callable[[dict[str, str]], bool]]:
    """Parse the common label selector forms (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``,
    ``a in (x,y)``, ``a notin (x,y)``) into predicates; an unparseable term is a 400, as on a real
    server, rather than a silent match-all."""
    terms = [t.strip() for t in re.split(r",(?![^()]*\))", selector) if t.strip()]
    preds: list[Callable[[dict[str, str]], bool]] = []
    for term in terms:
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                preds.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                preds.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)", term):
            key, op, value = m.group(1), m.group(2), m.group(3)
            if op == "!=":
                preds.append(lambda lb, k=key, v=value: lb.get(k) != v)
            else:
                preds.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif m := re.fullmatch(r"!\s*([\w./-]+)", term):
            absent = m.group(1)
            preds.append(lambda lb, k=absent: k not in lb)
        elif re.fullmatch(r"[\w./-]+", term):
            preds.append(lambda lb, k=term: k in lb)
        else:
            raise ApiError(400, f"unable to parse requirement: {term!r}")
    return preds


@dataclass
class _Fault:
    status: int
    until: float | None  # monotonic deadline, or None
    remaining: int | None  # requests left to fail, or None
    match: Callable[[str, str], bool] | None
    user_agent: str | None  # only requests whose User-Agent contains this
    token: str | None = None  # only requests with this bearer token (one pod's credentials)


def _matches(
    match: Callable[[str, str], bool] | None, user_agent: str | None, method: str, path: str, agent: str
) -> bool:
    return (match is None or match(method, path)) and (user_agent is None or user_agent in agent)


class FakeKubeAPI:
    """In-process fake API server on 127.0.0.1 with an ephemeral port.

    Use as a context manager, or ``start()``/``stop()``. State lives in memory and is shared by
    all clients, which is what makes two electors in one test see the same Lease.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._objects: dict[tuple[str, str, str, str, str], JSON] = {}
        # Kinds of custom resources, learnt from the first create (a real server reads the CRD).
        self._custom_kinds: dict[tuple[str, str, str], str] = {}
        self._rv = 1000
        self._faults: list[_Fault] = []
        self._delays: list[tuple[float, Callable[[str, str], bool] | None, str | None]] = []
        self.requests: list[tuple[str, str]] = []
        self._rbac: _Rbac | None = None
        self._crds: dict[tuple[str, str, str], JSON] = {}  # (group, version, plural) -> openAPIV3Schema
        self.denied: list[tuple[str, str, str, str]] = []
        """(user, verb, resource, path) of every request RBAC refused."""
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeKubeAPI:
        fake = self

        class Handler(_Handler):
            api = fake

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="fake-kubeapi", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening *and* cut open keep-alive connections: otherwise a client with a pooled
        connection would keep talking to a server that is supposed to be gone."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("fake API server is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api_client(
        self, user_agent: str | None = None, retries: int | bool | None = False, token: str | None = None
    ) -> kubernetes.client.ApiClient:
        """A real client pointed at this server. urllib3's own retries are off by default so that a
        test's timeout means one attempt, as the caller's ``_request_timeout`` says; ``user_agent``
        names the client for ``fail(user_agent=...)``."""
        config = kubernetes.client.Configuration(host=self.url)
        config.retries = retries
        config.api_key = {"authorization": f"Bearer {token or ADMIN_TOKEN}"}
        client = kubernetes.client.ApiClient(configuration=config)
        if user_agent is not None:
            client.user_agent = user_agent
        return client

    # ---- faults and log --------------------------------------------------------------------
    def fail(
        self,
        status: int = 500,
        *,
        seconds: float | None = None,
        count: int | None = None,
        match: Callable[[str, str], bool] | None = None,
        user_agent: str | None = None,
        token: str | None = None,
    ) -> None:
        """Answer matching requests (``match(method, path)``, a User-Agent containing ``user_agent``
        and the bearer ``token``; all by default) with ``status`` for ``seconds`` or for ``count``
        requests, or until ``clear_faults()`` if neither is given. ``user_agent`` or ``token`` lets a
        test cut off one client (a partitioned leader) while others still get through."""
        until = time.monotonic() + seconds if seconds is not None else None
        with self._lock:
            self._faults.append(_Fault(status, until, count, match, user_agent, token))

    def delay(
        self,
        seconds: float,
        *,
        match: Callable[[str, str], bool] | None = None,
        user_agent: str | None = None,
    ) -> None:
        """Hold matching requests (all by default) this long before handling them; ``delay(0)``
        removes every delay. The request still takes effect after the delay, as on a real server
        whose client gave up waiting — which is what makes timeouts ambiguous."""
        with self._lock:
            if seconds <= 0:
                self._delays.clear()
            else:
                self._delays.append((seconds, match, user_agent))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delays.clear()

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def _fault_for(self, method: str, path: str, agent: str, authorization: str = "") -> int | None:
        now = time.monotonic()
        with self._lock:
            self._faults = [
                f
                for f in self._faults
                if (f.until is None or f.until > now) and (f.remaining is None or f.remaining > 0)
            ]
            for f in self._faults:
                if _matches(f.match, f.user_agent, method, path, agent) and (
                    f.token is None or authorization == f"Bearer {f.token}"
                ):
                    if f.remaining is not None:
                        f.remaining -= 1
                    return f.status
        return None

    # ---- what a chart deploys ---------------------------------------------------------------
    def enforce_rbac(self, objects: list[JSON], tokens: dict[str, str]) -> None:
        """Authorise every request from now on with the rendered RBAC ``objects`` (Roles,
        ClusterRoles, RoleBindings, ClusterRoleBindings; others are ignored). ``tokens`` maps a bearer
        token to a ServiceAccount as ``namespace/name``."""
        with self._lock:
            self._rbac = _Rbac(objects, tokens)

    def add_token(self, token: str, service_account: str) -> None:
        """One more bearer token (a pod's projected token) for ``namespace/name``."""
        with self._lock:
            assert self._rbac is not None, "enforce_rbac first"
            self._rbac.tokens[token] = "system:serviceaccount:" + service_account.replace("/", ":")

    def install_crds(self, crds: list[JSON]) -> None:
        """Serve the custom resources these CRDs define, and only those, validated by their schemas."""
        with self._lock:
            for crd in crds:
                spec = crd["spec"]
                for version in spec["versions"]:
                    key = (spec["group"], version["name"], spec["names"]["plural"])
                    self._crds[key] = version["schema"]["openAPIV3Schema"]
                    self._custom_kinds[key] = spec["names"]["kind"]

    def add_pod(self, namespace: str, name: str, labels: dict[str, str]) -> JSON:
        """Create a Pod as the kubelet's ReplicaSet would (the test plays the Deployment)."""
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}}
        with self._lock:
            return self._create(_Resource("", "v1", "pods"), namespace, body)

    def delete_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> None:
        with self._lock:
            if self._objects.pop((group, version, namespace, plural, name), None) is not None:
                self._rv += 1

    # ---- direct access for tests -----------------------------------------------------------
    def get_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> JSON | None:
        with self._lock:
            obj = self._objects.get((group, version, namespace, plural, name))
            return copy.deepcopy(obj) if obj is not None else None

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    # ---- request handling ------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, JSON]:
        split = urlsplit(raw_path)
        path, query = split.path, parse_qs(split.query)
        agent = headers.get("user-agent", "")
        with self._lock:
            self.requests.append((method, path))
            delay = sum(s for s, m, ua in self._delays if _matches(m, ua, method, path, agent))
        if delay:
            time.sleep(delay)
        fault = self._fault_for(method, path, agent, headers.get("authorization", ""))
        if fault is not None:
            reason = _REASONS.get(fault, "InternalError")
            return fault, status_body(fault, f"injected fault {fault}", reason)
        try:
            if self._rbac is not None:
                self._authorise(method, path, query, headers.get("authorization", ""))
            if path in ("/version", "/version/"):
                if method != "GET":
                    raise ApiError(405, "method not allowed")
                return 200, {
                    "major": "1",
                    "minor": "30",
                    "gitVersion": "v1.30.0-continuity-fake",
                    "gitCommit": "0" * 40,
                    "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.22.0",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                }
            m = _PATH.match(path)
            if not m:
                raise ApiError(404, f"the server could not find the requested resource ({path})")
            group = m.group("group") or ""
            version = m.group("core_version") or m.group("version")
            payload: Any = None
            if body:
                try:
                    payload = json.loads(body)
                except ValueError as e:
                    raise ApiError(400, f"invalid JSON body: {e}") from e
            with self._lock:
                return self._dispatch(
                    method,
                    group,
                    version,
                    m.group("namespace"),
                    m.group("plural"),
                    m.group("name"),
                    m.group("subresource"),
                    query,
                    headers.get("content-type", ""),
                    payload,
                )
        except ApiError as e:
            return e.code, status_body(e.code, e.message, e.reason, e.details)

    def _authorise(self, method: str, path: str, query: dict[str, list[str]], authorization: str) -> None:
        rbac = self._rbac
        assert rbac is not None
        token = authorization.removeprefix("Bearer ").strip() if authorization.startswith("Bearer ") else ""
        if token == ADMIN_TOKEN:
            return
        user = rbac.tokens.get(token)
        if user is None:
            raise ApiError(401, "Unauthorized")
        if path in ("/version", "/version/"):
            return  # system:public-info-viewer
        m = _PATH.match(path)
        if not m:
            raise ApiError(403, f'forbidden: User "{user}" cannot {method.lower()} path "{path}"')
        group = m.group("group") or ""
        namespace, plural, name, sub = (
            m.group("namespace"),
            m.group("plural"),
            m.group("name"),
            m.group("subresource"),
        )
        watch = query.get("watch", [""])[0] in ("true", "1")
        verb = {
            "GET": ("watch" if watch else "get") if name else ("watch" if watch else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }.get(method, method.lower())
        resource = f"{plural}/{sub}" if sub else plural
        if rbac.allows(user, verb, group, resource, namespace, name):
            return
        with self._lock:
            self.denied.append((user, verb, resource, path))
        what = f"{plural}.{group}" if group else plural
        subject = f'{what} "{name}"' if name else what
        in_group = f'in API group "{group}"'
        raise ApiError(
            403,
            f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" {in_group} '
            f'in the namespace "{namespace}"',
            "Forbidden",
            {"name": name or "", "group": group, "kind": plural},
        )

    def _dispatch(
        self,
        method: str,
        group: str,
        version: str,
        namespace: str,
        plural: str,
        name: str | None,
        subresource: str | None,
        query: dict[str, list[str]],
        content_type: str,
        payload: Any,
    ) -> tuple[int, JSON]:
        res = _Resource(group, version, plural)
        if self._crds and res.kind is None and res.key not in self._crds:
            raise ApiError(404, f"the server could not find the requested resource ({res.resource_name})")
        if name is None:
            if method == "GET":
                return 200, self._list(res, namespace, query)
            if method == "POST":
                return 201, self._create(res, namespace, payload)
            raise ApiError(405, f"method {method} not allowed on a collection")
        if subresource is not None:
            if subresource == "scale" and res.key == ("apps", "v1", "deployments"):
                return self._scale(method, res, namespace, name, content_type, payload)
            if subresource == "status" and method in ("GET", "PUT", "PATCH"):
                return self._item(method, res, namespace, name, content_type, payload)
            raise ApiError(404, f"the server could not find the requested resource ({subresource})")
        return self._item(method, res, namespace, name, content_type, payload)

    def _list(self, res: _Resource, namespace: str, query: dict[str, list[str]]) -> JSON:
        preds = _parse_selector(query.get("labelSelector", [""])[0])
        items = []
        for (g, v, ns, p, _), obj in sorted(self._objects.items()):
            if (g, v, p) != res.key or ns != namespace:
                continue
            labels = obj.get("metadata", {}).get("labels") or {}
            if all(pred(labels) for pred in preds):
                items.append(copy.deepcopy(obj))
        return {
            "apiVersion": res.api_version,
            "kind": f"{res.kind or self._custom_kinds.get(res.key, 'Object')}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _create(self, res: _Resource, namespace: str, payload: Any) -> JSON:
        if not isinstance(payload, dict):
            raise ApiError(400, "request body must be an object")
        obj = copy.deepcopy(payload)
        meta = obj.setdefault("metadata", {}) or {}
        obj["metadata"] = meta
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
        if not name:
            raise ApiError(422, "metadata.name: Required value: name or generateName is required")
        if meta.get("namespace") not in (None, namespace):
            raise ApiError(400, "the namespace of the provided object does not match the request")
        key = res.storage_key(namespace, name)
        if key in self._objects:
            raise ApiError(
                409,
                f'{res.resource_name} "{name}" already exists',
                "AlreadyExists",
                {"name": name, "group": res.group, "kind": res.plural},
            )
        obj["apiVersion"] = res.api_version
        obj["kind"] = res.kind or obj.get("kind")
        if not obj["kind"]:
            raise ApiError(400, "Object 'Kind' is missing")
        if res.kind is None:
            self._custom_kinds.setdefault(res.key, obj["kind"])
        meta.update(
            name=name,
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now_time(),
            generation=1,
        )
        meta.pop("resourceVersion", None)
        self._validate(res, obj)
        self._write(key, obj)
        return copy.deepcopy(obj)

    def _get(self, res: _Resource, namespace: str, name: str) -> JSON:
        obj = self._objects.get(res.storage_key(namespace, name))
        if obj is None:
            raise ApiError(
                404,
                f'{res.resource_name} "{name}" not found',
                "NotFound",
                {"name": name, "group": res.group, "kind": res.plural},
            )
        return obj

    def _item(
        self, method: str, res: _Resource, namespace: str, name: str, content_type: str, payload: Any
    ) -> tuple[int, JSON]:
        current = self._get(res, namespace, name)
        if method == "GET":
            return 200, copy.deepcopy(current)
        if method == "DELETE":
            del self._objects[res.storage_key(namespace, name)]
            self._rv += 1
            uid = current["metadata"]["uid"]
            details = {"name": name, "group": res.group, "kind": res.plural, "uid": uid}
            return 200, status_body(200, "", "", details)
        if method == "PUT":
            if not isinstance(payload, dict):
                raise ApiError(400, "request body must be an object")
            new = copy.deepcopy(payload)
        elif method == "PATCH":
            new = self._apply_patch(current, content_type, payload)
        else:
            raise ApiError(405, f"method {method} not allowed")
        meta = new.setdefault("metadata", {}) or {}
        new["metadata"] = meta
        if meta.get("name", name) != name:
            raise ApiError(400, "the name of the object does not match the name on the URL")
        self._check_rv(res, name, current, meta.get("resourceVersion"))
        for field in ("uid", "creationTimestamp", "name", "namespace"):
            meta[field] = current["metadata"][field]
        new["apiVersion"] = current["apiVersion"]
        new["kind"] = current["kind"]
        meta["generation"] = current["metadata"].get("generation", 1) + (
            1 if new.get("spec") != current.get("spec") else 0
        )
        self._validate(res, new)
        self._write(res.storage_key(namespace, name), new)
        return 200, copy.deepcopy(new)

    def _apply_patch(self, current: JSON, content_type: str, payload: Any) -> JSON:
        ctype = content_type.split(";")[0].strip()
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(415, f"the fake API server does not support patch type {ctype!r}")
        if not isinstance(payload, dict):
            raise ApiError(400, "a merge patch must be an object")
        return merge_patch(current, payload)

    def _check_rv(self, res: _Resource, name: str, current: JSON, sent_rv: Any) -> None:
        if sent_rv is not None and str(sent_rv) != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on {res.resource_name} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                "Conflict",
                {"name": name, "group": res.group, "kind": res.plural},
            )

    def _scale(
        self, method: str, res: _Resource, namespace: str, name: str, content_type: str, payload: Any
    ) -> tuple[int, JSON]:
        current = self._get(res, namespace, name)
        if method in ("PUT", "PATCH"):
            if method == "PUT":
                if not isinstance(payload, dict):
                    raise ApiError(400, "request body must be an object")
                scale = payload
            else:
                scale = self._apply_patch(self._scale_of(current), content_type, payload)
            self._check_rv(res, name, current, (scale.get("metadata") or {}).get("resourceVersion"))
            replicas = (scale.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise ApiError(422, "spec.replicas: Invalid value: must be a non-negative integer")
            new = copy.deepcopy(current)
            if new.get("spec", {}).get("replicas") != replicas:
                new.setdefault("spec", {})["replicas"] = replicas
                new["metadata"]["generation"] = new["metadata"].get("generation", 1) + 1
            self._validate(res, new)
            self._write(res.storage_key(namespace, name), new)
            current = new
        elif method != "GET":
            raise ApiError(405, f"method {method} not allowed on scale")
        return 200, self._scale_of(current)

    @staticmethod
    def _scale_of(deployment: JSON) -> JSON:
        meta = deployment["metadata"]
        labels = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        replicas = deployment["spec"]["replicas"]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            },
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "selector": ",".join(f"{k}={v}" for k, v in labels.items())},
        }

    def _validate(self, res: _Resource, obj: JSON) -> None:
        """Enforce the few server-side rules a client could get wrong and never notice against a
        lenient fake: MicroTime precision, positive lease durations, defaults and mirrored status;
        for custom objects, the CRD's schema (pruning, then validation)."""
        schema = self._crds.get(res.key)
        if schema is not None:
            pruned = _prune(obj, schema)
            obj.clear()
            obj.update(pruned)
            errors = sorted(
                _validator(schema).iter_errors(_without_meta(obj)), key=lambda e: list(e.absolute_path)
            )
            if errors:
                causes = [
                    {"field": ".".join(str(p) for p in e.absolute_path), "message": e.message} for e in errors
                ]
                text = "; ".join(f"{c['field'] or '(root)'}: {c['message']}" for c in causes)
                name = obj.get("metadata", {}).get("name", "")
                raise ApiError(
                    422,
                    f'{res.resource_name} "{name}" is invalid: {text}',
                    "Invalid",
                    {
                        "name": name,
                        "group": res.group,
                        "kind": res.kind or self._custom_kinds.get(res.key),
                        "causes": causes,
                    },
                )
        if res.kind == "Lease":
            spec = obj.setdefault("spec", {}) or {}
            obj["spec"] = spec
            for field in ("acquireTime", "renewTime"):
                value = spec.get(field)
                if value is None:
                    continue
                if not isinstance(value, str) or not _MICROTIME.match(value):
                    raise ApiError(
                        400,
                        f"spec.{field}: {value!r} is not a MicroTime "
                        "(RFC 3339 with exactly 6 fractional digits)",
                    )
                spec[field] = datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            for field in ("leaseDurationSeconds", "leaseTransitions"):
                value = spec.get(field)
                if value is None:
                    continue
                minimum = 1 if field == "leaseDurationSeconds" else 0
                if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                    raise ApiError(
                        422, f"spec.{field}: Invalid value: {value!r}: must be an integer >= {minimum}"
                    )
        elif res.kind == "Service":
            # As a real server: a ClusterIP service gets a type and keeps its selector a string map.
            spec = obj.setdefault("spec", {}) or {}
            obj["spec"] = spec
            spec.setdefault("type", "ClusterIP")
            selector = spec.get("selector") or {}
            if not isinstance(selector, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
            ):
                raise ApiError(422, "spec.selector: Invalid value: must be a map of strings")
        elif res.kind in ("Deployment", "StatefulSet"):
            spec = obj.setdefault("spec", {}) or {}
            obj["spec"] = spec
            spec.setdefault("replicas", 1)
            if not isinstance(spec["replicas"], int) or spec["replicas"] < 0:
                raise ApiError(422, "spec.replicas: Invalid value: must be a non-negative integer")
            n = spec["replicas"]
            obj["status"] = {
                "observedGeneration": obj["metadata"].get("generation", 1),
                "replicas": n,
                "readyReplicas": n,
                "availableReplicas": n,
                "updatedReplicas": n,
            }

    def _write(self, key: tuple[str, str, str, str, str], obj: JSON) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[key] = obj


class _Rbac:
    """Kubernetes RBAC over rendered objects: a request is allowed when some rule of a role bound to
    the user (RoleBinding in the request's namespace, or ClusterRoleBinding) matches its API group,
    resource (``plural/subresource``), verb and, when the rule lists resourceNames, the object's
    name. As in Kubernetes, a rule with resourceNames never allows create, list or watch of a
    collection (there is no name to match), and nothing is denied explicitly: absence is denial."""

    def __init__(self, objects: list[JSON], tokens: dict[str, str]) -> None:
        self.tokens = {t: "system:serviceaccount:" + sa.replace("/", ":") for t, sa in tokens.items()}
        self.roles: dict[tuple[str, str], list[JSON]] = {}  # (namespace or "", name) -> rules
        self.bindings: list[tuple[str | None, tuple[str, str], set[str]]] = []
        for o in objects:
            kind, meta = o.get("kind"), o.get("metadata", {})
            if kind == "Role":
                self.roles[(meta["namespace"], meta["name"])] = o.get("rules") or []
            elif kind == "ClusterRole":
                self.roles[("", meta["name"])] = o.get("rules") or []
        for o in objects:
            kind, meta = o.get("kind"), o.get("metadata", {})
            if kind not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            ref = o["roleRef"]
            role_key = (meta["namespace"] if ref["kind"] == "Role" else "", ref["name"])
            users = {
                f"system:serviceaccount:{s.get('namespace', meta.get('namespace'))}:{s['name']}"
                for s in o.get("subjects") or []
                if s["kind"] == "ServiceAccount"
            }
            scope = meta.get("namespace") if kind == "RoleBinding" else None
            self.bindings.append((scope, role_key, users))

    def allows(
        self, user: str, verb: str, group: str, resource: str, namespace: str, name: str | None
    ) -> bool:
        for scope, role_key, users in self.bindings:
            if user not in users or (scope is not None and scope != namespace):
                continue
            for rule in self.roles.get(role_key, []):
                if (
                    _has(rule.get("apiGroups"), group)
                    and _has(rule.get("resources"), resource)
                    and _has(rule.get("verbs"), verb)
                    and (
                        not rule.get("resourceNames") or (name is not None and name in rule["resourceNames"])
                    )
                ):
                    return True
        return False


def _has(values: list[str] | None, wanted: str) -> bool:
    return bool(values) and ("*" in values or wanted in values)  # type: ignore[operator]


def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in value


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("date-time")(_date_time)


def _openapi_to_jsonschema(schema: Any) -> Any:
    """OpenAPI v3 ``nullable: true`` is jsonschema's ``type: [t, "null"]``; the x-kubernetes-*
    extensions need no translation (jsonschema ignores unknown keywords)."""
    if isinstance(schema, list):
        return [_openapi_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _openapi_to_jsonschema(v) for k, v in schema.items()}
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


_validators: dict[int, Any] = {}


def _validator(schema: JSON) -> Any:
    cached = _validators.get(id(schema))
    if cached is None:
        cached = jsonschema.Draft7Validator(_openapi_to_jsonschema(schema), format_checker=_FORMATS)
        _validators[id(schema)] = cached
    return cached


def _without_meta(obj: JSON) -> JSON:
    """metadata is validated by the server's ObjectMeta rules, not the CRD's schema."""
    return {k: v for k, v in obj.items() if k != "metadata"}


def _prune(value: Any, schema: JSON, root: bool = True) -> Any:
    """Drop fields the structural schema does not declare, as the API server does (silently):
    a client that writes an undeclared field would lose it on the next read."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return value
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out: JSON = {}
        for k, v in value.items():
            if root and k in ("apiVersion", "kind", "metadata"):
                out[k] = v
            elif props is not None and k in props:
                out[k] = _prune(v, props[k], False)
            elif isinstance(extra, dict):
                out[k] = _prune(v, extra, False)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                out[k] = v
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(v, schema["items"], False) for v in value]
    return value


@dataclass(frozen=True)
class _Resource:
    group: str
    version: str
    plural: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def kind(self) -> str | None:
        return BUILTIN_KINDS.get(self.key)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource_name(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def storage_key(self, namespace: str, name: str) -> tuple[str, str, str, str, str]:
        return (self.group, self.version, namespace, self.plural, name)


def _phrase(code: int) -> str | None:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return None


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP shell around ``FakeKubeAPI.handle``; keep-alive so urllib3 pools connections like
    it does against a real server."""

    api: FakeKubeAPI
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, delayed ACKs add ~40 ms to each.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.api._lock:
            self.api._connections.add(self.connection)

    def finish(self) -> None:
        with self.api._lock:
            self.api._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        code, payload = self.api.handle(self.command, self.path, headers, body)
        data = json.dumps(payload).encode()
        try:
            self.send_response(code, _phrase(code))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (its timeout was shorter than our injected delay).
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest output stays readable
        pass
