"""The controller's HTTP surface: /healthz, /readyz, /metrics, and read-only incident views.

Write endpoints (approvals, acknowledgements, the Alertmanager receiver) arrive with later
issues, behind a bearer token.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller import commands, remote
from controller.loop import Controller
from controller.store import StoreError
from probes import passive


def app(controller: Controller) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            controller.store.list_incidents(limit=1)
        except StoreError as exc:
            return web.json_response({"status": "not ready", "reason": str(exc)}, status=503)
        return web.json_response({"status": "ready", "services": len(controller.config.services)})

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(controller.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def incidents(request: web.Request) -> web.Response:
        status = request.query.get("status")
        return web.json_response([i.to_dict() for i in controller.store.list_incidents(status=status)])

    async def incident(request: web.Request) -> web.Response:
        inc = controller.store.get_incident(request.match_info["id"])
        if inc is None:
            return web.json_response({"error": "no such incident"}, status=404)
        body: dict[str, Any] = inc.to_dict()
        body["timeline"] = [dataclasses.asdict(e) for e in controller.store.timeline(inc.id)]
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
        failover = controller.store.failover_states()
        out: dict[str, Any] = {}
        for name, h in controller.health().items():
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
            try:
                text = fn(request, who, reason)
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
        return web.json_response([dataclasses.asdict(r) for r in controller.store.runs()])

    async def run(request: web.Request) -> web.Response:
        found = controller.store.get_run(request.match_info["id"])
        if found is None:
            return web.json_response({"error": "no such run"}, status=404)
        body = dataclasses.asdict(found)
        body["steps"] = [dataclasses.asdict(s) for s in controller.store.steps(found.id)]
        return web.json_response(body)

    async def heartbeat(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        cfg = controller.config.probes.get(name)
        if cfg is None or cfg.kind != "heartbeat":
            return web.json_response({"error": f"no heartbeat probe named {name!r}"}, status=404)
        if cfg.token_env:
            want = os.environ.get(cfg.token_env, "")
            given = request.headers.get("Authorization", "")
            if not want or not hmac.compare_digest(given.encode(), f"Bearer {want}".encode()):
                return web.json_response({"error": "a valid bearer token is required"}, status=401)
        controller.heartbeat(name)
        return web.json_response({"result": f"heartbeat for {name} recorded"})

    async def alertmanager(request: web.Request) -> web.Response:
        if token and (denied := authorised(request)) is not None:
            return denied
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response(
                {"error": "body: expected JSON (Alertmanager webhook payload v4)"}, status=400
            )
        try:
            applied, dupes = controller.alertmanager(payload)
        except passive.PayloadError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"applied": applied, "duplicates": dupes})

    async def results(request: web.Request) -> web.Response:
        """Results from `continuity agent` at another vantage point; agents must authenticate."""
        if (denied := authorised(request)) is not None:
            return denied
        try:
            body = await request.json()
            batch = remote.parse_results(body)
        except (ValueError, remote.ResultError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        accepted = 0
        for result in batch:
            if result.probe in controller.config.probes and result.vantage != "local":
                controller.ingest(result)
                accepted += 1
        return web.json_response({"accepted": accepted, "ignored": len(batch) - accepted})

    application = web.Application()
    from controller import statuspage_site
    from controller.comms import api as comms_api

    comms_api.add_routes(application, controller, authorised)
    statuspage_site.add_routes(application, controller)
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
