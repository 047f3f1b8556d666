"""A hang against a refusal: how long from the first failed run to the DOWN verdict, on the real
Controller (issue 10: a hanging region took 26 s where a refused one took 3.4 s).

For each timeout, each round runs PAIRS refused probes (a loopback port nothing listens on) and
PAIRS hanging probes (a local server that accepts and never answers) side by side, every probe at
`--interval`, threshold 3, the default burst (5 tries, 250 ms apart, span (3 - 1) x interval + 1 s).
Prints min/p50/max of each, the ratio of medians, and what `Config.detection_times` predicts (the
bound `continuity validate` warns on: hang <= 1.5 x refused while timeout <= span / 2).

    PYTHONPATH=. python bench/hang_vs_refused.py [--rounds 2] [--interval 1s] [--timeouts 400ms,1s,3s]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from controller.config import load_config
from controller.durations import parse_duration
from controller.loop import Controller
from controller.stores import SQLiteStore

PAIRS = 4


class _Region:
    """Answers 200 until told to hang (accept, never answer) or refuse (stop listening)."""

    def __init__(self) -> None:
        self.hang = False
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if self.hang:
                    await asyncio.sleep(3600)
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
            except (asyncio.CancelledError, OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.transport.abort()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


async def _round(interval: str, timeout: str) -> dict[str, list[float]]:
    regions = {f"{kind}-{i}": _Region() for i in range(PAIRS) for kind in ("refused", "hang")}
    probes = ""
    for name, region in regions.items():
        await region.start()
        probes += f'\n  {name}: {{kind: http, url: "http://127.0.0.1:{region.port}/", interval: {interval}, '
        probes += f"timeout: {timeout}}}"
    names = list(regions)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(
            f"""
services:
  shop: {{tier: supporting, rto: 5m, probes: [{", ".join(names)}]}}
probes:{probes}
detection: {{failure_threshold: 3}}
controller: {{data_dir: "{tmp}/state", tick: 100ms}}
leader: {{backend: none}}
"""
        )
        cfg = load_config(path)
        c = Controller(cfg, SQLiteStore(cfg.controller.data_dir))
        down: dict[str, float] = {}
        everything = asyncio.Event()

        def listen(kind: str, facts: dict[str, Any]) -> None:
            if kind == "probe_verdict" and facts["status"] == "down":
                down.setdefault(facts["probe"], time.time())
                if len(down) == len(names):
                    everything.set()

        c.listeners.append(listen)
        await c.start()
        try:
            # A history of passes first (10+ runs), as in production; then half refuse, half hang.
            await asyncio.sleep(11 * parse_duration(interval) + 0.5)
            for name, region in regions.items():
                if name.startswith("refused") and region.server is not None:
                    region.server.close()
                else:
                    region.hang = True
            await asyncio.wait_for(everything.wait(), timeout=120)
            out: dict[str, list[float]] = {"refused": [], "hang": []}
            for p, at in down.items():
                first = c.detection.states[p].first_failure_at
                if first is not None:
                    out[p.split("-")[0]].append(at - first)
            return out
        finally:
            await c.stop()
            c.store.close()
            for region in regions.values():
                if region.server is not None:
                    region.server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--interval", default="1s")
    ap.add_argument("--timeouts", default="400ms,1s,3s", help="comma-separated probe timeouts")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for timeout in args.timeouts.split(","):
        got: dict[str, list[float]] = {"refused": [], "hang": []}
        for _ in range(args.rounds):
            for k, v in asyncio.run(_round(args.interval, timeout)).items():
                got[k] += v
        rows.append((timeout, got, _predicted(args.interval, timeout)))
    print(
        f"interval {args.interval}, threshold 3, burst 5 x 250ms; {args.rounds} rounds x {PAIRS} probes "
        f"of each kind per timeout; {time.perf_counter() - t0:.0f}s wall"
    )
    print("first failed run -> DOWN (seconds):")
    for timeout, got, (pred_refused, pred_hang) in rows:
        med = {k: statistics.median(v) for k, v in got.items()}
        ratio = med["hang"] / med["refused"]
        print(
            f"  timeout {timeout}: hang / refused (medians) {ratio:.2f}  "
            f"({'<=' if ratio <= 1.5 else '>'} 1.5)"
        )
        for k, v in got.items():
            v.sort()
            print(f"    {k:8s} min {v[0]:.2f}  p50 {med[k]:.2f}  max {v[-1]:.2f}")
        print(
            f"    predicted (Config.detection_times): refused {pred_refused:.2f}, hang {pred_hang:.2f}, "
            f"ratio {pred_hang / pred_refused:.2f}"
        )


def _predicted(interval: str, timeout: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(
            f"""
services:
  shop: {{tier: supporting, rto: 5m, probes: [p]}}
probes:
  p: {{kind: http, url: "http://127.0.0.1:9/", interval: {interval}, timeout: {timeout}}}
detection: {{failure_threshold: 3}}
controller: {{data_dir: "{tmp}/state"}}
leader: {{backend: none}}
"""
        )
        return load_config(path).detection_times("p")


if __name__ == "__main__":
    main()
