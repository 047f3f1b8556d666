"""HTTP doors to the incident commands: POST /incidents/{id}/ack|update|resolve|assign.

Writes need the bearer token (api.py's `authorised`, passed in so there is one check for every
write); the handlers call the same functions as the CLI (`controller.comms.commands`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controller.commands import CommandError
from controller.comms import commands

if TYPE_CHECKING:
    from controller.loop import Controller


def add_routes(
    app: web.Application, controller: Controller, authorised: Callable[[web.Request], web.Response | None]
) -> None:
    def door(fn: Callable[[str, str, dict[str, Any]], str]) -> Any:
        async def handler(request: web.Request) -> web.Response:
            if (denied := authorised(request)) is not None:
                return denied
            try:
                body = await request.json() if request.can_read_body else {}
            except ValueError:
                return web.json_response({"error": "the body must be JSON"}, status=400)
            body = body if isinstance(body, dict) else {}
            try:  # the command reads and writes the store: on the STORE pool, never on the loop
                text = await controller.astore.call(
                    fn, request.match_info["id"], str(body.get("by") or "api"), body
                )
            except CommandError as exc:
                return web.json_response({"error": str(exc)}, status=409)
            controller.kick()
            return web.json_response({"result": text})

        return handler

    store = controller.store
    app.add_routes(
        [
            web.post("/incidents/{id}/ack", door(lambda i, by, b: commands.ack(store, i, by))),
            web.post(
                "/incidents/{id}/update",
                door(
                    lambda i, by, b: commands.update(
                        store,
                        i,
                        by,
                        b.get("status"),
                        str(b.get("message") or ""),
                        str(b["eta"]) if b.get("eta") else None,
                    )
                ),
            ),
            web.post(
                "/incidents/{id}/resolve",
                door(lambda i, by, b: commands.resolve(store, i, by, str(b.get("message") or ""))),
            ),
            web.post(
                "/incidents/{id}/assign",
                door(lambda i, by, b: commands.assign(store, i, by, str(b.get("ic") or ""))),
            ),
        ]
    )
