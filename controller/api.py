"""The controller's HTTP surface: /healthz, /readyz, /metrics, read-only incident views, the human
commands and the pushed inputs (Alertmanager, heartbeats, agents' results).

Nothing unauthenticated acts: writes and pushes need the bearer token (a heartbeat probe may carry
its own, or be marked `public`); with no token configured they are refused, not open. The one
exception is the explicit `controller.insecure_unauthenticated_pushes`, logged and exported. Pushes
are rate-limited per source address before anything else is read.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import time
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller import commands, remote
from controller.loop import Controller
from controller.stores import StoreError
from probes import passive

log = structlog.get_logger("continuity.api")


class RateLimit:
    """A token bucket per source address: `rate` per second, `burst` at once. Bounded: beyond
    `max_sources` addresses the least recently seen is forgotten (it starts with a full bucket)."""

    def __init__(self, rate: float, burst: int, max_sources: int = 10_000) -> None:
        self.rate, self.burst, self.max_sources = rate, float(burst), max_sources
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, source: str, now: float) -> float:
        """0 when the push may go ahead, else the seconds to wait before the next one."""
        tokens, last = self.buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self.buckets[source] = (tokens, now)
        while len(self.buckets) > self.max_sources:
            del self.buckets[next(iter(self.buckets))]
        return wait


def app(controller: Controller) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            await controller.astore.list_incidents(limit=1)
        except StoreError as exc:
            return web.json_response({"status": "not ready", "reason": str(exc)}, status=503)
        return web.json_response({"status": "ready", "services": len(controller.config.services)})

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(controller.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def incidents(request: web.Request) -> web.Response:
        status = request.query.get("status")
        return web.json_response([i.to_dict() for i in await controller.astore.list_incidents(status=status)])

    async def incident(request: web.Request) -> web.Response:
        inc = await controller.astore.get_incident(request.match_info["id"])
        if inc is None:
            return web.json_response({"error": "no such incident"}, status=404)
        body: dict[str, Any] = inc.to_dict()
        body["timeline"] = [dataclasses.asdict(e) for e in await controller.astore.timeline(inc.id)]
        return web.json_response(body)

    async def leader(_: web.Request) -> web.Response:
        elector = controller.elector
        return web.json_response(
            {
                "leader": controller.may_act(),
                "identity": getattr(elector, "identity", None),
                "backend": controller.config.leader.backend,
            }
        )

    async def services(_: web.Request) -> web.Response:
        failover = await controller.astore.failover_states()
        out: dict[str, Any] = {}
        for name, h in controller.detection.health().items():
            out[name] = {"state": h.state.value, "failing": list(h.failing)}
            if (fo := failover.get(name)) is not None:  # primary and never moved: no entry
                out[name]["failover"] = {
                    "state": fo.state,
                    "run_id": fo.run_id,
                    "incident_id": fo.incident_id,
                    "since": fo.since,
                    "reason": fo.reason,
                }
        return web.json_response(out)

    token = os.environ.get(controller.config.controller.api_token_env, "")

    settings = controller.config.controller
    insecure = settings.insecure_unauthenticated_pushes
    controller.metrics.insecure_pushes.set(1 if insecure else 0)
    if insecure:
        log.warning(
            "INSECURE: Alertmanager webhooks and heartbeats are accepted without a credential; anyone "
            "who reaches this port can open incidents (controller.insecure_unauthenticated_pushes)"
        )
    elif not token:
        log.warning(
            f"{settings.api_token_env} is not set: API writes, Alertmanager webhooks, agents' results and "
            "heartbeats without their own token_env (or `public: true`) are refused"
        )
    limiter = RateLimit(settings.push_rate, settings.push_burst)

    def gate(request: web.Request, endpoint: str) -> web.Response | None:
        """Rate limit per source address (the peer, never a header a client can set)."""
        wait = limiter.take(request.remote or "?", time.monotonic())
        if wait <= 0:
            return None
        controller.metrics.pushes_refused.labels(endpoint, "rate").inc()
        return web.json_response(
            {"error": f"too many pushes from {request.remote}: retry in {wait:.1f}s"},
            status=429,
            headers={"Retry-After": str(max(1, round(wait)))},
        )

    def refused(endpoint: str, answer: web.Response | None) -> web.Response | None:
        if answer is not None:
            controller.metrics.pushes_refused.labels(endpoint, "auth").inc()
        return answer

    def authorised(request: web.Request) -> web.Response | None:
        """Writes need the bearer token; with no token configured, writes are off (never open)."""
        if not token:
            return web.json_response(
                {"error": f"API writes are disabled: set {controller.config.controller.api_token_env}"},
                status=403,
            )
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response(
                {"error": "a valid bearer token is required"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None

    async def by(request: web.Request) -> tuple[str, str]:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        return str(body.get("by") or "api"), str(body.get("reason") or "")

    def command(fn: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            if (denied := authorised(request)) is not None:
                return denied
            who, reason = await by(request)
            try:  # the command reads and writes the store: on the STORE pool, never on the loop
                text = await controller.astore.call(fn, request, who, reason)
            except commands.CommandError as exc:
                return web.json_response({"error": str(exc)}, status=409)
            controller.kick()
            return web.json_response({"result": text})

        return handler

    def ack(request: web.Request, who: str, _: str) -> str:
        service = request.match_info["service"]
        if service not in controller.config.services:
            raise commands.CommandError(f"no service named {service!r}")
        return commands.ack(controller.store, service, who)

    async def runs(_: web.Request) -> web.Response:
        return web.json_response([dataclasses.asdict(r) for r in await controller.astore.runs()])

    async def run(request: web.Request) -> web.Response:
        found = await controller.astore.get_run(request.match_info["id"])
        if found is None:
            return web.json_response({"error": "no such run"}, status=404)
        body = dataclasses.asdict(found)
        body["steps"] = [dataclasses.asdict(s) for s in await controller.astore.steps(found.id)]
        return web.json_response(body)

    async def heartbeat(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        cfg = controller.config.probes.get(name)
        if (limited := gate(request, "heartbeat")) is not None:
            return limited
        if cfg is None or cfg.kind != "heartbeat":  # unknown names are never stored: bounded by the config
            return web.json_response({"error": f"no heartbeat probe named {name[:100]!r}"}, status=404)
        if cfg.token_env:
            want = os.environ.get(cfg.token_env, "")
            given = request.headers.get("Authorization", "")
            if not want or not hmac.compare_digest(given.encode(), f"Bearer {want}".encode()):
                controller.metrics.pushes_refused.labels("heartbeat", "auth").inc()
                return web.json_response({"error": "a valid bearer token is required"}, status=401)
        elif (
            not (cfg.public or insecure) and (denied := refused("heartbeat", authorised(request))) is not None
        ):
            return denied
        controller.inputs.heartbeat(name)
        return web.json_response({"result": f"heartbeat for {name} recorded"})

    async def alertmanager(request: web.Request) -> web.Response:
        if (limited := gate(request, "alertmanager")) is not None:
            return limited
        if not insecure and (denied := refused("alertmanager", authorised(request))) is not None:
            return denied
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response(
                {"error": "body: expected JSON (Alertmanager webhook payload v4)"}, status=400
            )
        dropped = controller.inputs.signals.dropped
        try:
            applied, dupes = controller.inputs.alertmanager(payload)
        except passive.PayloadError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        answer: dict[str, int] = {"applied": applied, "duplicates": dupes}
        if dropped := controller.inputs.signals.dropped - dropped:
            controller.metrics.pushed_dropped.labels("alert").inc(dropped)
            answer["dropped"] = dropped
        return web.json_response(answer)

    async def results(request: web.Request) -> web.Response:
        """Results from `continuity agent` at another vantage point; agents must authenticate."""
        if (limited := gate(request, "results")) is not None:
            return limited
        if (denied := refused("results", authorised(request))) is not None:
            return denied
        try:
            body = await request.json()
            batch = remote.parse_results(body)
        except (ValueError, remote.ResultError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        accepted = 0
        outcomes: dict[str, int] = {}
        now = controller.clock()
        for result in batch:
            outcome = "unknown"
            if result.probe in controller.config.probes and result.vantage != "local":
                known = controller.detection.vstates.get(result.probe, {})
                admitted, outcome = remote.admit(result, now, controller.config.freshness(result.probe))
                if result.vantage not in known and len(known) >= remote.MAX_VANTAGES:
                    admitted, outcome = None, "vantages"
                if admitted is not None:
                    controller.detection.ingest(admitted)
                    accepted += 1
            controller.metrics.agent_results.labels(outcome).inc()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        answer: dict[str, Any] = {"accepted": accepted, "ignored": len(batch) - accepted}
        if set(outcomes) - {"accepted", "unknown"}:
            answer["outcomes"] = outcomes
        return web.json_response(answer)

    application = web.Application()
    from controller import statuspage_site
    from controller.comms import api as comms_api

    comms_api.add_routes(application, controller, authorised)
    statuspage_site.add_routes(application, controller)
    from controller import console

    console.add_routes(application, controller)  # /console, its own login, CSRF and templates
    from controller import interactions

    interactions.install(application, controller)  # Slack buttons and PagerDuty webhooks, signed
    application.add_routes(
        [
            web.get("/runs", runs),
            web.get("/runs/{id}", run),
            web.post(
                "/runs/{id}/approve",
                command(lambda r, w, _: commands.approve(controller.store, r.match_info["id"], w)),
            ),
            web.post(
                "/runs/{id}/reject",
                command(lambda r, w, why: commands.reject(controller.store, r.match_info["id"], w, why)),
            ),
            web.post("/pause", command(lambda r, w, why: commands.pause(controller.store, w, why))),
            web.post("/resume", command(lambda r, w, _: commands.resume(controller.store, w))),
            web.post("/services/{service}/ack", command(ack)),
        ]
    )
    application.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/incidents", incidents),
            web.get("/incidents/{id}", incident),
            web.get("/services", services),
            web.get("/leader", leader),
            web.post("/heartbeat/{name}", heartbeat),
            web.post("/alertmanager", alertmanager),
            web.post("/results", results),
        ]
    )
    return application
