"""A prober's failure is not the target's (issue 10): at our file-descriptor limit, or with our
resolver stalled, healthy targets failed, a critical incident opened and a failover ran.

- EMFILE: a real controller process whose RLIMIT_NOFILE is exhausted (resource.setrlimit, then
  every free descriptor taken) probes a healthy local server: no incident, the errors are counted
  in continuity_prober_errors_total{kind="emfile"}, and once descriptors are free again the probe
  passes.
- A stalled resolver: a local UDP DNS server that never answers some names (and answers NXDOMAIN
  for one): the stalled probes are UNKNOWN (kind "resolver"), the probes of names that resolve keep
  passing, and the name that does not exist is the target's failure (its incident opens).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from controller.config import load_config
from controller.demo.marketplace import serve
from controller.demo.pagerduty import PagerDutyReceiver
from controller.loop import Controller
from controller.stores import SQLiteStore
from tests.test_detect_integration import Target, until

ROOT = Path(__file__).resolve().parent.parent


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def healthy_server() -> Iterator[int]:
    """A healthy HTTP target in another thread, so the controller's fd limit is not its limit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


CHILD = textwrap.dedent(
    """
    import asyncio, json, os, resource, sys, time
    from controller.config import load_config
    from controller.loop import Controller
    from controller.stores import SQLiteStore

    async def main():
        cfg = load_config(sys.argv[1])
        c = Controller(cfg, SQLiteStore(cfg.controller.data_dir), env=lambda name: "x" * 32)
        await c.start()
        deadline = time.monotonic() + 10
        while not all(c.detection.probe_healthy(p) for p in cfg.probes):
            assert time.monotonic() < deadline, "never healthy"
            await asyncio.sleep(0.05)
        # Reach the limit for real: a low soft limit, then every free descriptor taken.
        used = len(os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 16, hard))
        hog = []
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            emfile = exc.strerror
        await asyncio.sleep(3.0)
        during = {
            "limit_error": emfile,
            "incidents": len(c.store.list_incidents()),
            "runs": len(c.store.runs()),
            "errors": {
                kind: c.metrics.registry.get_sample_value("continuity_prober_errors_total", {"kind": kind})
                for kind in ("emfile", "resolver", "loop_stall")
            },
            "states": {p: s.status.value for p, s in c.detection.states.items()},
            "service": c.detection.health()["shop"].state.value,
        }
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        before = c.detection.states["web"].last.started_at
        deadline = time.monotonic() + 5
        states = c.detection.states
        while not (states["web"].last.started_at > before and states["journey"].successes >= 2):
            assert time.monotonic() < deadline, "never passed again"
            await asyncio.sleep(0.05)
        during["after"] = {p: s.status.value for p, s in c.detection.states.items()}
        during["after_service"] = c.detection.health()["shop"].state.value
        await c.stop()
        print("RESULT " + json.dumps(during))

    asyncio.run(main())
    """
)


def test_the_fd_limit_is_our_error_not_the_targets(tmp_path: Path, healthy_server: int) -> None:
    url = f"http://127.0.0.1:{healthy_server}"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"""
services:
  shop: {{tier: critical, rto: 5m, probes: [web, journey], playbook: move}}
probes:
  web: {{kind: http, url: "{url}/health", interval: 200ms, timeout: 1s}}
  journey:
    kind: transaction
    interval: 200ms
    timeout: 1s
    steps:
      - {{name: home, url: "{url}/"}}
      - {{name: cart, url: "{url}/cart"}}
detection: {{failure_threshold: 2, confirm: {{probes: 2, spacing: 50ms}}}}
playbooks:
  move: {{steps: [{{name: w, action: wait, with: {{duration: 10ms}}}}]}}
controller: {{data_dir: "{tmp_path / "state"}", tick: 100ms}}
leader: {{backend: none}}
"""
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(lines[0].removeprefix("RESULT "))
    assert got["limit_error"] == "Too many open files"
    assert got["incidents"] == 0 and got["runs"] == 0, got
    assert (got["errors"]["emfile"] or 0) >= 3, got
    assert got["states"]["web"] != "down" and got["states"]["journey"] != "down", got
    assert got["service"] in ("up", "unknown"), got  # unknown once its results are stale, never down
    assert got["after"] == {"web": "up", "journey": "up"} and got["after_service"] == "up", got
    assert "prober error" in proc.stdout + proc.stderr


# ------------------------------------------------------------------ a stalled resolver


class StallingDns(asyncio.DatagramProtocol):
    """A real DNS server on UDP: `good.test` answers 127.0.0.1, `missing.test` is NXDOMAIN, and
    every `stall-*` name gets no answer at all (a resolver that hangs)."""

    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".")
        self.asked[name] += 1
        if name.startswith("stall-"):
            return
        response = dns.message.make_response(query)
        if name == "good.test":
            if question.rdtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(question.name, 30, "IN", "A", "127.0.0.1"))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


def test_a_stalled_resolver_makes_its_probes_unknown_and_starves_no_other(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = StallingDns()
        transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
        dns_port = transport.get_extra_info("sockname")[1]
        target, pd = Target(), PagerDutyReceiver()
        t_runner, port = await serve(target.app(), "127.0.0.1", 0)
        p_runner, pd_port = await serve(pd.app(), "127.0.0.1", 0)
        stalled = [f"stall-{i}" for i in range(12)]
        probes = "".join(
            f'\n  {n}: {{kind: http, url: "http://{n}.test:{port}/x", interval: 300ms, timeout: 1s}}'
            for n in stalled
        )
        probes += f"""
  good-fast: {{kind: http, url: "http://good.test:{port}/a", interval: 300ms, timeout: 1s}}
  good-journey:
    kind: transaction
    interval: 300ms
    timeout: 1s
    steps: [{{name: one, url: "http://good.test:{port}/b"}}, {{name: two, url: "http://good.test:{port}/c"}}]
  good-tcp: {{kind: tcp, host: good.test, port: {port}, interval: 300ms, timeout: 1s}}
  gone: {{kind: http, url: "http://missing.test:{port}/", interval: 300ms, timeout: 1s}}"""
        config = tmp_path / "c.yaml"
        config.write_text(
            f"""
services:
  shop: {{tier: critical, rto: 5m, probes: [good-fast, good-journey, good-tcp]}}
  stalled: {{tier: critical, rto: 5m, probes: [{", ".join(stalled)}]}}
  gone: {{tier: important, rto: 5m, probes: [gone]}}
probes:{probes}
detection: {{failure_threshold: 2, confirm: {{probes: 2, spacing: 50ms}}}}
notifiers:
  pagerduty: {{routing_key_env: X, events_url: "http://127.0.0.1:{pd_port}/v2/enqueue"}}
controller:
  data_dir: "{tmp_path / "state"}"
  tick: 100ms
  resolver_nameservers: ["127.0.0.1:{dns_port}"]
"""
        )
        cfg = load_config(config)
        c = Controller(cfg, SQLiteStore(cfg.controller.data_dir), env=lambda name: "k" * 32)
        good = ("good-fast", "good-journey", "good-tcp")
        failed_good: list[str] = []
        c.listeners.append(
            lambda kind, facts: (
                failed_good.append(facts["probe"])
                if kind == "probe_failed" and facts["probe"] in good
                else None
            )
        )
        await c.start()
        try:
            await until(lambda: c.store.open_incident_for("gone"), what="NXDOMAIN: the target's incident")
            await until(
                lambda: (
                    (
                        c.metrics.registry.get_sample_value(
                            "continuity_prober_errors_total", {"kind": "resolver"}
                        )
                        or 0
                    )
                    >= 24
                ),
                what="resolver errors counted",
            )
            await asyncio.sleep(1.0)
            assert all(c.detection.probe_healthy(p) for p in good), {p: c.detection.states[p] for p in good}
            assert failed_good == [], "a stalled name must not fail probes of names that resolve"
            assert c.store.open_incident_for("stalled") is None
            assert c.store.open_incident_for("shop") is None
            assert all(c.detection.states[p].status.value == "unknown" for p in stalled)
            assert c.detection.health()["stalled"].state.value == "unknown"
            assert sum(server.asked[f"{n}.test"] for n in stalled) >= 24  # really asked, never answered
            inc = c.store.open_incident_for("gone")
            assert "does not exist" in inc.title
        finally:
            await c.stop()
            c.store.close()
            transport.close()
            await t_runner.cleanup()
            await p_runner.cleanup()

    asyncio.run(main())


def test_one_slow_name_holds_at_most_one_resolver_thread() -> None:
    """The system path (no nameservers): lookups of the same name share one getaddrinfo."""
    from probes import resolve

    async def main() -> tuple[int, float]:
        resolve.configure([])
        calls = 0
        real = resolve._system

        async def counted(host: str, port: int, family: int) -> list[tuple[int, str]]:
            nonlocal calls
            calls += 1
            return await real(host, port, family)

        resolve._system = counted  # type: ignore[assignment]
        try:
            t0 = time.perf_counter()
            found = await asyncio.gather(*(resolve.resolve("localhost", 80, 2.0) for _ in range(50)))
            assert all(f and f[0][1] in ("127.0.0.1", "::1") for f in found)
            return calls, time.perf_counter() - t0
        finally:
            resolve._system = real  # type: ignore[assignment]

    calls, _ = asyncio.run(main())
    assert calls == 1


# ------------------------------------------------------------------ a stalled event loop


def test_a_run_failing_while_the_loop_was_blocked_is_a_loop_stall_not_the_targets() -> None:
    """The scheduler's watchdog: a run that failed while our event loop was blocked (here the run
    itself blocks it for 0.7 s, as a synchronous call in the loop would) is `loop_stall`; a run that
    failed on an idle loop stays the target's failure."""
    from probes.base import failure
    from probes.scheduler import Scheduler

    results: list[Any] = []

    async def run(name: str, cfg: Any) -> Any:
        started = time.time()
        await asyncio.sleep(0.05)
        if name == "stalled":
            time.sleep(0.7)  # noqa: ASYNC251 - the point: the loop cannot run anything meanwhile
        return failure(name, started, 0.75, "timed out: the probe's 0.5s deadline passed")

    class Cfg:
        interval = 10.0

    async def once(name: str) -> Scheduler:
        stop = asyncio.Event()
        s = Scheduler({name: Cfg()}, run, lambda r: (results.append(r), stop.set()), quantum=0)
        await asyncio.wait_for(s.run(stop), timeout=5)
        return s

    async def main() -> Scheduler:
        await once("calm")  # an idle loop first, then one that is blocked during the run
        return await once("stalled")

    s = asyncio.run(main())
    by = {r.probe: r for r in results}
    assert by["stalled"].prober_error == "loop_stall", by["stalled"]
    assert "event loop was blocked" in by["stalled"].error
    assert by["calm"].prober_error is None  # a plain failure stays the target's
    assert s.stall == 0.5
