#!/usr/bin/env python3
"""Probe throughput: can one controller run 20,000 HTTP probes at 30 s, and at what CPU cost?

Not a test: it prints figures. It starts its own nginx (Debian's package) on 127.0.0.1 as the
target, then measures, each in its own process so CPU is attributed exactly:

(a) Continuity: N probes through `probes.scheduler.Scheduler` and `probes.runner.run_probe` (the
    fast path) under uvloop: probes/s, CPU per 1,000 probes (getrusage of the prober process,
    user+sys, over the measured window), start-time jitter p50/p99, peak RSS, failures.
(b) Prometheus blackbox_exporter (Debian's package), driven as Prometheus drives it (GET
    /probe?target=...&module=http_2xx over keep-alive) by a separate load-generator process at a
    fixed concurrency; blackbox's CPU is read from /proc/PID/stat (utime+stime), so the driver's
    own CPU is never counted.
(c) The ratio of CPU per probe, and the same figures for the aiohttp path at a smaller N.

Everything is on loopback; every loop is bounded in time and count. See bench/README.md.

    PYTHONPATH=. python bench/probe_throughput.py --probes 20000 --interval 30 --duration 60
    PYTHONPATH=. python bench/probe_throughput.py --probes 2000 --interval 3 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from figures import record

ROOT = Path(__file__).resolve().parent.parent
BLACKBOX = "/usr/bin/prometheus-blackbox-exporter"
QUARTER = 0.25


# ---------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port} within {limit:g}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this script started, by its own handle (never by name)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def proc_cpu(pid: int) -> float:
    """utime+stime of a process (all its threads), in seconds, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def warn_if_packaged_daemons_run() -> None:
    """The packages may have auto-started their services; ours use their own ports, so they do
    not interfere, but their CPU competes. Report them; stopping them is left to the operator."""
    for name in ("nginx", "prometheus-blackbox-exporter"):
        found = subprocess.run(["pgrep", "-x", name[:15]], capture_output=True, text=True).stdout.split()
        if found:
            print(f"note: {name} already running (pids {' '.join(found)}), not started by this script")


def start_nginx(tmp: Path, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("nginx not found: apt-get update && apt-get install -y nginx")
    port = free_port()
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /health {{ return 200 "ok"; }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(tmp), "-e", f"{tmp}/error.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc, "nginx")
    return proc, port


def child(mode: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Run this script in a fresh process in `mode`; its last stdout line is a JSON report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    limit = args.duration + 120
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{mode} process failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# ---------------------------------------------------------------------- child: a prober


def prober(path: str, n: int, interval: float, duration: float, url: str) -> dict[str, Any]:
    """N probes through the Scheduler for `duration` seconds; CPU measured over that window only."""
    import uvloop

    from controller import heap
    from probes.base import ProbeResult
    from probes.http import HttpProbe, run_journey
    from probes.runner import prepare, run_probe
    from probes.scheduler import Scheduler

    probes = {
        f"bench-{i}": HttpProbe(
            kind="http",
            url=f"{url}?probe={i}",
            interval=f"{interval:g}s",
            timeout="3s",
            expect={"status": 200, "body_contains": "ok"},
        )
        for i in range(n)
    }
    counts = {"ok": 0, "failed": 0}
    errors: dict[str, int] = {}

    def on_result(r: ProbeResult) -> None:
        if r.ok:
            counts["ok"] += 1
        else:
            counts["failed"] += 1
            if len(errors) < 5 or r.reason in errors:
                errors[r.reason] = errors.get(r.reason, 0) + 1

    async def via_aiohttp(name: str, cfg: Any) -> ProbeResult:
        return await run_journey(name, cfg.journey(name), cfg.vars, cfg.timeout)

    run = run_probe if path == "fast" else via_aiohttp

    async def main() -> dict[str, Any]:
        sched = Scheduler(probes, run, on_result)
        stop = asyncio.Event()
        # As a started controller has done (Controller._warm_probes, controller/heap.py): every
        # http probe's plan is built, and the config and the scheduler, which live as long as the
        # process, are out of the collector's full passes. The window measures the steady state.
        await asyncio.to_thread(prepare, probes)
        heap.settle()
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        task = asyncio.create_task(sched.run(stop))
        await asyncio.sleep(duration)
        stop.set()
        await task
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        done = counts["ok"] + counts["failed"]
        jitter = list(sched.jitter_samples)
        return {
            "probes": n,
            "interval": interval,
            "wall_s": wall,
            "completed": done,
            "per_s": done / wall,
            "target_per_s": n / interval,
            "cpu_s": cpu,
            "cpu_user_s": after.ru_utime - before.ru_utime,
            "cpu_sys_s": after.ru_stime - before.ru_stime,
            "cpu_per_1000": cpu / done * 1000 if done else float("nan"),
            "jitter_p50": pct(jitter, 50),
            "jitter_p99": pct(jitter, 99),
            "jitter_max": max(jitter) if jitter else float("nan"),
            "maxrss_mb": after.ru_maxrss / 1024,
            "failed": counts["failed"],
            "skipped": sched.skipped,
            "errors": errors,
            "load": os.getloadavg()[0],
        }

    return uvloop.run(main())


# ---------------------------------------------------------------------- child: blackbox driver


def driver(bb_port: int, target: str, concurrency: int, duration: float, rate: float = 0.0) -> dict[str, Any]:
    """Scrape blackbox like Prometheus: keep-alive GETs of /probe, at most `concurrency` at a time.

    rate 0: flat out (each worker sends its next scrape as soon as the last one is answered).
    rate R: paced, R scrapes a second started on a 10 ms grid, as Prometheus spreads its targets'
    scrapes over the interval; at most `concurrency` in flight (the rest queue in the connector).
    """
    import aiohttp
    import uvloop

    url = f"http://127.0.0.1:{bb_port}/probe"
    params = {"target": target, "module": "http_2xx"}
    counts = {"ok": 0, "failed": 0}

    async def scrape(session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(url, params=params) as resp:
                body = await resp.text()
            counts["ok" if "probe_success 1" in body else "failed"] += 1
        except aiohttp.ClientError:
            counts["failed"] += 1

    async def worker(session: aiohttp.ClientSession, deadline: float) -> None:
        for _ in range(10_000_000):  # bounded; the deadline ends it long before
            if time.monotonic() >= deadline:
                return
            await scrape(session)

    async def paced(session: aiohttp.ClientSession, t0: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        sent = 0
        for _ in range(int(duration * 100) + 1):  # one tick per 10 ms, bounded by the duration
            elapsed = time.monotonic() - t0
            if elapsed >= duration:
                break
            for _ in range(int(elapsed * rate) - sent):
                task = asyncio.create_task(scrape(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.01)
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def main() -> dict[str, Any]:
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn) as session:
            t0 = time.monotonic()
            if rate > 0:
                await paced(session, t0)
            else:
                await asyncio.gather(*(worker(session, t0 + duration) for _ in range(concurrency)))
            return {**counts, "wall_s": time.monotonic() - t0}

    return uvloop.run(main())


def run_blackbox(tmp: Path, target: str, args: argparse.Namespace, rate: float) -> dict[str, Any]:
    """One blackbox_exporter process, scraped flat out (rate 0) or at `rate` a second; its CPU only."""
    if not Path(BLACKBOX).exists():
        raise SystemExit("blackbox_exporter not found: apt-get install -y prometheus-blackbox-exporter")
    cfg = tmp / "blackbox.yml"
    cfg.write_text(
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n"
        "    http:\n      preferred_ip_protocol: ip4\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [BLACKBOX, f"--config.file={cfg}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # paced: enough connections that a slow answer never holds the pace back (Prometheus scrapes
    # each target on its own connection); flat out: the fixed concurrency
    concurrency = 256 if rate > 0 else args.blackbox_concurrency
    try:
        wait_port(port, proc, "blackbox_exporter")
        # a few probes first, so Go's start-up is not charged to the measurement
        child(
            "driver",
            args,
            ["--bb-port", str(port), "--target", target, "--concurrency", "2", "--duration", "1"],
        )
        cpu0 = proc_cpu(proc.pid)
        got = child(
            "driver",
            args,
            [
                "--bb-port", str(port), "--target", target, "--concurrency", str(concurrency),
                "--duration", str(args.duration), "--rate", str(rate),
            ],
        )  # fmt: skip
        cpu = proc_cpu(proc.pid) - cpu0
    finally:
        stop(proc)
    done = got["ok"] + got["failed"]
    return {
        **got,
        "completed": done,
        "cpu_s": cpu,
        "per_s": done / got["wall_s"],
        "cpu_per_1000": cpu / done * 1000 if done else float("nan"),
        "rate": rate,
        "concurrency": concurrency,
    }


def loadavg() -> float:
    """The 1-minute load average: the bench shares the machine, and says how busy it was."""
    return os.getloadavg()[0]


# ---------------------------------------------------------------------- main


def show(title: str, r: dict[str, Any]) -> None:
    print(title)
    print(f"  probes/s achieved        {r['per_s']:9.1f}   (scheduled {r['target_per_s']:.1f}/s)")
    print(f"  completed / failed       {r['completed']:9d} / {r['failed']}   (slots skipped {r['skipped']})")
    print(
        f"  CPU per 1,000 probes     {r['cpu_per_1000']:9.3f} s  "
        f"({r['cpu_s']:.2f} s = user {r['cpu_user_s']:.2f} + sys {r['cpu_sys_s']:.2f}"
        f" over {r['wall_s']:.1f} s)"
    )
    print(f"  start jitter p50 / p99   {r['jitter_p50'] * 1000:9.2f} / {r['jitter_p99'] * 1000:.2f} ms"
          f"   (max {r['jitter_max'] * 1000:.1f} ms)")  # fmt: skip
    print(f"  peak RSS                 {r['maxrss_mb']:9.1f} MB")
    print(f"  load average (1 min)     {r['load']:9.2f}   at the end, {os.cpu_count()} CPUs")
    for reason, count in list(r["errors"].items())[:5]:
        print(f"  failure x{count}: {reason}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=20_000)
    ap.add_argument("--interval", type=float, default=30.0, help="seconds")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds each measurement runs")
    ap.add_argument("--aiohttp-probes", type=int, default=None, help="N for the aiohttp path (probes/10)")
    ap.add_argument("--blackbox-concurrency", type=int, default=8)
    ap.add_argument("--nginx-workers", type=int, default=2)
    ap.add_argument("--skip-aiohttp", action="store_true")
    ap.add_argument("--skip-blackbox", action="store_true")
    # internal: the child processes
    ap.add_argument("--mode", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--bb-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.mode in ("fast", "aiohttp"):
        print(json.dumps(prober(args.mode, args.probes, args.interval, args.duration, args.url)))
        return 0
    if args.mode == "driver":
        print(json.dumps(driver(args.bb_port, args.target, args.concurrency, args.duration, args.rate)))
        return 0

    warn_if_packaged_daemons_run()
    with tempfile.TemporaryDirectory(prefix="continuity-bench-") as tmpdir:
        tmp = Path(tmpdir)
        nginx, port = start_nginx(tmp, args.nginx_workers)
        url = f"http://127.0.0.1:{port}/health"
        common = ["--interval", str(args.interval), "--duration", str(args.duration), "--url", url]
        try:
            print(f"target: nginx ({args.nginx_workers} workers) at {url}; {os.cpu_count()} CPUs")
            fast = child("fast", args, ["--probes", str(args.probes), *common])
            show(f"(a) Continuity fast path: {args.probes} probes every {args.interval:g}s", fast)
            slow = None
            if not args.skip_aiohttp:
                n = args.aiohttp_probes or max(1, args.probes // 10)
                slow = child("aiohttp", args, ["--probes", str(n), *common])
                show(f"(a') Continuity aiohttp path (comparison): {n} probes every {args.interval:g}s", slow)
            target_rate = args.probes / args.interval
            bb: dict[str, dict[str, Any]] = {}
            if not args.skip_blackbox:
                # Flat out is blackbox's cheapest regime per probe (its per-scrape overheads are
                # shared by back-to-back work); paced at Continuity's own rate is the like-for-like one.
                for regime, rate in (("flat out", 0.0), ("paced", target_rate)):
                    r = bb[regime] = run_blackbox(tmp, url, args, rate)
                    cc = r["concurrency"]
                    how = (f"paced at {rate:.1f}/s as Prometheus spreads scrapes (<= {cc} in flight)"
                           if rate else f"flat out at concurrency {cc}")  # fmt: skip
                    print(f"(b) blackbox_exporter 0.23, {how}; load average {loadavg():.2f}")
                    print(f"  probes/s achieved        {r['per_s']:9.1f}")
                    print(f"  completed / failed       {r['completed']:9d} / {r['failed']}")
                    print(
                        f"  CPU per 1,000 probes     {r['cpu_per_1000']:9.3f} s"
                        f"  ({r['cpu_s']:.2f} s, blackbox only)"
                    )
                    if rate and r["per_s"] < 0.9 * rate:
                        print(
                            f"  NOTE: pace not kept ({r['per_s']:.0f}/s of {rate:.0f}/s): blackbox or "
                            "its driver was short of CPU, so this regime is not like-for-like on this run"
                        )
        finally:
            stop(nginx)

    print("(c) verdict")
    checks = [
        ("rate", fast["per_s"] >= 0.97 * target_rate, f"{fast['per_s']:.1f}/s of {target_rate:.1f}/s"),
        ("p99 jitter < 1 s", fast["jitter_p99"] < 1.0, f"{fast['jitter_p99'] * 1000:.1f} ms"),
        ("peak RSS < 300 MB", fast["maxrss_mb"] < 300, f"{fast['maxrss_mb']:.1f} MB"),
        ("no failures", fast["failed"] == 0, str(fast["failed"])),
    ]
    ratios = {regime: fast["cpu_per_1000"] / r["cpu_per_1000"] for regime, r in bb.items()}
    for regime, ratio in ratios.items():
        checks.append((f"CPU/probe <= 1/4 of blackbox {regime}", ratio <= QUARTER, f"ratio {ratio:.3f}"))
        print(f"  Continuity CPU per probe / blackbox's ({regime}) = {ratio:.3f} (goal <= {QUARTER})")
        if slow is not None:
            print(f"  aiohttp path CPU per probe / blackbox's ({regime}) = "
                  f"{slow['cpu_per_1000'] / bb[regime]['cpu_per_1000']:.3f}")  # fmt: skip
    for name, ok, value in checks:
        print(f"  {'MET ' if ok else 'MISS'} {name}: {value}")
    print(f"  load average (1 min) at the end: {loadavg():.2f} on {os.cpu_count()} CPUs")
    n = f"{args.probes:,} probes at {args.interval:g} s"
    record(f"probes: rate, {n}", fast["per_s"], "probes/s", better="higher",
           goal=f">= {0.97 * target_rate:.1f}", met=checks[0][1])  # fmt: skip
    record(f"probes: start jitter p99, {n}", fast["jitter_p99"] * 1000, "ms", goal="< 1000", met=checks[1][1])
    record(f"probes: peak RSS, {n}", fast["maxrss_mb"], "MB", goal="< 300", met=checks[2][1])
    record(f"probes: CPU per probe, {n}", fast["cpu_per_1000"], "ms")
    for regime, ratio in ratios.items():
        r = bb[regime]
        record(
            f"probes: CPU per probe / blackbox_exporter's ({regime})",
            ratio,
            "ratio",
            goal=f"<= {QUARTER}",
            met=ratio <= QUARTER,
            anchor=f"blackbox_exporter 0.23 {regime} = 1.0 (its CPU per probe: next row)",
        )
        record(f"probes: blackbox_exporter CPU per probe ({regime})", r["cpu_per_1000"], "ms")
        paced = bool(r["rate"])  # the paced regime is like-for-like only if it kept its pace
        record(f"probes: blackbox_exporter probes/s achieved ({regime})", r["per_s"], "probes/s",
               better="higher", goal=f">= {0.9 * target_rate:.1f}" if paced else None,
               met=r["per_s"] >= 0.9 * target_rate if paced else None)  # fmt: skip
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
