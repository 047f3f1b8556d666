"""A simulated two-region marketplace: the thing `continuity demo` breaks and saves.

Each region is a real HTTP server (`/health`, `/products`, `/cart`, `/checkout`) on its own
loopback address (127.0.0.2 primary, 127.0.0.3 secondary) and the same port, as two regions sit
behind one DNS name. The edge plays the shopper's resolver: it reads the A record from Route 53
(honouring its TTL) and forwards each request to the address the record names, so moving the
record really moves the shoppers.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

PRODUCTS = [
    {"sku": "mug-001", "name": "Enamel mug", "price": 12.5},
    {"sku": "tee-042", "name": "Organic T-shirt", "price": 24.0},
    {"sku": "bag-007", "name": "Canvas tote", "price": 18.0},
]


@dataclass
class Region:
    """One region's shop. `broken` holds the features that currently fail (chaos injection)."""

    name: str
    host: str
    broken: set[str] = field(default_factory=set)
    carts: dict[str, list[str]] = field(default_factory=dict)
    orders: list[dict[str, Any]] = field(default_factory=list)
    delay: float = 0.0
    """Seconds added to every request (drills: slow degradation)."""
    confirmed_at: list[float] = field(default_factory=list)
    """Wall-clock time of each confirmed order (drills: the data-loss window)."""
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    @web.middleware
    async def _slow(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.delay > 0 and request.path != "/__chaos":
            await asyncio.sleep(self.delay)
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._slow])
        app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/products", self.products),
                web.post("/cart", self.new_cart),
                web.post("/checkout", self.checkout),
                web.post("/__chaos", self.chaos),
            ]
        )
        return app

    def _fail(self, feature: str) -> web.Response | None:
        if feature in self.broken:
            return web.json_response({"error": f"{feature} unavailable in {self.name}"}, status=503)
        return None

    async def health(self, request: web.Request) -> web.Response:
        return self._fail("health") or web.json_response({"status": "UP", "region": self.name})

    async def products(self, request: web.Request) -> web.Response:
        return self._fail("products") or web.json_response({"region": self.name, "items": PRODUCTS})

    async def new_cart(self, request: web.Request) -> web.Response:
        if (bad := self._fail("cart")) is not None:
            return bad
        body = await request.json()
        cart_id = f"{self.name}-c{next(self._ids)}"
        self.carts[cart_id] = [body.get("sku", "")]
        return web.json_response({"cart": {"id": cart_id, "items": self.carts[cart_id]}}, status=201)

    async def checkout(self, request: web.Request) -> web.Response:
        if (bad := self._fail("checkout")) is not None:
            return bad
        body = await request.json()
        cart_id = body.get("cart_id")
        if cart_id not in self.carts:
            return web.json_response({"error": f"no cart {cart_id}"}, status=404)
        order = {"order_id": f"{self.name}-o{next(self._ids)}", "status": "confirmed", "region": self.name}
        self.orders.append(order)
        self.confirmed_at.append(time.time())
        return web.json_response(order)

    async def chaos(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.broken = set(body.get("broken", []))
        return web.json_response({"broken": sorted(self.broken)})


class Edge:
    """Resolves the shop's name through Route 53 (cached for the record's TTL) and forwards requests."""

    def __init__(self, resolve: Callable[[], tuple[str, int]], port: int) -> None:
        self.resolve = resolve
        self.port = port
        self._cached: tuple[str, float] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def address(self) -> str:
        now = time.monotonic()
        if self._cached is None or now >= self._cached[1]:
            ip, ttl = await asyncio.to_thread(self.resolve)
            self._cached = (ip, now + ttl)
        return self._cached[0]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.Response:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        ip = await self.address()
        body = await request.read()
        try:
            async with self.session.request(
                request.method,
                f"http://{ip}:{self.port}{request.rel_url}",
                data=body or None,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                return web.Response(
                    status=resp.status,
                    body=await resp.read(),
                    content_type=resp.content_type,
                    headers={"X-Served-By": ip},
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.json_response({"error": f"edge cannot reach {ip}: {exc}"}, status=502)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def shared_port(hosts: list[str], attempts: int = 20) -> int:
    """A port free on every one of the given loopback addresses (regions share a port, not an address)."""
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise OSError(f"no port free on all of {hosts}")


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    actual = runner.addresses[0][1]
    return runner, actual
