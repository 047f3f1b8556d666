"""Memory and decision-loop time with 1,000 / 5,000 / 20,000 probes: how the cost grows.

For each N, in a fresh process (so RSS belongs to that N only): write a config with N `kind: http`
probes (against 127.0.0.1, never sent: this measures the controller, not the network) grouped ten
to a service (N/10 services, every one critical with an RTO), load and validate it, build the
Controller on a SQLite store, feed every probe 20 passing results through `ingest` (the way the
scheduler does: a running controller's history, 30 s apart), then time `decide()` alone (pure)
and a whole `Controller.reconcile()` (observe: health of every service, open incidents from the
store, flags; decide; record; metrics), and a full garbage collection before the long-lived
objects are frozen (controller/heap.py), and after it, once every probe has reported twice more.

    PYTHONPATH=. python bench/scale.py                      # 1,000 5,000 20,000
    PYTHONPATH=. python bench/scale.py --sizes 1000 5000    # quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from figures import record


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


#: Results a probe has reported before anything is measured: the intermittent window (10 min)
#: at the 30 s interval, after which a probe's state stops growing.
HISTORY = 20


def full_collections(times: int = 5) -> list[float]:
    """How long a full garbage collection holds the thread (the event loop's, in the controller)."""
    out = []
    for _ in range(times):
        t = time.perf_counter()
        gc.collect()
        out.append(time.perf_counter() - t)
    return out


def child(n: int, repeats: int) -> dict[str, Any]:
    os.environ.setdefault("CONTINUITY_CONFIG_MAX_NODES", "1000000")  # 20,000 probes: over the default bound
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    from controller import decide as d
    from controller import heap
    from controller.config import load_config
    from controller.loop import Controller
    from controller.stores import SQLiteStore
    from probes.base import ProbeResult

    base = rss_mb()
    tmp = Path(tempfile.mkdtemp(prefix="continuity-bench-scale-"))
    per = 10
    lines = ["services:"]
    for s in range(n // per):
        names = ", ".join(f"p{s * per + k}" for k in range(per))
        lines.append(f"  svc-{s}: {{tier: critical, rto: 5m, probes: [{names}]}}")
    lines.append("probes:")
    for i in range(n):
        lines.append(
            f'  p{i}: {{kind: http, url: "http://127.0.0.1:9/health?p={i}", interval: 30s, timeout: 3s, '
            "expect: {status: 200}}"
        )
    lines.append(f'controller: {{data_dir: "{tmp / "state"}"}}')
    path = tmp / "continuity.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    t = time.perf_counter()
    cfg = load_config(path)
    load_s = time.perf_counter() - t
    after_config = rss_mb()

    async def main() -> dict[str, Any]:
        store = SQLiteStore(cfg.controller.data_dir)
        c = Controller(cfg, store)
        now = time.time()
        # A running controller's history: HISTORY results a probe, one interval (30 s) apart and
        # ending a minute ago (two more come after the freeze below). Memory is measured with it:
        # a probe's state holds its runs of the last intermittent window, so two results would
        # understate it (291.7 MB at 20,000 probes with two; the same code held 321 MB with 20).
        t = time.perf_counter()
        for k in range(HISTORY):
            for name in cfg.probes:
                c.detection.ingest(ProbeResult(name, True, now - (HISTORY + 1 - k) * 30, 0.002))
        ingest_us = (time.perf_counter() - t) / (HISTORY * n) * 1e6
        assert all(c.detection.probe_healthy(p) for p in cfg.probes)
        obs = c.observer.observation()
        decide_s, observe_s, reconcile_s = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            c.observer.observation()
            observe_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            d.decide(obs, cfg)
            decide_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            await c.reconcile()
            reconcile_s.append(time.perf_counter() - t)
        gc_s = full_collections()
        frozen = heap.settle()  # what `continuity run` does after start-up (controller/heap.py)
        # Then a while of running: every probe reports twice more (its state objects are new, not
        # frozen) and the loop decides, so the pause counts what a running controller allocates.
        for k in (1, 0):
            for name in cfg.probes:
                c.detection.ingest(ProbeResult(name, True, now - k * 30, 0.002))
            await c.reconcile()
        frozen_gc_s = full_collections()
        store.close()
        return {
            "gc_ms": statistics.median(gc_s) * 1e3,
            "frozen_gc_ms": statistics.median(frozen_gc_s) * 1e3,
            "frozen": frozen,
            "ingest_us": ingest_us,
            "observe_ms": statistics.median(observe_s) * 1e3,
            "decide_ms": statistics.median(decide_s) * 1e3,
            "reconcile_ms": statistics.median(reconcile_s) * 1e3,
            "reconcile_max_ms": max(reconcile_s) * 1e3,
        }

    out = asyncio.run(main())
    out.update(
        n=n,
        services=n // per,
        load_s=load_s,
        base_mb=base,
        config_mb=after_config - base,
        rss_mb=rss_mb(),
        peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--repeats", type=int, default=15, help="timed reconcile/decide calls per size")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats)))
        return 0
    print("== Scale: memory and decision-loop time vs number of probes (10 probes per service) ==")
    print(
        f"{'probes':>7} {'services':>8} {'load cfg':>9} {'RSS':>8} {'peak RSS':>9} {'cfg+ctl':>8} "
        f"{'ingest':>8} {'observe':>9} {'decide':>9} {'reconcile':>10} {'max':>9}"
    )
    rows = []
    for n in args.sizes:
        env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--repeats", str(args.repeats)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        record(f"scale: reconcile at {n:,} probes (median)", r["reconcile_ms"], "ms")
        record(f"scale: full GC pause at {n:,} probes, nothing frozen", r["gc_ms"], "ms")
        record(f"scale: full GC pause at {n:,} probes, frozen after start-up", r["frozen_gc_ms"], "ms")
        record(f"scale: RSS at {n:,} probes", r["rss_mb"], "MB", goal="< 300" if n >= 20000 else None,
               met=r["rss_mb"] < 300 if n >= 20000 else None)  # fmt: skip
        print(
            f"{r['n']:>7,} {r['services']:>8,} {r['load_s']:>8.2f}s {r['rss_mb']:>6.0f}MB "
            f"{r['peak_mb']:>7.0f}MB "
            f"{r['rss_mb'] - r['base_mb']:>6.0f}MB {r['ingest_us']:>6.1f}us {r['observe_ms']:>7.1f}ms "
            f"{r['decide_ms']:>7.1f}ms {r['reconcile_ms']:>8.1f}ms {r['reconcile_max_ms']:>7.1f}ms",
            flush=True,
        )
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        k = b["n"] / a["n"]
        print(
            f"  growth {a['n']:,} -> {b['n']:,} probes (x{k:g}): memory above the interpreter "
            f"x{(b['rss_mb'] - b['base_mb']) / (a['rss_mb'] - a['base_mb']):.1f}, reconcile "
            f"x{b['reconcile_ms'] / a['reconcile_ms']:.1f}, decide x{b['decide_ms'] / a['decide_ms']:.1f}"
        )
    for r in rows:
        print(
            f"  full garbage collection at {r['n']:,} probes: {r['gc_ms']:.1f} ms, "
            f"{r['frozen_gc_ms']:.1f} ms once {r['frozen']:,} long-lived objects are frozen "
            "(controller/heap.py)"
        )
    print(
        "  RSS: the process after the run; cfg+ctl: RSS above the bare interpreter with imports; "
        "ingest: per result; times: median of the timed calls"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
