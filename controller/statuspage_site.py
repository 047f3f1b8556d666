"""The built-in status page: /status (HTML, no JavaScript), /status.json, /status.atom, /status/banner.js.

Served by the controller itself, so a marketplace without Statuspage still has one place customers
look. It shows what the customers audience is told (the same words the Communicator sent), the
current state of each service, open incidents with their latest update and ETA, and the history.
Every incident text goes through Jinja2 autoescaping (HTML and Atom), and the banner script only
ever sets `textContent`: an incident message cannot inject markup or script anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web

from controller.config import display_name
from controller.notify.common import human_time, iso
from controller.templates_path import TEMPLATES

if TYPE_CHECKING:
    from controller.loop import Controller
    from controller.stores import Incident

STATE = {"up": "operational", "degraded": "degraded", "down": "outage", "unknown": "unknown"}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=jinja2.StrictUndefined
)

BANNER_JS = """(function () {
  // Continuity status banner: <script src="https://status.example.com/status/banner.js" async></script>
  var me = document.currentScript;
  var base = me ? me.src.replace(/\\/status\\/banner\\.js.*$/, "") : "";
  fetch(base + "/status.json", {credentials: "omit"}).then(function (r) { return r.json(); })
    .then(function (s) {
      if (!s.open || !s.open.length) { return; }
      var inc = s.open[0];
      var bar = document.createElement("div");
      bar.setAttribute("role", "status");
      bar.style.cssText = "background:#fde8e8;color:#8a1c1c;padding:.6rem 1rem;" +
        "font:600 14px system-ui,sans-serif;";
      var link = document.createElement("a");
      link.href = base + "/status";
      link.style.color = "inherit";
      // textContent only: incident text is data, never markup.
      link.textContent = inc.headline + " - " + inc.public_status + (inc.eta ? " - ETA " + inc.eta : "");
      bar.appendChild(link);
      document.body.insertBefore(bar, document.body.firstChild);
    }).catch(function () {});
})();
"""


def snapshot(
    controller: Controller, now: float | None = None, incidents: list[Incident] | None = None
) -> dict[str, Any]:
    """What the page shows, as plain data (the JSON view is exactly this). `incidents` is the store's
    list, read by the caller off the loop (`snapshot_async`); without it (tools, tests) it is read here."""
    now = controller.clock() if now is None else now
    cfg = controller.config
    days = cfg.communications.history_days
    services = [
        {"name": name, "display": display_name(name, cfg.services.get(name)), "state": STATE[h.state.value]}
        for name, h in sorted(controller.detection.health().items())
    ]
    open_, history = [], []
    if incidents is None:
        incidents = controller.store.list_incidents(limit=1000)
    for inc in incidents:
        comms = inc.data.get("comms") or {}
        updates = comms.get("updates") or []
        latest = updates[-1] if updates else None
        svc = cfg.services.get(inc.service)
        name = inc.data.get("display") or display_name(inc.service, svc)
        health = comms.get("health", "down")
        item = {
            "id": inc.id,
            "service": inc.service,
            "headline": f"{name} {'unavailable' if health == 'down' else 'degraded'}",
            "severity": inc.severity,
            "public_status": "resolved"
            if inc.status == "resolved"
            else comms.get("public_status", "investigating"),
            "started_at": inc.started_at,
            "started": human_time(inc.started_at),
            "resolved_at": inc.resolved_at,
            "latest": {"text": latest["text"], "at": latest["at"], "when": human_time(latest["at"])}
            if latest
            else None,
            "eta": human_time(comms["eta"]) if inc.status == "open" and comms.get("eta") else None,
            "next_update": human_time(latest["next_update_at"])
            if inc.status == "open" and latest and latest.get("next_update_at")
            else None,
            "updates": [
                {"at": u["at"], "when": human_time(u["at"]), "status": u["status"], "text": u["text"]}
                for u in updates
            ],
        }
        if inc.status == "open":
            open_.append(item)
        elif (inc.resolved_at or inc.opened_at) >= now - days * 86400:
            item["duration"] = _duration((inc.resolved_at or now) - inc.started_at)
            history.append(item)
    return {
        "title": cfg.communications.status_page_title,
        "generated_at": iso(now),
        "days": days,
        "services": services,
        "open": open_,
        "history": history,
    }


def _duration(seconds: float) -> str:
    from controller.durations import format_duration

    return format_duration(max(seconds, 0.0))


def render_html(snap: dict[str, Any]) -> str:
    return _env.get_template("status.html.j2").render(**snap)


def render_atom(snap: dict[str, Any], base: str) -> str:
    entries = []
    for inc in [*snap["open"], *snap["history"]]:
        for n, u in enumerate(inc["updates"]):
            entries.append(
                {
                    "id": f"{inc['id']}-{n}",
                    "title": f"{inc['headline']}: {u['status']}",
                    "updated": iso(u["at"]),
                    "text": u["text"],
                    "at": u["at"],
                }
            )
    entries.sort(key=lambda e: e["at"], reverse=True)
    updated = entries[0]["updated"] if entries else snap["generated_at"]
    return _env.get_template("status.atom.j2").render(
        title=snap["title"], base=base, updated=updated, entries=entries[:100]
    )


async def snapshot_async(controller: Controller) -> dict[str, Any]:
    """`snapshot` with the store read on the STORE pool (the HTTP handlers: never on the loop)."""
    return snapshot(controller, incidents=await controller.astore.list_incidents(limit=1000))


def add_routes(app: web.Application, controller: Controller) -> None:
    """Mount the public status views on the controller's HTTP app (read-only, no token)."""

    async def html(_: web.Request) -> web.Response:
        return web.Response(
            text=render_html(await snapshot_async(controller)),
            content_type="text/html",
            headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
        )

    async def json_(_: web.Request) -> web.Response:
        return web.json_response(
            await snapshot_async(controller), headers={"Access-Control-Allow-Origin": "*"}
        )

    async def atom(_: web.Request) -> web.Response:
        # Links come from the configured public URL, never from the request's Host header: a
        # forged Host would otherwise put an attacker's links into every cached copy of the feed.
        base = (controller.config.controller.public_url or "").rstrip("/")
        return web.Response(
            text=render_atom(await snapshot_async(controller), base), content_type="application/atom+xml"
        )

    async def banner(_: web.Request) -> web.Response:
        return web.Response(
            text=BANNER_JS,
            content_type="application/javascript",
            headers={"Cache-Control": "max-age=60", "Access-Control-Allow-Origin": "*"},
        )

    app.add_routes(
        [
            web.get("/status", html),
            web.get("/status.json", json_),
            web.get("/status.atom", atom),
            web.get("/status/banner.js", banner),
        ]
    )
