"""The simulated edges: everything the controller touches outside itself, and nothing else.

- `SimProber`: the probe transport (the Controller's `prober=` seam). Answers come from the world's
  truth at the moment the probe runs; a hang takes the probe's whole timeout in virtual time.
- `SimAws`: boto3-like route53 and rds clients that change the world, count every world-changing
  call, and can be throttled, fail, be slow, or time out after succeeding.
- `sim_http`: replaces `requests.Session.request` during a run, so the production notifier
  channels (PagerDuty, Slack) and the `http` playbook action send through their real code down to
  the wire, and the world's receivers answer (validating the payloads, going down and coming back).
- `ProcessStore`: the real store seen through one controller process: it raises on a schedule
  (a full disk), can be slow (a blocking call stalls the loop), and refuses everything once its
  process has crashed.
- `SimElector`: leadership the world decides; or `SimLeaseApi`: the Lease API under the real
  `LeaseElector` (controller/leader.py), whose holder is then the truth.
- `SimSMTP`: the mail relay under the real email channel (`smtplib.SMTP` during a run).
- `SimApi`: the controller's real aiohttp app, called in process: pushed inputs (Alertmanager,
  heartbeats, agents' results) and humans' approvals go through its handlers and token checks.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import random
import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from requests.structures import CaseInsensitiveDict

from controller.stores import StoreError
from probes.base import ProbeResult, StepResult
from tests.sim.vloop import InlineExecutor
from tests.sim.world import CHECKOUT, IP_REGION, REGION_IP, Call, World

ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("sim_actor", default="?")
"""Which controller process is making a call (each process's tasks run in its own context)."""

HAS_PROBER_ERROR = "prober_error" in ProbeResult.__dataclass_fields__


# ====================================================================== probes


def _region_of(host: str, world: World, t: float) -> str | None:
    host = host.lower().rstrip(".")
    if host + "." == CHECKOUT:
        return world.serving(t)
    for region in REGION_IP:
        if host.startswith(region + ".") or f".{region}." in host:
            return region
    if host.startswith("ref-"):
        return host.removesuffix(".sim")  # a reference target is its own "region": ref-a, ref-b
    return None


class SimProber:
    """What `probes.runner.run_probe` would return, computed from the world's truth."""

    def __init__(self, world: World, clock: Any, vantage: str = "local") -> None:
        self.world = world
        self.clock = clock
        self.vantage = vantage
        self.rng = random.Random(world.seed * 7919 + sum(map(ord, vantage)))
        self._journeys: dict[str, Any] = {}

    def _result(self, name: str, ok: bool, start: float, latency: float, **kw: Any) -> ProbeResult:
        prober_error = kw.pop("prober_error", None)
        if HAS_PROBER_ERROR and prober_error is not None:
            kw["prober_error"] = prober_error
        return ProbeResult(probe=name, ok=ok, started_at=start, latency=latency, vantage=self.vantage, **kw)

    async def __call__(self, name: str, cfg: Any) -> ProbeResult:
        w = self.world
        start = self.clock()
        t = w.rel(start)
        timeout = float(cfg.timeout)
        local = self.vantage == "local"
        if local and w.active("emfile", t):
            await asyncio.sleep(0.001)
            return self._result(
                name,
                False,
                start,
                0.001,
                error="probe error: OSError: [Errno 24] Too many open files",
                prober_error="emfile",
            )
        if local and w.active("resolver", t):
            await asyncio.sleep(timeout)
            return self._result(
                name, False, start, timeout, error=f"timed out after {timeout:g}s", prober_error="resolver"
            )
        cut = w.active("isolation", t) if local else []
        cut = cut or [f for f in w.active("vantage", t) if f.step == self.vantage]
        if cut:
            await asyncio.sleep(timeout)
            return self._result(name, False, start, timeout, error=f"timed out after {timeout:g}s")
        steps = self._journeys.get(name)
        if steps is None:
            steps = self._journeys[name] = cfg.journey(name)
        out: list[StepResult] = []
        total = 0.0
        failed = False
        hung = False
        for step in steps:
            host = urlsplit(step.url).hostname or ""
            region = _region_of(host, w, t)
            faults = (
                w.active(("refused", "hang", "http5xx", "slow", "flaky", "step"), t, region) if region else []
            )
            kinds = {f.kind: f for f in faults}
            req = f"GET {step.url}"
            if "refused" in kinds:
                out.append(StepResult(step.name, False, 0.001, error="connection refused", request=req))
                total += 0.001
                failed = True
                break
            if "hang" in kinds:
                hung = True
                break
            lat = 0.02 + (kinds["slow"].latency if "slow" in kinds else 0.0)
            total += lat
            if total > timeout:
                hung = True
                break
            broken = (
                "http5xx" in kinds
                or ("step" in kinds and kinds["step"].step == step.name)
                or ("flaky" in kinds and self.rng.random() < kinds["flaky"].rate)
            )
            if broken:
                out.append(
                    StepResult(
                        step.name, False, lat, error="expected status 200, found 503", request=req, status=503
                    )
                )
                failed = True
                break
            out.append(StepResult(step.name, True, lat, request=req, status=200))
        if hung:
            await asyncio.sleep(timeout)
            return self._result(name, False, start, timeout, error=f"timed out after {timeout:g}s")
        await asyncio.sleep(total)
        if failed:
            return self._result(name, False, start, total, steps=tuple(out))
        # after the sleep: a stalled loop makes a probe late, and the real one would have timed out
        took = self.clock() - start
        if took > timeout + 0.5:
            return self._result(
                name, False, start, took, error=f"timed out after {timeout:g}s", prober_error="loop_stall"
            )
        slo = getattr(cfg, "latency_slo", None)
        if slo is not None and total > slo:
            return self._result(
                name,
                False,
                start,
                total,
                steps=tuple(out),
                error=f"slower than its latency SLO: {total * 1000:.0f}ms > {slo * 1000:.0f}ms",
                details={"degraded": True},
            )
        return self._result(name, True, start, total, steps=tuple(out))


# ====================================================================== AWS


def _client_error(code: str, status: int, op: str) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"simulated {code}"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        op,
    )


class _Exceptions:
    class DBClusterNotFoundFault(Exception):
        pass

    class DBInstanceNotFoundFault(Exception):
        pass


class _SimClient:
    def __init__(self, aws: SimAws, service: str) -> None:
        self.aws = aws
        self.service = service
        self.exceptions = _Exceptions

    def _enter(self, op: str, mutating: bool) -> tuple[float, Any]:
        """Common to every call: dead process, latency, throttling. Returns (t, mode event)."""
        w = self.aws.world
        actor = ACTOR.get()
        if actor in w.dead:
            raise EndpointConnectionError(endpoint_url=f"https://{self.service}.sim")
        self.aws.executor.charge(0.05)
        t = w.rel(self.aws.clock())
        mode = w.event_active("aws", t)
        if mode is not None and mode.target == "throttle":
            raise _client_error("Throttling", 400, op)
        if mode is not None and mode.target == "fail" and mutating:
            raise _client_error("InternalFailure", 500, op)
        return t, mode

    def _mutate(self, op: str, resource: str, value: str, apply: Any, detail: dict[str, Any]) -> None:
        """Apply a change (once), log it with its at-most-once key, then honour slow/timeout modes."""
        w = self.aws.world
        t, mode = self._enter(op, True)
        history = self.aws.changes.setdefault(resource, [])
        current = history[-1][1] if history else None
        if current == value:
            key = f"{resource}->{value}#{len(history) - 1}"  # a repeat of the change already made
        else:
            history.append((t, value))
            key = f"{resource}->{value}#{len(history) - 1}"
            apply(t)
        w.calls.append(Call(t, ACTOR.get(), self.service, key, True, {"op": op, **detail}))
        if mode is not None and mode.target == "slow":
            self.aws.executor.charge(mode.value)
        if mode is not None and mode.target == "timeout_after":
            self.aws.executor.charge(self.aws.read_timeout)
            raise ReadTimeoutError(endpoint_url=f"https://{self.service}.sim")


class SimRoute53(_SimClient):
    def list_hosted_zones_by_name(self, DNSName: str, **_: Any) -> dict[str, Any]:
        self._enter("ListHostedZonesByName", False)
        return {"HostedZones": [{"Id": "/hostedzone/ZSIM", "Name": "shop.sim."}]}

    def list_resource_record_sets(self, HostedZoneId: str, **_: Any) -> dict[str, Any]:
        t, _mode = self._enter("ListResourceRecordSets", False)
        ip = REGION_IP[self.aws.world.serving(t)]
        return {
            "ResourceRecordSets": [
                {"Name": CHECKOUT, "Type": "A", "TTL": 60, "ResourceRecords": [{"Value": ip}]},
            ]
        }

    def change_resource_record_sets(self, HostedZoneId: str, ChangeBatch: dict[str, Any]) -> dict[str, Any]:
        w = self.aws.world
        change = ChangeBatch["Changes"][0]["ResourceRecordSet"]
        values = [r["Value"] for r in change.get("ResourceRecords", [])]
        region = IP_REGION.get(values[0], "?") if values else "?"
        self._mutate(
            "ChangeResourceRecordSets",
            change["Name"],
            region,
            lambda t: w.switch(t, region),
            {"region": region, "comment": ChangeBatch.get("Comment", "")},
        )
        return {"ChangeInfo": {"Id": f"/change/C{len(w.calls)}", "Status": "PENDING"}}

    def get_change(self, Id: str) -> dict[str, Any]:
        self._enter("GetChange", False)
        return {"ChangeInfo": {"Id": Id, "Status": "INSYNC"}}


class SimRds(_SimClient):
    def describe_db_clusters(self, DBClusterIdentifier: str) -> dict[str, Any]:
        _t, _ = self._enter("DescribeDBClusters", False)
        writer = self.aws.world.writer[-1][1]
        return {
            "DBClusters": [
                {
                    "DBClusterIdentifier": DBClusterIdentifier,
                    "Status": "available",
                    "DBClusterMembers": [
                        {"DBInstanceIdentifier": f"shop-{r}", "IsClusterWriter": r == writer}
                        for r in REGION_IP
                    ],
                }
            ]
        }

    def failover_db_cluster(
        self, DBClusterIdentifier: str, TargetDBInstanceIdentifier: str
    ) -> dict[str, Any]:
        w = self.aws.world
        region = TargetDBInstanceIdentifier.removeprefix("shop-")
        self._mutate(
            "FailoverDBCluster",
            DBClusterIdentifier,
            region,
            lambda t: w.writer.append((t, region)),
            {"region": region},
        )
        return {"DBCluster": {"DBClusterIdentifier": DBClusterIdentifier}}


class SimAws:
    """The Controller's `aws=` client factory, bound to the world."""

    read_timeout = 20.0

    def __init__(self, world: World, executor: InlineExecutor, clock: Any) -> None:
        self.world = world
        self.executor = executor
        self.clock = clock
        self.changes: dict[str, list[tuple[float, str]]] = {}
        self._clients = {"route53": SimRoute53(self, "route53"), "rds": SimRds(self, "rds")}

    def __call__(self, service: str) -> Any:
        if service not in self._clients:
            raise EndpointConnectionError(endpoint_url=f"https://{service}.sim (not simulated)")
        return self._clients[service]


# ====================================================================== HTTP: receivers and webhooks

PD_KEY = "sim0routing0key00000000000000000"  # 32 characters, like a real integration key
SLACK_URL = "http://hooks.slack.sim/services/T0/B0/sim"
STATUSPAGE_KEY = "sim-statuspage-api-key"
STATUSPAGE_PAGE = "simpage"


def _response(url: str, status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
    resp = requests.Response()
    resp.status_code = status
    resp._content = json.dumps(body).encode()
    resp.headers = CaseInsensitiveDict({"Content-Type": "application/json", **(headers or {})})
    resp.url = url
    resp.reason = {200: "OK", 202: "Accepted", 400: "Bad Request", 503: "Service Unavailable"}.get(status, "")
    resp.encoding = "utf-8"
    return resp


def _pd_problem(body: Any) -> str | None:
    """What PagerDuty's Events API v2 would refuse (400), or None."""
    if not isinstance(body, dict):
        return "body is not a JSON object"
    if body.get("routing_key") != PD_KEY:
        return "invalid routing_key"
    action = body.get("event_action")
    if action not in ("trigger", "acknowledge", "resolve"):
        return f"invalid event_action {action!r}"
    if not body.get("dedup_key"):
        return "dedup_key missing"
    if action == "trigger":
        p = body.get("payload") or {}
        for key in ("summary", "source", "severity"):
            if not p.get(key):
                return f"payload.{key} missing"
        if p["severity"] not in ("critical", "error", "warning", "info"):
            return f"payload.severity {p['severity']!r}"
    return None


class SimHttp:
    """Stands in for the network under `requests`: the world's receivers answer."""

    def __init__(self, world: World, executor: InlineExecutor, clock: Any) -> None:
        self.world = world
        self.executor = executor
        self.clock = clock

    def request(self, method: str, url: str, **kw: Any) -> Any:
        w = self.world
        actor = ACTOR.get()
        if actor in w.dead:
            raise requests.ConnectionError("sim: this process is dead")
        t = w.rel(self.clock())
        host = (urlsplit(url).hostname or "").lower()
        body = kw.get("json")
        if body is None and kw.get("data") is not None:
            data = kw["data"]
            try:
                body = json.loads(data.decode() if isinstance(data, bytes) else data)
            except ValueError:
                body = {"raw": str(data)[:200]}
        timeout = kw.get("timeout") or 10.0
        timeout = timeout[-1] if isinstance(timeout, tuple) else float(timeout)
        self.executor.charge(0.03)
        if host == "events.pagerduty.sim" and urlsplit(url).path == "/v2/change/enqueue":
            # PagerDuty's Change Events API: no event_action, no dedup_key; 202 when well formed.
            if w.event_active("receiver_down", t, "pagerduty"):
                raise requests.ConnectionError("sim: events.pagerduty.sim refused the connection")
            payload = body.get("payload") if isinstance(body, dict) else None
            if (
                body.get("routing_key") != PD_KEY
                or not isinstance(payload, dict)
                or not payload.get("summary")
            ):
                return _response(url, 400, {"status": "invalid event", "errors": ["change event malformed"]})
            w.deliveries.append(
                Call(
                    t,
                    actor,
                    "notify",
                    json.dumps(body, sort_keys=True),
                    True,
                    {"channel": "pagerduty-change", "body": body},
                )
            )
            return _response(url, 202, {"status": "success"})
        if host == "events.pagerduty.sim":
            if w.event_active("receiver_down", t, "pagerduty"):
                raise requests.ConnectionError("sim: events.pagerduty.sim refused the connection")
            problem = _pd_problem(body)
            if problem:
                return _response(url, 400, {"status": "invalid event", "errors": [problem]})
            w.deliveries.append(
                Call(
                    t,
                    actor,
                    "notify",
                    json.dumps(body, sort_keys=True),
                    True,
                    {"channel": "pagerduty", "body": body},
                )
            )
            return _response(url, 202, {"status": "success", "dedup_key": body.get("dedup_key")})
        if host == "hooks.slack.sim":
            if w.event_active("receiver_down", t, "slack"):
                return _response(url, 503, {"ok": False})
            if not isinstance(body, dict) or not body.get("text"):
                return _response(url, 400, {"ok": False, "error": "no_text"})
            w.deliveries.append(
                Call(
                    t,
                    actor,
                    "notify",
                    json.dumps(body, sort_keys=True),
                    True,
                    {"channel": "slack", "body": body},
                )
            )
            return _response(url, 200, {"ok": True})
        if host == "api.statuspage.sim":
            return self._statuspage(method, url, body, kw, t, actor)
        if host == "hooks.sim":
            slow = w.event_active("hook_slow", t)
            latency = slow.value if slow else 0.1
            headers = {k.lower(): v for k, v in (kw.get("headers") or {}).items()}
            key = f"http {method} {url} {json.dumps(body, sort_keys=True)}"
            w.calls.append(
                Call(
                    t,
                    actor,
                    "http",
                    key,
                    True,
                    {"idempotency_key": headers.get("idempotency-key"), "body": body},
                )
            )
            if latency > timeout:
                self.executor.charge(timeout)
                raise requests.exceptions.ReadTimeout(f"sim: {url} read timed out (read timeout={timeout:g})")
            self.executor.charge(latency)
            return _response(url, 200, {"ok": True})
        raise requests.ConnectionError(f"sim: no route to {host}")

    def _statuspage_get(self, url: str, what: str) -> Any:
        """GET an incident (its updates newest first, as Statuspage shows them) or the unresolved ones."""

        def shown(sid: str) -> dict[str, Any]:
            bodies = [b["incident"] for b in self.world.statuspage[sid]]
            status = "investigating"
            updates = []
            for inc in bodies:
                status = inc.get("status", status)
                if "body" in inc:
                    updates.insert(0, {"body": inc["body"], "status": status})
            return {
                "id": sid,
                "status": status,
                "metadata": bodies[0].get("metadata"),
                "incident_updates": updates,
            }

        if what == "unresolved":
            found = [shown(sid) for sid in self.world.statuspage]
            return _response(url, 200, [i for i in found if i["status"] != "resolved"])
        if what in self.world.statuspage:
            return _response(url, 200, shown(what))
        return _response(url, 404, {"error": f"no incident {what}"})

    def _statuspage(self, method: str, url: str, body: Any, kw: dict[str, Any], t: float, actor: str) -> Any:
        """Atlassian Statuspage v1 as the world runs it: OAuth key, create answers its own id (201),
        PATCH of an unknown id is 404; down -> 503, slow -> the answer takes that long."""
        w = self.world
        headers = {k.lower(): v for k, v in (kw.get("headers") or {}).items()}
        if headers.get("authorization") != f"OAuth {STATUSPAGE_KEY}":
            return _response(url, 401, {"error": "unauthorized"})
        slow = w.event_active("receiver_slow", t, "statuspage")
        if slow is not None:
            self.executor.charge(slow.value)
        if w.event_active("receiver_down", t, "statuspage"):
            return _response(url, 503, {"error": "service unavailable"})
        path = urlsplit(url).path
        base = f"/v1/pages/{STATUSPAGE_PAGE}/incidents"
        if method.upper() == "GET":
            return self._statuspage_get(url, path.removeprefix(base + "/"))
        if not isinstance(body, dict) or not isinstance(body.get("incident"), dict):
            return _response(url, 400, {"error": "incident missing"})
        if method.upper() == "POST" and path == base:
            sid = f"sp{len(w.statuspage) + 1}"
            w.statuspage[sid] = [body]
            key = f"create {json.dumps(body, sort_keys=True)}"
            w.deliveries.append(
                Call(t, actor, "notify", key, True, {"channel": "statuspage", "body": body, "id": sid})
            )
            return _response(url, 201, {"id": sid, **body["incident"]})
        sid = path.removeprefix(base + "/")
        if method.upper() == "PATCH" and sid in w.statuspage:
            w.statuspage[sid].append(body)
            key = f"update {sid} {json.dumps(body, sort_keys=True)}"
            w.deliveries.append(
                Call(t, actor, "notify", key, True, {"channel": "statuspage", "body": body, "id": sid})
            )
            return _response(url, 200, {"id": sid})
        return _response(url, 404, {"error": f"no incident {sid}"})


class SimSMTP:
    """`smtplib.SMTP` as the world's mail relay answers it: the real `controller.notify.email.send`
    builds and submits the message; the relay can refuse connections (down), answer 451 (a
    transient refusal), or be slow. A delivery is recorded under the outbox key the message carries
    (`X-Continuity-Key`), so a resend of one message counts twice."""

    world: World
    executor: InlineExecutor
    clock: Any

    def __init__(self, host: str = "", port: int = 0, timeout: float = 30.0, **_: Any) -> None:
        w = self.world
        actor = ACTOR.get()
        if actor in w.dead:
            raise ConnectionRefusedError(111, "sim: this process is dead")
        self.t = w.rel(self.clock())
        self.actor = actor
        self.executor.charge(0.02)
        if w.event_active("receiver_down", self.t, "email"):
            raise ConnectionRefusedError(111, f"sim: {host}:{port} refused the connection")
        slow = w.event_active("receiver_slow", self.t, "email")
        if slow is not None:
            if slow.value >= timeout:
                self.executor.charge(timeout)
                raise TimeoutError(f"sim: {host}:{port} timed out")
            self.executor.charge(slow.value)

    def __enter__(self) -> SimSMTP:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def starttls(self, context: Any = None) -> tuple[int, bytes]:
        return 220, b"ready to start TLS"

    def login(self, user: str, password: str) -> tuple[int, bytes]:
        return 235, b"ok"

    def send_message(self, msg: Any, from_addr: str | None = None, to_addrs: Any = None) -> dict[str, Any]:
        w = self.world
        if w.event_active("smtp_451", self.t):
            raise smtplib.SMTPResponseException(451, b"4.3.0 sim: try again later")
        to = list(to_addrs or [])
        key = json.dumps({"key": msg["X-Continuity-Key"], "to": to}, sort_keys=True)
        w.deliveries.append(
            Call(
                self.t,
                self.actor,
                "notify",
                key,
                True,
                {"channel": "email", "subject": str(msg["Subject"]), "message_id": str(msg["Message-ID"])},
            )
        )
        return {}


_TLS: ssl.SSLContext | None = None


@contextmanager
def patched_network(http: SimHttp) -> Iterator[None]:
    """Route every `requests` call of this run to the world (the notifier channels, the http action),
    and every SMTP connection to the world's relay."""
    original = requests.Session.request
    original_smtp = smtplib.SMTP

    def request(session: Any, method: str, url: str, **kw: Any) -> Any:
        return http.request(method, url, **kw)

    original_tls = ssl.create_default_context

    def tls(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        # Loading the system CA bundle costs 0.4 s a message; the relay is simulated, so one
        # context, built once per process, serves every send.
        global _TLS
        if _TLS is None:
            _TLS = original_tls()
        return _TLS

    relay = type(
        "BoundSimSMTP", (SimSMTP,), {"world": http.world, "executor": http.executor, "clock": http.clock}
    )
    requests.Session.request = request  # type: ignore[method-assign]
    smtplib.SMTP = relay  # type: ignore[misc]
    ssl.create_default_context = tls
    try:
        yield
    finally:
        requests.Session.request = original  # type: ignore[method-assign]
        smtplib.SMTP = original_smtp  # type: ignore[misc]
        ssl.create_default_context = original_tls


# ====================================================================== store and leadership

WRITES = {
    "open_incident",
    "update_incident",
    "append",
    "append_many",
    "create_run",
    "update_run",
    "update_step",
    "add_step",
    "set_flag",
    "enqueue",
    "delivered",
    "retry_later",
    "give_up",
    "set_ref",
}


class ProcessStore:
    """The real store as one controller process sees it: faults on the world's schedule."""

    def __init__(self, inner: Any, world: World, actor: str, executor: InlineExecutor, clock: Any) -> None:
        self._inner = inner
        self._world = world
        self._actor = actor
        self._executor = executor
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target):
            return target
        world, actor = self._world, self._actor

        def call(*args: Any, **kwargs: Any) -> Any:
            if actor in world.dead:
                raise StoreError(f"sim: process {actor} is dead")
            t = world.rel(self._clock())
            slow = world.event_active("store_slow", t)
            if slow is not None:
                self._executor.charge(slow.value)
            if name in WRITES and world.event_active("store_error", t) is not None:
                raise StoreError("sim: database or disk is full")
            return target(*args, **kwargs)

        return call


class SimElector:
    """Leadership as the world decides it (a Lease whose holder the scenario picks)."""

    def __init__(self, identity: str, world: World) -> None:
        self.identity = identity
        self.world = world
        self.leading = asyncio.Event()

    def is_leader(self) -> bool:
        ok = self.world.leader == self.identity and self.identity not in self.world.dead
        if ok:
            self.leading.set()
        else:
            self.leading.clear()
        return ok

    async def try_acquire_or_renew(self) -> bool:
        return self.is_leader()

    async def release(self) -> None:
        return None

    async def run(self, stop_event: asyncio.Event) -> None:
        await stop_event.wait()


class SeededSecrets:
    """`secrets` for controller.stores.model during a run: ids from the seed, so a replay is identical."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed ^ 0x1D5)

    def token_hex(self, n: int = 16) -> str:
        return "".join(f"{self.rng.randrange(256):02x}" for _ in range(n))


# ====================================================================== the controller's HTTP API, in process


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False


class _Protocol:
    """The few attributes aiohttp's Request reads from its connection's protocol."""

    max_field_size = 8190
    max_line_length = 8190
    max_headers = 128
    ssl_context = None

    def __init__(self, transport: _Transport) -> None:
        self.transport = transport
        self.peername = transport.peer
        self.sockname = ("10.0.0.10", 8080)
        self.writer: Any = None

    def pause_reading(self, **_: Any) -> None:
        return None

    def resume_reading(self, **_: Any) -> None:
        return None


class SimApi:
    """The real aiohttp application of one controller process (`controller.api.app`), called in
    process on the virtual loop: the request goes through the app's router to the production
    handler, with its real token checks and rate limit, the body streamed as a client sends it;
    only the socket is missing (the request is built as aiohttp's server builds it from a parsed
    message, as `aiohttp.test_utils.make_mocked_request` does without its mocks, which cost 0.1 s a
    request)."""

    def __init__(self, ctrl: Any, remote: str = "10.9.0.1") -> None:
        from controller import api

        self.app = api.app(ctrl)
        self.app.freeze()
        self.remote = remote

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = None, remote: str | None = None
    ) -> tuple[int, Any]:
        from aiohttp import streams, web
        from aiohttp.http import HttpVersion11, RawRequestMessage
        from multidict import CIMultiDict, CIMultiDictProxy
        from yarl import URL

        loop = asyncio.get_running_loop()
        data = json.dumps(body if body is not None else {}).encode() if method != "GET" else b""
        headers = {"Host": "continuity.sim", "Content-Length": str(len(data))}
        if data:
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        proxy = CIMultiDictProxy(CIMultiDict(headers))
        raw = tuple((k.encode(), v.encode()) for k, v in headers.items())
        message = RawRequestMessage(
            method, path, HttpVersion11, proxy, raw, False, None, False, False, URL(path)
        )
        protocol = _Protocol(_Transport((remote or self.remote, 40_000)))
        reader = streams.StreamReader(protocol, 2**16, loop=loop)  # type: ignore[arg-type]
        if data:
            reader.feed_data(data)
        reader.feed_eof()
        request = web.Request(message, reader, protocol, None, None, loop)  # type: ignore[arg-type]
        match = await self.app.router.resolve(request)
        match.add_app(self.app)
        match.freeze()
        request._match_info = match
        try:
            response = await match.handler(request)
        except web.HTTPException as exc:
            return exc.status, None
        except Exception as exc:  # aiohttp's server answers an unhandled error with a 500
            return 500, {"error": f"{type(exc).__name__}: {exc}"}
        text = getattr(response, "body", None)
        try:
            answer = json.loads(text) if text else None
        except (TypeError, ValueError):
            answer = None
        return response.status, answer


# ====================================================================== the Lease API, for the real elector


class SimLeaseApi:
    """`coordination.k8s.io/v1` Leases as an API server keeps them, for the real `LeaseElector`
    (controller/leader.py) in place of its `CoordinationV1Api`: reads, creates and replaces with
    resourceVersion conflicts (409) exactly as etcd orders them. A replica cut off from the API
    server (the world's `lease_partition`) waits out its request timeout and fails; a dead process
    is refused. Every change of holder goes to the world's leadership log, the truth against which
    `one-actor-at-a-time` is checked."""

    def __init__(self, world: World, executor: InlineExecutor, clock: Any) -> None:
        self.world = world
        self.executor = executor
        self.clock = clock
        self.body: dict[str, Any] | None = None
        self.version = 0
        self.partitions: list[tuple[str, float, float]] = []
        """(actor, from, until) in relative seconds: that process cannot reach the API server."""

    def _enter(self, timeout: float | None) -> None:
        from urllib3.exceptions import NewConnectionError, ReadTimeoutError

        actor = ACTOR.get()
        if actor in self.world.dead:
            raise NewConnectionError(None, "sim: this process is dead")  # type: ignore[arg-type]
        t = self.world.rel(self.clock())
        if any(a == actor and start <= t < until for a, start, until in self.partitions):
            self.executor.charge(timeout or 2.0)
            raise ReadTimeoutError(None, "/apis/coordination.k8s.io/v1", "sim: partitioned")  # type: ignore[arg-type]
        self.executor.charge(0.005)

    def _model(self) -> Any:
        from kubernetes.client import V1Lease, V1LeaseSpec, V1ObjectMeta

        assert self.body is not None
        spec = self.body.get("spec") or {}

        def when(value: Any) -> Any:
            return datetime.fromisoformat(value) if isinstance(value, str) and value else None

        return V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=V1ObjectMeta(
                name=self.body["metadata"]["name"],
                namespace=self.body["metadata"].get("namespace"),
                resource_version=str(self.version),
            ),
            spec=V1LeaseSpec(
                holder_identity=spec.get("holderIdentity") or None,
                lease_duration_seconds=spec.get("leaseDurationSeconds"),
                acquire_time=when(spec.get("acquireTime")),
                renew_time=when(spec.get("renewTime")),
                lease_transitions=spec.get("leaseTransitions"),
            ),
        )

    def _store(self, body: dict[str, Any]) -> Any:
        before = ((self.body or {}).get("spec") or {}).get("holderIdentity") or None
        self.version += 1
        self.body = json.loads(json.dumps(body))
        holder = (body.get("spec") or {}).get("holderIdentity") or None
        if holder != before:
            t = self.world.rel(self.clock())
            self.world.leader = holder
            self.world.leadership.append((t, holder))
        return self._model()

    def read_namespaced_lease(self, name: str, namespace: str, _request_timeout: float | None = None) -> Any:
        from kubernetes.client.rest import ApiException

        self._enter(_request_timeout)
        if self.body is None:
            raise ApiException(status=404, reason="Not Found")
        return self._model()

    def create_namespaced_lease(
        self, namespace: str, body: dict[str, Any], _request_timeout: float | None = None
    ) -> Any:
        from kubernetes.client.rest import ApiException

        self._enter(_request_timeout)
        if self.body is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        return self._store(body)

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: dict[str, Any], _request_timeout: float | None = None
    ) -> Any:
        from kubernetes.client.rest import ApiException

        self._enter(_request_timeout)
        if self.body is None:
            raise ApiException(status=404, reason="Not Found")
        if str((body.get("metadata") or {}).get("resourceVersion")) != str(self.version):
            raise ApiException(status=409, reason="Conflict: the object has been modified")
        return self._store(body)


def lease_elector(actor: str, api: SimLeaseApi, clock: Any) -> Any:
    """The production LeaseElector with client-go's default timings, on the virtual clock, talking
    to the simulated Lease API (its `_api` is the one seam: the elector builds its own client)."""
    from kubernetes.client import ApiClient

    from controller.leader import LeaseElector

    elector = LeaseElector(
        ApiClient(),
        "continuity",
        "continuity-leader",
        actor,
        lease_duration=15.0,
        renew_deadline=10.0,
        retry_period=2.0,
        clock=clock,
        wall_clock=lambda: datetime.fromtimestamp(clock(), UTC),
        registry=None,
        pool=None,
    )
    elector._api = api  # type: ignore[assignment]
    return elector
