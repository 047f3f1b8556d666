"""Notification fan-out: messages per second through the outbox Dispatcher to a local receiver.

M PagerDuty Events API v2 triggers (the shape `controller.notify.pagerduty.trigger` builds, routing
key added at send time, exactly as the Controller's channel does) are written to a SQLite outbox,
then drained by `Dispatcher.drain()` until every one is delivered. The receiver is the validating
PagerDuty receiver the tests use (aiohttp), in its own process so its CPU is not the dispatcher's;
it checks every event and answers 202. Nothing is paced (no rate_per_minute).

    PYTHONPATH=. python bench/fanout.py                  # 2,000 messages
    PYTHONPATH=. python bench/fanout.py --messages 500   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

from figures import record

KEY = "bench0routing0key000000000000000"  # 32 characters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receiver(port: int, ready: mp.Event, counts: mp.Value) -> None:  # type: ignore[valid-type]
    from aiohttp import web

    from controller.demo.pagerduty import PagerDutyReceiver

    async def main() -> None:
        rcv = PagerDutyReceiver(on_event=lambda e: None)
        runner = web.AppRunner(rcv.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        while True:
            await asyncio.sleep(0.2)
            counts[0] = len(rcv.events)
            counts[1] = len(rcv.rejected)

    asyncio.run(main())


async def measure(args: argparse.Namespace, port: int) -> tuple[float, float, int]:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    from controller.config import PagerDuty
    from controller.notify import pagerduty
    from controller.notify.outbox import Channel, Dispatcher
    from controller.stores import SQLiteStore

    pd = PagerDuty(routing_key_env="UNUSED", events_url=f"http://127.0.0.1:{port}/v2/enqueue", source="bench")
    channel = Channel(
        "pagerduty", lambda p: (pagerduty.url_for(pd, p["kind"]), {"routing_key": KEY, **p["body"]})
    )
    store = SQLiteStore(Path(tempfile.mkdtemp(prefix="continuity-bench-fanout-")))
    now = time.time()
    for i in range(args.messages):
        body = pagerduty.trigger(
            pd,
            dedup_key=f"continuity/INC-{i}",
            summary=f"[critical] checkout-{i % 50} down: checkout-journey: expected status 200, found 503",
            severity="critical",
            service=f"checkout-{i % 50}",
            tier="critical",
            ts=now,
            details={"incident_id": f"INC-{i}", "failing_probes": ["checkout-journey"], "rto": "5m"},
        )
        store.enqueue("pagerduty", f"INC-{i}/pagerduty/trigger", body, None, now)
    d = Dispatcher(store, {"pagerduty": channel}, time.time)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    sent = 0
    while sent < args.messages:
        n = await d.drain()
        if n == 0:
            raise RuntimeError(
                f"drain delivered nothing with {args.messages - sent} left: {store.outbox()[:1]}"
            )
        sent += n
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    store.close()
    return wall, cpu, sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    args = ap.parse_args()
    port = free_port()
    ctx = mp.get_context("spawn")
    ready, counts = ctx.Event(), ctx.Array("i", 2)
    proc = ctx.Process(target=receiver, args=(port, ready, counts), daemon=True)
    proc.start()
    try:
        if not ready.wait(20):
            print("the receiver did not start", file=sys.stderr)
            return 1
        wall, cpu, sent = asyncio.run(measure(args, port))
        time.sleep(0.5)
        received, rejected = counts[0], counts[1]
    finally:
        proc.terminate()
        proc.join(5)
    print("== Notification fan-out: outbox Dispatcher -> local PagerDuty-shaped receiver (aiohttp) ==")
    print(
        f"  {sent:,} triggers delivered in {wall:.2f} s: {sent / wall:,.0f} messages/s "
        f"({wall / sent * 1e3:.2f} ms each, one at a time); dispatcher CPU {cpu / sent * 1e3:.2f} ms/message"
    )
    print(f"  receiver accepted {received:,}, rejected {rejected} (each validated against the Events API v2)")
    print(
        "  (sequential by design: requests in a worker thread, a fresh connection each, a store write "
        "per delivery; PagerDuty's own limit is far lower, so pacing, not this, bounds real fan-out)"
    )
    record("fan-out: outbox -> receiver", sent / wall, "messages/s", better="higher",
           anchor="PagerDuty Events API accepts ~120 events/min per routing key")  # fmt: skip
    return 0 if received == sent and rejected == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
