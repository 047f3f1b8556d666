"""Figures for hostile input (issue 13), each measured on real processes on loopback:

1. `continuity validate` on the worst hostile files: wall time and peak RSS of the whole command,
   and the time `load_config` itself takes (without interpreter start-up and imports);
2. RSS of a running controller after 150,000 unique alerts pushed to /alertmanager, and after a
   restart (the chart's memory limit is 256Mi);
3. peak RSS of `continuity probe` against a redirect to a 1 GiB body (streamed, never stored);
4. probe runs and probe failures while 1,100 idle connections flood the API (RLIMIT_NOFILE 1,024).

    PYTHONPATH=. python bench/hostile.py
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-hostile-token"
GIB = 1024**3
RUN = [sys.executable, "-m", "controller.cli", "run"]
ENV = {
    **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
    "PYTHONPATH": str(ROOT),
    "CONTINUITY_API_TOKEN": TOKEN,
}


def bomb(width: int, depth: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


HOSTILE: dict[str, Callable[[], str]] = {
    "alias bomb 9x9 (the issue's 464 bytes)": lambda: bomb(9, 9),
    "alias bomb 40x40": lambda: bomb(40, 40),
    "nesting 1,000,000 deep": lambda: "a: " + "[" * 1_000_000 + "]" * 1_000_000 + "\n",
    "39,000 values (just under the bound)": lambda: "probes: [" + ",".join(["1"] * 39_000) + "]\n",
    "6,500 probes all of a wrong kind": lambda: (
        "probes:\n" + "".join(f"  p{i}: {{kind: bogus{i}, url: 1}}\n" for i in range(6_500))
    ),
    "4,400 probes, 4,400 names wrong": lambda: (
        "services:\n  shop: {tier: critical, rto: 5m, probes: ["
        + ",".join(f"missing{i}" for i in range(4_400))
        + "]}\nprobes:\n"
        + "".join(f"  p{i}: {{kind: http, url: 'http://x/{i}'}}\n" for i in range(4_400))
    ),
    "1,000,000 values (over the bound)": lambda: "probes: [" + ",".join(["1"] * 1_000_000) + "]\n",
    "4 MiB of one string": lambda: "services: " + "x" * (4 * 1024 * 1024 - 20) + "\n",
    "huge value in an error": lambda: (
        "services: {shop: {tier: critical, rto: 5m, owners: {x: [" + "A" * 3_000_000 + "]}}}\n"
    ),
}


def child_run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, float, float, float]:
    """(exit code, wall seconds, CPU seconds, peak RSS MB) of one child process. CPU time is the
    figure to compare: the machine is shared, so wall time moves with the load."""
    t = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env or ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    cpu = usage.ru_utime + usage.ru_stime
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t, cpu, usage.ru_maxrss / 1024


def validate_figures(tmp: Path) -> None:
    print("== 1. `continuity validate` on hostile files ==")
    # As installed: pip and the image compile the bytecode, so the figures do not include
    # compiling our own modules on every start (0.2 s here when PYTHONDONTWRITEBYTECODE is set).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            *(str(ROOT / d) for d in ("controller", "probes", "playbooks")),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"load average now: {Path('/proc/loadavg').read_text().split()[0]} on {os.cpu_count()} cores")
    print(f"{'file':<40} {'bytes':>10} {'exit':>4} {'wall':>7} {'CPU':>6} {'peak RSS':>9} ", end="")
    print(f"{'load_config CPU':>15}")
    _, base_wall, base_cpu, base_rss = child_run([sys.executable, "-c", "import controller.cli"])
    for name, make in HOSTILE.items():
        path = tmp / "hostile.yaml"
        path.write_text(make(), encoding="utf-8")
        code, wall, cpu, rss = child_run(
            [sys.executable, "-m", "controller.cli", "validate", "-c", str(path)]
        )
        probe = (
            "import time,sys; from controller.config import load_config, ConfigError\n"
            "t=time.process_time()\ntry: load_config(sys.argv[1])\nexcept ConfigError: pass\n"
            "print(time.process_time()-t)"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, env=ENV, check=True
        )
        load_s = float(out.stdout.strip())
        print(
            f"{name:<40} {path.stat().st_size:>10,} {code:>4} {wall:>6.2f}s {cpu:>5.2f}s {rss:>7.0f}MB "
            f"{load_s * 1000:>13.0f}ms"
        )
    print(
        f"(for scale: starting the CLI alone, imports included, takes {base_wall:.2f}s wall, "
        f"{base_cpu:.2f}s CPU and {base_rss:.0f} MB here)"
    )


# ---------------------------------------------------------------------- a controller process


@contextmanager
def controller(
    tmp: Path, config: str, nofile: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    path = tmp / "continuity.yaml"
    path.write_text(config, encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def limit() -> None:
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [*RUN, "-c", str(path), "--listen", f"127.0.0.1:{port}", "--log-format", "json"],
        stdout=(tmp / "controller.log").open("ab"),
        stderr=subprocess.STDOUT,
        env=ENV,
        preexec_fn=limit,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("controller did not start: " + (tmp / "controller.log").read_text()[-2000:])
        time.sleep(0.2)
    try:
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def alerts_figures(tmp: Path) -> None:
    print("\n== 2. RSS after 150,000 unique alerts pushed to /alertmanager (chart limit 256Mi) ==")
    config = f"""
services:
  checkout: {{tier: critical, rto: 5m, probes: [alerts]}}
probes:
  alerts: {{kind: alertmanager, matchers: {{alertname: CheckoutErrors}}}}
controller: {{data_dir: "{tmp / "state-alerts"}", push_rate: 1000, push_burst: 1000}}
"""
    with controller(tmp, config) as (base, proc):
        start = rss_mb(proc.pid)[0]
        sent = dropped = 0
        t = time.perf_counter()
        with requests.Session() as http:
            http.headers["Authorization"] = f"Bearer {TOKEN}"
            for batch in range(500):
                alerts = [
                    {
                        "status": "firing",
                        "labels": {"alertname": f"Flood{batch}", "instance": f"host-{i}", "pad": "p" * 200},
                        "annotations": {"summary": "s" * 500, "description": "d" * 1200},
                        "startsAt": "2026-01-01T00:00:00Z",
                        "fingerprint": f"{batch:04d}{i:012d}",
                    }
                    for i in range(300)
                ]
                resp = http.post(f"{base}/alertmanager", json={"version": "4", "alerts": alerts}, timeout=60)
                resp.raise_for_status()
                sent += len(alerts)
                dropped += resp.json().get("dropped", 0)
        took = time.perf_counter() - t
        now, peak = rss_mb(proc.pid)
        print(
            f"pushed {sent:,} alerts in {took:.1f}s; kept {sent - dropped:,}, dropped {dropped:,} (counted)"
        )
        print(f"controller RSS: {start:.0f} MB at start, {now:.0f} MB after, peak {peak:.0f} MB")
    with controller(tmp, config) as (base, proc):
        time.sleep(1.0)
        now, peak = rss_mb(proc.pid)
        print(f"after a restart (alerts restored from the store): RSS {now:.0f} MB, peak {peak:.0f} MB")


# ---------------------------------------------------------------------- a target that misbehaves


class Target(socketserver.ThreadingTCPServer):
    """/ok answers ok; /redirect -> /big, a 1 GiB body written 64 KiB at a time (never stored)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits = 0
        self.big_sent = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(socketserver.BaseRequestHandler):
    server: Target

    def handle(self) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                head += chunk
            path = head.split(b" ", 2)[1].split(b"?")[0]
            send = self.request.sendall
            if path == b"/redirect":
                send(
                    b"HTTP/1.1 302 Found\r\nLocation: /big\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            elif path == b"/big":
                send(f"HTTP/1.1 200 OK\r\nContent-Length: {GIB}\r\nConnection: close\r\n\r\n".encode())
                block = b"x" * 65536
                for _ in range(GIB // len(block)):
                    send(block)
                    self.server.big_sent += len(block)
            else:
                self.server.hits += 1
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except OSError:
            return


def probe_figures(tmp: Path, target: Target) -> None:
    print("\n== 3. `continuity probe` against a redirect to a 1 GiB body ==")
    path = tmp / "probe.yaml"
    path.write_text(
        f"""
services: {{}}
probes:
  big: {{kind: http, url: "{target.url}/redirect", timeout: 30s}}
  journey:
    kind: transaction
    timeout: 30s
    steps:
      - {{name: home, url: "{target.url}/ok"}}
      - {{name: download, url: "{target.url}/redirect"}}
""",
        encoding="utf-8",
    )
    for name in ("big", "journey"):
        before = target.big_sent
        code, wall, _, rss = child_run(
            [sys.executable, "-m", "controller.cli", "probe", name, "-c", str(path)]
        )
        time.sleep(0.3)
        sent = (target.big_sent - before) / 1024 / 1024
        print(
            f"{name:<8} exit {code}, {wall:.2f}s, peak RSS {rss:.0f} MB; "
            f"the server got to write {sent:.0f} MiB"
        )


def flood_figures(tmp: Path, target: Target) -> None:
    print("\n== 4. Probes during a flood of 1,100 idle API connections (RLIMIT_NOFILE 1,024) ==")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    config = f"""
services:
  shop: {{tier: critical, rto: 5m, probes: [web, journey]}}
probes:
  web: {{kind: http, url: "{target.url}/ok", interval: 100ms, timeout: 2s}}
  journey:
    {{kind: transaction, interval: 100ms, timeout: 2s, steps: [{{name: home, url: "{target.url}/ok?j"}}]}}
detection: {{failure_threshold: 1, success_threshold: 1, confirm: {{probes: 0}}}}
controller: {{data_dir: "{tmp / "state-flood"}", api_header_timeout: 60s}}
"""
    with controller(tmp, config, nofile=1024) as (base, _):
        time.sleep(1.0)
        port = int(base.rsplit(":", 1)[1])
        before = target.hits
        t = time.perf_counter()
        flood = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(1100)]
        time.sleep(5.0)
        busy = 0
        for s in flood:
            s.setblocking(False)
            try:
                busy += s.recv(64).startswith(b"HTTP/1.1 503")
            except BlockingIOError:
                pass
        api = requests.get(f"{base}/healthz", timeout=5).status_code
        runs = target.hits - before
        took = time.perf_counter() - t
        for s in flood:
            s.close()
        time.sleep(0.5)
        incidents = requests.get(f"{base}/incidents", timeout=5).json()
    log = (tmp / "controller.log").read_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    down = [e for e in events if e.get("event") == "probe verdict" and e.get("status") == "down"]
    print(
        f"1,100 connections: {busy} answered 503 at once, the rest held (cap 256); /healthz meanwhile: {api}"
    )
    print(
        f"probe runs during {took:.1f}s of flood: {runs}; probe failures: {len(down)}; "
        f"incidents: {len(incidents)}"
    )
    print(f"'Too many open files' in the log: {'Too many open files' in log}")


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["validate", "alerts", "probe", "flood"], help="one section")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="continuity-bench-hostile-"))
    target = Target()
    sections: dict[str, Callable[[], None]] = {
        "validate": lambda: validate_figures(tmp),
        "alerts": lambda: alerts_figures(tmp),
        "probe": lambda: probe_figures(tmp, target),
        "flood": lambda: flood_figures(tmp, target),
    }
    for name, run in sections.items():
        if args.only in (None, name):
            run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
