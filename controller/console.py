"""The operator console at /console: what a responder needs at 3 a.m., in a browser.

Server-rendered with Jinja2 (autoescaping on: every incident text, probe reason and step detail is
data, never markup), with one small script for the live timeline (server-sent events, built with
`textContent`) and confirmations. Every button posts a form to a handler that calls the same
functions as the CLI (`controller.commands`, `controller.comms.commands`): a durable flag or
request in the store, applied by the controller in its next cycle. So the console adds no second
way of acting, only a second door.

Who may use it:
- with the API token (`controller.api_token_env`): a login form takes the token once and sets a
  signed, HttpOnly, SameSite=Strict session cookie naming the user; or a request may carry
  `Authorization: Bearer <token>` itself;
- behind an authenticating proxy (`console.trusted_header`, e.g. X-Forwarded-Email): the header
  names the user, believed only from `console.trusted_proxies`.
Nothing else sees a console page, and with neither configured the console is off (never open).

Every form carries a CSRF token bound to the user (HMAC with the session key); a POST without it,
or from another Origin, is refused before anything is read into a command.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web

from controller import commands
from controller.commands import CommandError
from controller.comms import commands as comms_commands
from controller.durations import format_duration, parse_duration
from controller.stores import Incident, Run, Store
from controller.stores.aio import Snapshot

if TYPE_CHECKING:
    from controller.loop import Controller

HERE = Path(__file__).resolve().parent / "templates" / "console"
COOKIE = "continuity_console"
FLASH = "continuity_flash"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(HERE)), autoescape=True, undefined=jinja2.StrictUndefined
)


def clock_text(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "-"


def short_time(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts)) if ts else "-"


_env.filters["when"] = clock_text
_env.filters["hms"] = short_time
_env.filters["duration"] = lambda s: format_duration(max(float(s), 0.0))


class Auth:
    """Sessions and CSRF tokens, both HMACs under one key derived from the API token (rotating the
    token logs everyone out); behind a proxy with no token, a per-process random key."""

    def __init__(self, token: str, header: str | None, proxies: list[str], ttl: float) -> None:
        self.token = token
        self.header = header
        self.proxies = [ipaddress.ip_network(p, strict=False) for p in proxies]
        self.ttl = ttl
        seed = token.encode() if token else secrets.token_bytes(32)
        self.key = hmac.new(seed, b"continuity-console-v1", hashlib.sha256).digest()

    @property
    def enabled(self) -> bool:
        return bool(self.token or self.header)

    def _sign(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def cookie(self, user: str, now: float) -> str:
        name = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        body = f"{name}.{int(now + self.ttl)}"
        return f"{body}.{self._sign('session:' + body)}"

    def from_cookie(self, value: str, now: float) -> str | None:
        try:
            name, expiry, sig = value.split(".")
            if not hmac.compare_digest(sig, self._sign(f"session:{name}.{expiry}")) or int(expiry) < now:
                return None
            return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None

    def csrf(self, user: str) -> str:
        return self._sign(f"csrf:{user}")[:40]

    def trusted_peer(self, request: web.Request) -> bool:
        try:
            peer = ipaddress.ip_address((request.remote or "").split("%")[0])
        except ValueError:
            return False
        return any(peer in net for net in self.proxies)

    def user(self, request: web.Request, now: float) -> str | None:
        """Who is asking, or None: proxy header (from a trusted peer), bearer token, session cookie."""
        if self.header and request.headers.get(self.header) and self.trusted_peer(request):
            return request.headers[self.header].strip()[:200] or None
        if self.token:
            given = request.headers.get("Authorization", "")
            if given and hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return (request.headers.get("X-Continuity-User") or "api").strip()[:200]
            cookie = request.cookies.get(COOKIE)
            if cookie:
                return self.from_cookie(cookie, now)
        return None


def _page(name: str, request: web.Request, status: int = 200, **ctx: Any) -> web.Response:
    flash = request.cookies.get(FLASH)
    text = _env.get_template(name).render(flash=_read_flash(flash), **ctx)
    resp = web.Response(text=text, content_type="text/html", status=status, headers=_headers())
    if flash:
        resp.del_cookie(FLASH, path="/console")
    return resp


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={**_headers(), "Location": location})


def _headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "X-Frame-Options": "DENY",
    }


def _read_flash(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode())
        return {"kind": str(data["kind"]), "text": str(data["text"])}
    except (ValueError, KeyError, TypeError):
        return None


def _flash(resp: web.StreamResponse, kind: str, text: str) -> None:
    value = base64.urlsafe_b64encode(json.dumps({"kind": kind, "text": text[:600]}).encode()).decode()
    resp.set_cookie(FLASH, value.rstrip("="), path="/console", httponly=True, samesite="Strict", max_age=60)


def _local_next(value: str | None, default: str = "/console") -> str:
    """Only redirect within the console: never an open redirect."""
    if value and value.startswith("/console") and not value.startswith("//") and "\\" not in value:
        return value
    return default


# ---------------------------------------------------------------- views (plain data)


def failover_state(service: str, states: dict[str, Any], controller: Controller) -> dict[str, Any]:
    """The service's persisted failover state, as decide moved it (`store.failover_states()`, read
    once by the caller for a page of services; a service never moved is on its primary)."""
    svc = controller.config.services.get(service)
    if svc is None or not svc.playbook:
        return {"state": "no playbook", "run": None}
    record = states.get(service)
    if record is None:
        return {"state": "primary", "run": None}
    return {
        "state": record.state.replace("_", " "),
        "run": record.run_id,
        "reason": record.reason,
        "since": record.since,
    }


def _run_views(store: Store, runs: list[Run]) -> list[dict[str, Any]]:
    """Runs with their steps and their approval answer (blocking: called on the STORE pool)."""
    return [
        {
            **dataclasses.asdict(run),
            "steps": [dataclasses.asdict(s) for s in store.steps(run.id)],
            "answer": store.get_flag(f"approval:{run.id}"),
        }
        for run in runs
    ]


def _incident_view(inc: Incident, now: float) -> dict[str, Any]:
    comms = inc.data.get("comms") or {}
    roles = comms.get("roles") or {}
    return {
        **inc.to_dict(),
        "public_status": "resolved"
        if inc.status == "resolved"
        else comms.get("public_status", "investigating"),
        "acked_by": comms.get("acked_by"),
        "acked_at": comms.get("acked_at"),
        "ic": roles.get("incident_commander"),
        "eta": comms.get("eta"),
        "duration": (inc.resolved_at or now) - inc.started_at,
        "grouped": inc.data.get("services") or [],
    }


def _overview_reads(store: Store) -> tuple[list[Incident], Snapshot, list[dict[str, Any]]]:
    """Everything the overview reads from the store, in one trip to the STORE pool (blocking)."""
    incidents = store.list_incidents(limit=200)
    runs = store.runs()
    snap = Snapshot(
        open_incidents=[i for i in incidents if i.status == "open"],
        all_flags=store.flags(),
        failover=store.failover_states(),
        runs=runs,
        outbox=[],
    )
    return incidents, snap, _run_views(store, [r for r in runs if r.state == "awaiting_approval"])


async def overview(controller: Controller) -> dict[str, Any]:
    now = controller.clock()
    incidents, snap, awaiting = await controller.astore.call(_overview_reads, controller.store)
    health = controller.detection.health()
    silenced = controller.observer.silenced(now, snap)
    frozen = {k.removeprefix("frozen:"): v for k, v in snap.flags("frozen:").items()}
    services = []
    for name, svc in controller.config.services.items():
        h = health.get(name)
        services.append(
            {
                "name": name,
                "tier": svc.tier,
                "state": h.state.value if h else "unknown",
                "failing": list(h.failing) if h else [],
                "silenced": silenced.get(name),
                "frozen": frozen.get(name),
                "failover": failover_state(name, snap.failover, controller),
                "region": getattr(svc, "region", None),
            }
        )
    return {
        "now": now,
        "paused": snap.flag("paused"),
        "open": [_incident_view(i, now) for i in incidents if i.status == "open"],
        "recent": [_incident_view(i, now) for i in incidents if i.status != "open"][:15],
        "services": services,
        "awaiting": awaiting,
        "leader": controller.may_act(),
        "playbooks": sorted(controller.config.playbooks),
    }


async def timeline_entries(controller: Controller, incident_id: str, after: int = 0) -> list[dict[str, Any]]:
    """The incident's timeline (written and still queued), read on the STORE pool."""
    return [
        {
            "n": n,
            "ts": e.ts,
            "at": short_time(e.ts),
            "when": clock_text(e.ts),
            "kind": e.kind,
            "message": e.message,
        }
        for n, e in enumerate(await controller.astore.timeline(incident_id), 1)
        if n > after
    ]


def playbook_views(controller: Controller) -> list[dict[str, Any]]:
    from playbooks import guards
    from playbooks.engine import plan

    out = []
    for name, pb in sorted(controller.config.playbooks.items()):
        steps = []
        for step, (title, calls) in zip(pb.steps, plan(pb), strict=True):
            steps.append(
                {
                    "name": step.name,
                    "title": title,
                    "action": step.action,
                    "timeout": format_duration(step.timeout),
                    "retries": step.retries,
                    "group": step.group,
                    "guards": [guards.explain(g) for g in step.guards],
                    "calls": [c.render() for c in calls],
                    "rollback": step.rollback,
                }
            )
        used_by = [s for s, svc in controller.config.services.items() if svc.playbook == name]
        out.append(
            {
                "name": name,
                "description": pb.description,
                "approval": pb.approval,
                "auto_approve": pb.auto_approve,
                "cooldown": format_duration(pb.cooldown),
                "on_failure": pb.on_failure,
                "used_by": used_by,
                "steps": steps,
            }
        )
    return out


# ---------------------------------------------------------------- routes


def add_routes(app: web.Application, controller: Controller) -> None:
    """Mount /console on the controller's HTTP app. api.py calls this; it needs nothing else."""
    settings = controller.config.console
    if not settings.enabled:
        return
    token = os.environ.get(controller.config.controller.api_token_env, "")
    auth = Auth(token, settings.trusted_header, settings.trusted_proxies, settings.session_ttl)
    stopping = asyncio.Event()  # open event streams end at shutdown instead of holding it up

    async def on_shutdown(_: web.Application) -> None:
        stopping.set()

    app.on_shutdown.append(on_shutdown)

    def who(request: web.Request) -> str | None:
        return auth.user(request, time.time())

    def login_redirect(request: web.Request) -> web.Response:
        if not auth.enabled:
            env = controller.config.controller.api_token_env
            return _page(
                "off.html",
                request,
                status=403,
                reason=f"The console is off: set {env} (or console.trusted_header behind a proxy).",
            )
        return _redirect(f"/console/login?next={quote(request.path_qs, safe='')}")

    def view(fn: Callable[[web.Request, str], Any]) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            user = who(request)
            if user is None:
                return login_redirect(request)
            return await fn(request, user)

        return handler

    def action(fn: Callable[[web.Request, str, Any], str]) -> Any:
        """A console button: authenticated, same-origin, CSRF-checked; then the CLI's own command."""

        async def handler(request: web.Request) -> web.StreamResponse:
            user = who(request)
            if user is None:
                return web.Response(status=401, text="log in first", headers=_headers())
            origin = request.headers.get("Origin")
            if origin and origin != "null" and urlsplit(origin).netloc != request.host:
                return web.Response(status=403, text="cross-origin request refused", headers=_headers())
            form = await request.post()
            given = str(form.get("csrf", ""))
            if not given or not hmac.compare_digest(given, auth.csrf(user)):
                return web.Response(
                    status=403, text="missing or invalid CSRF token: reload the page", headers=_headers()
                )
            back = _local_next(str(form.get("next") or ""), "/console")
            resp = _redirect(back)
            try:  # the CLI's command reads and writes the store: on the STORE pool, never on the loop
                text = await controller.astore.call(fn, request, user, form)
            except (CommandError, ValueError) as exc:
                _flash(resp, "error", str(exc))
                return resp
            controller.kick()
            _flash(resp, "ok", text)
            return resp

        return handler

    def ctx(request: web.Request, user: str, **extra: Any) -> dict[str, Any]:
        return {"user": user, "csrf": auth.csrf(user), "here": request.path_qs, **extra}

    async def index(request: web.Request, user: str) -> web.Response:
        return _page("index.html", request, **ctx(request, user, o=await overview(controller)))

    async def incident(request: web.Request, user: str) -> web.Response:
        inc = await controller.astore.get_incident(request.match_info["id"])
        if inc is None:
            return _page("off.html", request, status=404, reason="No such incident.")
        now = controller.clock()
        iid = inc.id
        runs = await controller.astore.call(
            lambda: _run_views(store, [r for r in store.runs() if r.incident_id == iid])
        )
        entries = await timeline_entries(controller, inc.id)
        states = await controller.astore.failover_states()
        return _page(
            "incident.html",
            request,
            **ctx(
                request,
                user,
                inc=_incident_view(inc, now),
                runs=runs,
                entries=entries,
                failover=failover_state(inc.service, states, controller),
                refresh_ms=int(settings.refresh * 1000),
            ),
        )

    async def events(request: web.Request, user: str) -> web.StreamResponse:
        """Server-sent events: each new timeline entry as JSON (the page builds it with textContent)."""
        iid = request.match_info["id"]
        if await controller.astore.get_incident(iid) is None:
            raise web.HTTPNotFound()
        try:
            after = int(request.headers.get("Last-Event-ID") or request.query.get("after") or 0)
        except ValueError:
            after = 0
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        await resp.write(f"retry: {int(settings.refresh * 1000)}\n\n".encode())
        status = None
        quiet = 0.0
        deadline = time.monotonic() + 600  # the browser reconnects with Last-Event-ID
        while time.monotonic() < deadline:
            for entry in await timeline_entries(controller, iid, after):
                after = entry["n"]
                await resp.write(f"id: {after}\nevent: entry\ndata: {json.dumps(entry)}\n\n".encode())
                quiet = 0.0
            inc = await controller.astore.get_incident(iid)
            now_status = inc.status if inc else None
            if now_status != status:
                if status is not None:
                    await resp.write(
                        f"event: status\ndata: {json.dumps({'status': now_status})}\n\n".encode()
                    )
                status = now_status
            if quiet >= 15:
                await resp.write(b": keep-alive\n\n")
                quiet = 0.0
            try:  # wait for the next look, or for the server to shut down (then end the stream)
                await asyncio.wait_for(stopping.wait(), timeout=settings.refresh)
                break
            except TimeoutError:
                quiet += settings.refresh
        return resp

    async def playbooks_page(request: web.Request, user: str) -> web.Response:
        return _page("playbooks.html", request, **ctx(request, user, playbooks=playbook_views(controller)))

    async def login_form(request: web.Request) -> web.Response:
        if not auth.enabled:
            return login_redirect(request)
        return _page(
            "login.html",
            request,
            next=_local_next(request.query.get("next")),
            error=None,
            token_env=controller.config.controller.api_token_env,
        )

    async def login(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        name = str(form.get("name", "")).strip()[:100]
        given = str(form.get("token", ""))
        nxt = _local_next(str(form.get("next") or ""))
        ok = bool(auth.token) and hmac.compare_digest(given.encode(), auth.token.encode())
        if not ok or not name:
            await asyncio.sleep(0.3)  # a guesser gets no fast oracle
            return _page(
                "login.html",
                request,
                status=401,
                next=nxt,
                error="Your name and the API token are both required."
                if not name
                else "That token is not valid.",
                token_env=controller.config.controller.api_token_env,
            )
        resp = _redirect(nxt)
        resp.set_cookie(
            COOKIE,
            auth.cookie(name, time.time()),
            path="/console",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            max_age=int(settings.session_ttl),
        )
        return resp

    async def logout(request: web.Request) -> web.StreamResponse:
        resp = _redirect("/console/login")
        resp.del_cookie(COOKIE, path="/console")
        return resp

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        types = {"console.js": "application/javascript", "console.css": "text/css"}
        if name not in types:
            raise web.HTTPNotFound()
        return web.Response(
            body=(HERE / name).read_bytes(),
            content_type=types[name],
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    store = controller.store

    def service_of(request: web.Request) -> str:
        name = request.match_info["service"]
        if name not in controller.config.services:
            raise CommandError(f"no service named {name!r}")
        return name

    def silence(request: web.Request, user: str, form: Any) -> str:
        try:
            seconds = parse_duration(str(form.get("duration") or ""))
        except ValueError as exc:
            raise CommandError(f"duration: expected {exc}") from None
        return commands.silence(store, service_of(request), seconds, user, str(form.get("reason") or ""))

    def run_id(request: web.Request) -> str:
        return request.match_info["id"]

    app.add_routes(
        [
            web.get("/console", view(index)),
            web.get("/console/", view(index)),
            web.get("/console/incidents/{id}", view(incident)),
            web.get("/console/incidents/{id}/events", view(events)),
            web.get("/console/playbooks", view(playbooks_page)),
            web.get("/console/login", login_form),
            web.post("/console/login", login),
            web.post("/console/logout", logout),
            web.get("/console/static/{name}", static),
            web.post(
                "/console/runs/{id}/approve", action(lambda r, u, f: commands.approve(store, run_id(r), u))
            ),
            web.post(
                "/console/runs/{id}/reject",
                action(lambda r, u, f: commands.reject(store, run_id(r), u, str(f.get("reason") or ""))),
            ),
            web.post(
                "/console/incidents/{id}/ack", action(lambda r, u, f: comms_commands.ack(store, run_id(r), u))
            ),
            web.post(
                "/console/incidents/{id}/update",
                action(
                    lambda r, u, f: comms_commands.update(
                        store,
                        run_id(r),
                        u,
                        str(f.get("status") or "") or None,
                        str(f.get("message") or ""),
                        str(f.get("eta") or "").strip() or None,
                    )
                ),
            ),
            web.post(
                "/console/incidents/{id}/resolve",
                action(
                    lambda r, u, f: comms_commands.resolve(store, run_id(r), u, str(f.get("message") or ""))
                ),
            ),
            web.post(
                "/console/incidents/{id}/assign",
                action(lambda r, u, f: comms_commands.assign(store, run_id(r), u, str(f.get("ic") or ""))),
            ),
            web.post(
                "/console/pause", action(lambda r, u, f: commands.pause(store, u, str(f.get("reason") or "")))
            ),
            web.post("/console/resume", action(lambda r, u, f: commands.resume(store, u))),
            web.post("/console/services/{service}/silence", action(silence)),
            web.post(
                "/console/services/{service}/unsilence",
                action(lambda r, u, f: commands.unsilence(store, service_of(r), u)),
            ),
            web.post(
                "/console/services/{service}/ack",
                action(lambda r, u, f: commands.ack(store, service_of(r), u)),
            ),
        ]
    )
