"""The controller's HTTP surface: /healthz, /readyz, /metrics, and read-only incident views.

Write endpoints (approvals, acknowledgements, the Alertmanager receiver) arrive with later
issues, behind a bearer token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.loop import Controller
from controller.store import StoreError


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

    async def services(_: web.Request) -> web.Response:
        return web.json_response(
            {
                name: {"state": h.state.value, "failing": list(h.failing)}
                for name, h in controller.health().items()
            }
        )

    application = web.Application()
    application.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/incidents", incidents),
            web.get("/incidents/{id}", incident),
            web.get("/services", services),
        ]
    )
    return application
