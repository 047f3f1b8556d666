"""Run every benchmark, one after the other, and print their figures.

    PYTHONPATH=. python bench/run_all.py            # the full set (about 10 minutes)
    PYTHONPATH=. python bench/run_all.py --quick    # shorter runs of the same (about 3 minutes)
    PYTHONPATH=. python bench/run_all.py --only detection_latency fanout

Each benchmark runs in its own process, so none sees another's memory or CPU. Exit status 1 if any
of them failed (a missed goal in probe_throughput counts as a failure there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (full arguments, quick arguments)
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "probe_throughput": ([], ["--probes", "2000", "--interval", "3", "--duration", "20"]),
    "detection_latency": (["--runs", "60"], ["--runs", "20"]),
    "failover_e2e": (["--runs", "20"], ["--runs", "5"]),
    "scale": (["--sizes", "1000", "5000", "20000"], ["--sizes", "1000", "5000"]),
    "fanout": (["--messages", "2000"], ["--messages", "500"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (fewer samples, smaller sizes)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these")
    args = ap.parse_args()
    env = {**os.environ}
    root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    failed: list[str] = []
    started = time.monotonic()
    mode = "quick" if args.quick else "full"
    print(f"Continuity benchmarks ({mode} mode), {time.strftime('%Y-%m-%d %H:%M:%S')}\n", flush=True)
    for name, (full, quick) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else full)]
        print(f"$ python bench/{name}.py {' '.join(cmd[2:])}", flush=True)
        t = time.monotonic()
        rc = subprocess.call(cmd, env=env, cwd=root)
        print(f"[{name}: exit {rc}, {time.monotonic() - t:.0f} s]\n", flush=True)
        if rc != 0:
            failed.append(name)
    print(
        f"all done in {time.monotonic() - started:.0f} s ({mode} mode); "
        + (f"FAILED: {', '.join(failed)}" if failed else "every benchmark ran")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
