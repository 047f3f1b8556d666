"""Name resolution for probes: bounded in time, never starving other probes, and honest about blame.

Why not let asyncio (or aiohttp's ThreadedResolver) call getaddrinfo: it runs in the event loop's
default executor, a handful of threads shared with every `asyncio.to_thread` in the process
(notification sends, playbook steps). A few names whose resolver never answers hold those threads
for the libc resolver's full timeout x attempts, and every other probe, page and step queues
behind them; the probes then time out and a healthy target is declared down.

Here:
- IP literals never touch a resolver.
- With `nameservers` configured (controller.resolver.nameservers), lookups are plain asyncio UDP
  queries (dnspython's async resolver): no thread at all, cancelled cleanly by the deadline.
- Otherwise getaddrinfo runs on a dedicated pool (RESOLVER_THREADS threads, not the default
  executor), single-flight per name: a stalled name holds at most one thread however many probes
  ask for it, and each caller waits only within its own budget.
- Blame: a name that does not exist (NXDOMAIN, no address of that family) is the TARGET's failure;
  a resolver that does not answer in time, answers SERVFAIL / "try again", or cannot even open a
  socket is OURS: `ResolverError(kind="resolver")`, which probes report as `prober_error`, so the
  result is UNKNOWN for detection. To watch a target's own DNS (its authoritative servers failing),
  use a `kind: dns` probe pointed at them: there a timeout or SERVFAIL is the target's failure.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from probes.models import parse_server

#: Threads for getaddrinfo when no nameservers are configured. Distinct stalled names each hold one
#: until libc gives up; more distinct stalled names than this make lookups wait, within their budget.
RESOLVER_THREADS = 16

#: Share of a probe's remaining budget name resolution may take: the rest is left for the exchange,
#: so a slow resolver shows up as our error, not as the target's timeout.
RESOLVE_SHARE = 0.8


class ResolverError(OSError):
    """Resolution failed on our side (timeout, SERVFAIL, no socket): not the target's fault."""

    def __init__(self, message: str, kind: str = "resolver") -> None:
        super().__init__(message)
        self.kind = kind


class NameNotFound(OSError):
    """The name does not exist (NXDOMAIN) or has no address: the target's failure."""


@dataclass
class _Settings:
    nameservers: list[tuple[str, int]]
    timeout: float


_settings = _Settings([], 2.0)
_pool: ThreadPoolExecutor | None = None
_inflight: dict[tuple[str, int, int], asyncio.Future[list[tuple[int, str]]]] = {}


def configure(nameservers: list[str] | None = None, timeout: float = 2.0) -> None:
    """Set where lookups go (`host` or `host:port` of DNS servers; empty: the system's getaddrinfo)."""
    _settings.nameservers = [parse_server(s) for s in nameservers or []]
    _settings.timeout = timeout
    _inflight.clear()


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=RESOLVER_THREADS, thread_name_prefix="continuity-resolve")
    return _pool


def literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _classify(exc: BaseException, host: str) -> OSError:
    if isinstance(exc, socket.gaierror):
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5), socket.EAI_ADDRFAMILY):
            return NameNotFound(f"cannot resolve host {host!r}: the name does not exist")
        if exc.errno == socket.EAI_SYSTEM and isinstance(exc.__context__, OSError):
            exc = exc.__context__
        return ResolverError(f"our resolver failed for {host!r}: {exc.strerror or exc}")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return ResolverError(f"our resolver cannot open a socket for {host!r}: {exc.strerror}", "emfile")
    return ResolverError(f"our resolver failed for {host!r}: {type(exc).__name__}: {exc}")


async def _system(host: str, port: int, family: int) -> list[tuple[int, str]]:
    loop = asyncio.get_running_loop()
    infos = await loop.run_in_executor(
        _executor(), lambda: socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    )
    return [(fam, str(addr[0])) for fam, _, _, _, addr in infos]


async def _dns(host: str, family: int, budget: float) -> list[tuple[int, str]]:
    import dns.asyncresolver  # here: importing this module (via the config models) must not load dnspython
    import dns.exception
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [ip for ip, _ in _settings.nameservers]
    resolver.port = _settings.nameservers[0][1]
    out: list[tuple[int, str]] = []
    wanted = [("A", socket.AF_INET), ("AAAA", socket.AF_INET6)]
    wanted = [(t, f) for t, f in wanted if family in (0, f)]
    missing = 0
    for rtype, fam in wanted:
        try:
            answer = await resolver.resolve(host, rtype, lifetime=budget, search=False)
        except dns.resolver.NXDOMAIN:
            raise NameNotFound(f"cannot resolve host {host!r}: the name does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            missing += 1
            continue
        except dns.exception.Timeout:
            raise ResolverError(f"our resolver did not answer for {host!r} within {budget:.1f}s") from None
        except dns.resolver.NoNameservers as exc:
            raise ResolverError(f"our resolver failed for {host!r}: {exc}") from None
        except OSError as exc:
            raise _classify(exc, host) from None
        out += [(fam, r.to_text()) for r in answer]
        if out:
            break  # IPv4 first, as getaddrinfo usually orders them; one family is enough to connect
    if not out:
        raise NameNotFound(f"cannot resolve host {host!r}: no address records")
    return out


async def resolve(host: str, port: int, budget: float, family: int = 0) -> list[tuple[int, str]]:
    """[(family, address), ...] for `host`, within `budget` seconds; raise NameNotFound (the target's
    failure) or ResolverError (ours). IP literals return at once."""
    bare = host.strip("[]")
    if literal(bare):
        fam = socket.AF_INET6 if ":" in bare else socket.AF_INET
        return [(fam, bare)]
    budget = max(budget, 0.01)
    if _settings.nameservers:
        try:
            async with asyncio.timeout(budget):
                return await _dns(host, family, budget)
        except TimeoutError:
            raise ResolverError(f"our resolver did not answer for {host!r} within {budget:.1f}s") from None
    key = (host, port, family)
    fut = _inflight.get(key)
    if fut is None or fut.done() or fut.get_loop() is not asyncio.get_running_loop():
        fut = asyncio.ensure_future(_system(host, port, family))
        _inflight[key] = fut

        def _forget(f: asyncio.Future[list[tuple[int, str]]], key: tuple[str, int, int] = key) -> None:
            if _inflight.get(key) is f:
                del _inflight[key]
            if not f.cancelled():
                f.exception()  # retrieved: a lookup nobody waits for any more must not warn

        fut.add_done_callback(_forget)
    try:
        async with asyncio.timeout(budget):
            return await asyncio.shield(fut)
    except TimeoutError:
        raise ResolverError(f"our resolver did not answer for {host!r} within {budget:.1f}s") from None
    except OSError as exc:
        if isinstance(exc, ResolverError | NameNotFound):
            raise
        raise _classify(exc, host) from None


async def first_address(host: str, port: int, budget: float) -> str:
    """The address a probe connects to: the first the resolver gives, as getaddrinfo orders them."""
    return (await resolve(host, port, budget))[0][1]


def budget_left(deadline: float, loop_time: float) -> float:
    """The share of what is left of a probe's deadline that resolution may use."""
    return max((deadline - loop_time) * RESOLVE_SHARE, 0.01)
