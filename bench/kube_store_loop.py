"""The event loop with the Kubernetes store on a slow or sick API server: does anything wait on it?

The real `Controller` runs 2,000 cheap HTTP probes (interval 10 s, against a local nginx) and two
fast "pager" probes (interval 1 s) with the Kubernetes store (`KubernetesStore`, the real kubernetes
client) against the fake API server of tests/fakes/kubeapi.py, whose latency and faults are injected:

1. **Slow API**: every API call held 20 ms (``delay(0.02)``) for ``--seconds``. Figures: reconcile
   duration p99 (the whole `Controller.reconcile`, observe + decide + act + record) and probe start
   jitter p99 (the scheduler's own measure: actual start minus scheduled slot).
2. **Brownout**: for 5 s every API call fails (503), then, in a second brownout, every call hangs
   (held 5 s). A pager probe's target starts failing when each brownout starts, so a page is
   queued during it. Figures: probe results that failed among the 2,000 cheap probes (their target
   never failed: every failure is ours) from the brownout's start to a probe timeout after its end,
   and how long after the brownout's end the PagerDuty receiver got the page.

Goals (issue 11): reconcile p99 < 50 ms at 20 ms per call; a brownout fails no probe and delays
no page by more than the brownout (the page arrives within a tick and an outbox poll, 2 s, of the
brownout's end: it was due inside the brownout).

    PYTHONPATH=. python bench/kube_store_loop.py              # 30 s of slow API, both brownouts
    PYTHONPATH=. python bench/kube_store_loop.py --seconds 12 # quick
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import record
from probe_throughput import start_nginx, stop

PD_KEY = "bench-routing-key"
NS = "continuity"


class _Target(BaseHTTPRequestHandler):
    """The pager probes' target: 200 until the bench flips it to 500."""

    failing: set[str] = set()

    def do_GET(self) -> None:
        code = 500 if any(p in self.path for p in self.failing) else 200
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _PagerDuty(BaseHTTPRequestHandler):
    """A PagerDuty Events API v2 receiver: records (monotonic time, body) of every event."""

    events: list[tuple[float, dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        self.events.append((time.monotonic(), body))
        data = b'{"status":"success","message":"Event processed","dedup_key":"x"}'
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def write_config(tmp: Path, n: int, nginx: int, target: int, pd: int) -> Path:
    per = 10
    lines = ["services:"]
    for s in range(n // per):
        names = ", ".join(f"p{s * per + k}" for k in range(per))
        lines.append(f"  svc-{s}: {{tier: critical, rto: 5m, probes: [{names}]}}")
    for pager in ("pager-fail", "pager-hang"):
        lines.append(f"  {pager}: {{tier: critical, rto: 5m, probes: [{pager}]}}")
    lines.append("probes:")
    for i in range(n):
        lines.append(
            f'  p{i}: {{kind: http, url: "http://127.0.0.1:{nginx}/health?p={i}", interval: 10s, '
            "timeout: 2s, expect: {status: 200}}"
        )
    for pager in ("pager-fail", "pager-hang"):
        lines.append(
            f'  {pager}: {{kind: http, url: "http://127.0.0.1:{target}/{pager}", interval: 1s, '
            "timeout: 1s, expect: {status: 200}}"
        )
    lines += [
        "notifiers:",
        f'  pagerduty: {{routing_key_env: PD_KEY, events_url: "http://127.0.0.1:{pd}/v2/enqueue"}}',
        "store: {backend: kubernetes, namespace: continuity}",
        f'controller: {{data_dir: "{tmp / "state"}"}}',
    ]
    path = tmp / "continuity.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def measure(
    args: argparse.Namespace, cfg_path: Path, kube: Any, target: ThreadingHTTPServer
) -> dict[str, Any]:
    from controller.config import load_config
    from controller.loop import Controller
    from controller.stores.kube import KubernetesStore

    cfg = load_config(cfg_path)
    # As `continuity run` opens it (open_store(..., cache=True)), where the store has a read cache.
    cache = {"cache": True} if "cache" in inspect.signature(KubernetesStore).parameters else {}
    store = KubernetesStore(kube.api_client(), NS, **cache)
    ctrl = Controller(cfg, store, env=lambda name: PD_KEY)

    reconciles: list[tuple[float, float]] = []  # (monotonic start, seconds)
    results: list[tuple[float, str, bool, str | None]] = []  # (monotonic, probe, ok, prober_error)
    lags: list[tuple[float, float]] = []  # (monotonic, how late a 10 ms ticker woke)
    inner_reconcile = ctrl.reconcile
    inner_ingest = ctrl.ingest

    async def timed_reconcile() -> Any:
        t = time.monotonic()
        try:
            return await inner_reconcile()
        finally:
            reconciles.append((t, time.monotonic() - t))

    def counted_ingest(result: Any) -> None:
        results.append((time.monotonic(), result.probe, result.ok, result.prober_error))
        inner_ingest(result)

    ctrl.reconcile = timed_reconcile  # type: ignore[method-assign]
    ctrl.ingest = counted_ingest  # type: ignore[method-assign]
    stop_ticker = asyncio.Event()

    async def ticker() -> None:
        while not stop_ticker.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append((t, time.monotonic() - t - 0.01))

    ticking = asyncio.create_task(ticker())
    await ctrl.start()
    await asyncio.sleep(3.0)  # the first reconciles create the state objects

    # 1. Slow API: 20 ms per call.
    kube.delay(args.latency)
    began = time.monotonic()
    jitter_from = len(ctrl.scheduler.jitter_samples)
    await asyncio.sleep(args.seconds)
    ended = time.monotonic()
    jitter = list(ctrl.scheduler.jitter_samples)[jitter_from:]
    kube.delay(0)
    slow = [s for t, s in reconciles if began <= t < ended]
    slow_lag = [lag for t, lag in lags if t < ended and t + 0.01 + lag >= began]
    out: dict[str, Any] = {
        "reconciles": len(slow),
        "reconcile_p50_ms": statistics.median(slow) * 1e3 if slow else float("nan"),
        "reconcile_p99_ms": p99(slow) * 1e3,
        "reconcile_max_ms": max(slow, default=float("nan")) * 1e3,
        "jitter_samples": len(jitter),
        "jitter_p99_ms": p99(jitter) * 1e3,
        "loop_lag_max_ms": max(slow_lag, default=float("nan")) * 1e3,
        "api_requests": len(kube.requests),
    }
    await asyncio.sleep(3.0)

    # 2. Brownouts: all calls fail, then all calls hang.
    for kind in ("fail", "hang"):
        pager = f"pager-{kind}"
        pages_before = len(_PagerDuty.events)
        start = time.monotonic()
        end = start + args.brownout
        if kind == "fail":
            kube.fail(503, seconds=args.brownout)
        else:
            kube.delay(args.brownout, match=lambda method, path, end=end: time.monotonic() < end)
        _Target.failing.add(pager)
        await asyncio.sleep(args.brownout)
        if kind == "hang":
            kube.delay(0)
        deadline = end + args.page_wait
        page_at = None
        while time.monotonic() < deadline and page_at is None:
            await asyncio.sleep(0.05)
            for at, body in _PagerDuty.events[pages_before:]:
                if body.get("event_action") == "trigger" and pager in json.dumps(body):
                    page_at = at
                    break
        await asyncio.sleep(2.5)  # a probe timeout after the end: runs in flight at the end land
        window = [r for r in results if start <= r[0] <= end + 2.5 and not r[1].startswith("pager")]
        out[f"{kind}_probe_results"] = len(window)
        out[f"{kind}_failed"] = sum(1 for r in window if not r[2])
        out[f"{kind}_prober_errors"] = sum(1 for r in window if r[3])
        out[f"{kind}_page_after_end_s"] = None if page_at is None else page_at - end
        # A tick that began before the brownout and woke during or after it counts too.
        during = [lag for t, lag in lags if t <= end and t + 0.01 + lag >= start]
        out[f"{kind}_loop_lag_max_ms"] = max(during, default=0.0) * 1e3
        _Target.failing.discard(pager)
        await asyncio.sleep(2.0)

    stop_ticker.set()
    await ctrl.stop()
    await asyncio.gather(ticking, return_exceptions=True)
    store.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the API stays slow")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to every API call")
    ap.add_argument("--brownout", type=float, default=5.0, help="seconds each brownout lasts")
    ap.add_argument("--page-wait", type=float, default=30.0, help="how long to wait for a page after one")
    args = ap.parse_args()

    import os

    import structlog

    os.environ["PD_KEY"] = PD_KEY
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    from tests.fakes.kubeapi import FakeKubeAPI

    tmp = Path(tempfile.mkdtemp(prefix="continuity-bench-kube-"))
    nginx, nginx_port = start_nginx(tmp, 1)
    target = _serve(_Target)
    pd = _serve(_PagerDuty)
    try:
        with FakeKubeAPI() as kube:
            cfg = write_config(tmp, args.probes, nginx_port, target.server_address[1], pd.server_address[1])
            out = asyncio.run(measure(args, cfg, kube, target))
    finally:
        stop(nginx)
        target.shutdown()
        pd.shutdown()

    lat_ms = args.latency * 1e3
    print(f"Kubernetes store on the fake API server, {args.probes} probes (interval 10 s) + 2 pager probes")
    print(f"\n{lat_ms:.0f} ms per API call, {args.seconds:.0f} s:")
    print(
        f"  reconcile: {out['reconciles']} runs, p50 {out['reconcile_p50_ms']:.1f} ms, "
        f"p99 {out['reconcile_p99_ms']:.1f} ms, max {out['reconcile_max_ms']:.1f} ms  (goal: p99 < 50 ms)"
    )
    print(f"  probe start jitter: p99 {out['jitter_p99_ms']:.1f} ms over {out['jitter_samples']} starts")
    print(f"  event loop lag (10 ms ticker): max {out['loop_lag_max_ms']:.1f} ms")
    for kind, what in (("fail", "every call 503"), ("hang", "every call held")):
        page = out[f"{kind}_page_after_end_s"]
        page_text = "never (within --page-wait)" if page is None else f"{page:+.2f} s"
        print(f"\n{args.brownout:.0f} s brownout, {what}:")
        print(
            f"  probe results failed: {out[f'{kind}_failed']} of {out[f'{kind}_probe_results']} "
            f"({out[f'{kind}_prober_errors']} blamed on the prober)  (goal: 0)"
        )
        print(f"  page queued during it, received after the brownout's end: {page_text}  (goal: <= 2 s)")
        print(f"  event loop lag during it: max {out[f'{kind}_loop_lag_max_ms']:.0f} ms")

    record(
        "kube store: reconcile p99 at 20 ms/API call",
        out["reconcile_p99_ms"],
        "ms",
        goal="< 50",
    )
    record("kube store: probe start jitter p99 at 20 ms/API call", out["jitter_p99_ms"], "ms")
    for kind in ("fail", "hang"):
        record(f"kube store: probe results failed in a 5 s API brownout ({kind})", out[f"{kind}_failed"],
               "results", goal="<= 0")  # fmt: skip
        page = out[f"{kind}_page_after_end_s"]
        record(
            f"kube store: page after a 5 s API brownout ({kind}) ends",
            args.page_wait if page is None else page,
            "s",
            goal="<= 2",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
