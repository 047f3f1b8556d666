"""Run a drill: the real controller, a real fault, and a score against the objectives.

Demo mode: a fresh DemoEnvironment (moto, two regions, the edge, a PagerDuty receiver), the
scenario's tweak of the demo config, the controller in-process (or as `continuity run` processes
for the kill -9 scenario), the fault injected, and everything measured from the outside: PagerDuty
as received, Route 53 and the Aurora writer read back from moto every 250 ms, the store's incidents,
runs and timelines.

Target mode (`--target CONFIG`): the user's staging config with `controller.dry_run` forced on and
a throw-away data directory. Nothing in the environment can be broken from here, so the fault is
injected where the controller sees it, at its probes; pages go to a local receiver (no human is
paged by a drill), the other notifiers are switched off, and playbooks only say what they would do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from controller.config import PagerDuty, load_config
from controller.drills.drill import Drill, DrillError, DrillResult, Objective, Scenario
from controller.drills.scenarios import BUILTIN
from controller.durations import format_duration
from controller.stores import SQLiteStore

ROOT = str(Path(__file__).resolve().parents[2])
"""Where the `controller` package lives: the child processes import it from here."""
DRILL_PD_KEY = "drill0routing0key000000000000000"  # 32 characters, like a real integration key


# ------------------------------------------------------------------ demo mode


async def run_demo_drill(
    scenario: Scenario | str, tweak: Callable[[dict[str, Any]], None] | None = None
) -> DrillResult:
    """Run one scenario against a fresh demo environment; `tweak` edits the config further (tests)."""
    from controller.demo.environment import DemoEnvironment

    sc = BUILTIN[scenario] if isinstance(scenario, str) else scenario
    started = time.monotonic()
    async with DemoEnvironment() as env:
        drill = Drill(sc, env)
        try:
            await sc.prepare(drill)
            raw = yaml.safe_load(env.config_path.read_text(encoding="utf-8"))
            sc.tweak(raw, drill)
            if tweak is not None:
                tweak(raw)
            path = env.workdir / f"drill-{sc.name}.yaml"
            path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
            drill.config = load_config(path)
            drill.focus = next((n for n, s in drill.config.services.items() if s.playbook), None)
            env.pagerduty.on_event = drill.on_page
            if sc.subprocess:
                await _run_processes(drill, path)
            else:
                await _run_in_process(drill)
            return score(drill, "demo", time.monotonic() - started)
        finally:
            for cleanup in reversed(drill.cleanups):
                with contextlib.suppress(Exception):
                    await cleanup()
            if drill.opened is not None:
                drill.opened.close()


async def _run_in_process(drill: Drill) -> None:
    from controller.loop import Controller

    cfg = drill.config
    assert cfg is not None
    drill.opened = SQLiteStore(cfg.controller.data_dir)
    controller = Controller(cfg, drill.opened)
    controller.listeners.append(drill.on_event)
    await controller.start()
    tasks: list[asyncio.Task[Any]] = []
    try:
        await drill.wait_until(
            "every probe healthy before the fault",
            lambda: all(controller.detection.probe_healthy(p) for p in cfg.probes),
            20.0,
        )
        tasks.append(asyncio.create_task(drill.watch()))
        drill.t0 = drill.now()
        tasks.append(asyncio.create_task(drill.scenario.inject(drill)))
        await drill.until_done()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await controller.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _run_processes(drill: Drill, path: Path) -> None:
    """kill -9 a `continuity run` process in the middle of a playbook step, then start another."""
    import aiohttp

    cfg = drill.config
    assert cfg is not None and drill.env is not None
    root = ROOT
    env_vars = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    drill.opened = SQLiteStore(cfg.controller.data_dir)
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> tuple[subprocess.Popen[bytes], int]:
        port = _free_port()
        log = open(drill.env.workdir / f"controller-{n}.log", "wb")
        cmd = [sys.executable, "-m", "controller.cli", "run", "-c", str(path)]
        cmd += ["--listen", f"127.0.0.1:{port}", "--log-format", "json"]
        p = subprocess.Popen(cmd, env=env_vars, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(p)
        drill.note(f"controller process {n} started (pid {p.pid})")
        return p, port

    async def healthy(port: int) -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        except (aiohttp.ClientError, OSError):
            return False
        return all(f'continuity_probe_success{{probe="{p}",vantage="local"}} 1.0' in text for p in cfg.probes)

    def step_running(name: str) -> bool:
        for run in drill.store.runs():
            if any(s.name == name and s.state == "running" for s in drill.store.steps(run.id)):
                return True
        return False

    watcher: asyncio.Task[Any] | None = None
    try:
        first, port = start(1)
        end = time.monotonic() + 20
        while not await healthy(port):
            if first.poll() is not None or time.monotonic() > end:
                raise DrillError("the controller process did not become healthy; see controller-1.log")
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)  # success_threshold x interval: the verdicts are UP now
        watcher = asyncio.create_task(drill.watch())
        drill.t0 = drill.now()
        await drill.scenario.inject(drill)
        await drill.wait_until(
            "the drain-connections step running", lambda: step_running("drain-connections"), 30
        )
        os.kill(first.pid, signal.SIGKILL)
        await asyncio.to_thread(first.wait, 5)
        drill.extra["killed"] = True
        drill.mark("killed")
        drill.note("kill -9 of process 1 while drain-connections was running")
        second, _ = start(2)
        await drill.until_done()
        second.send_signal(signal.SIGTERM)
        await asyncio.to_thread(second.wait, 30)
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)


# ------------------------------------------------------------------ target mode


async def run_target_drill(
    scenario: Scenario | str, config_path: str | Path, service: str | None = None
) -> DrillResult:
    """Rehearse a scenario with a staging config in dry run: the fault is injected at the probes."""

    from controller.demo.marketplace import serve
    from controller.demo.pagerduty import PagerDutyReceiver
    from controller.loop import Controller
    from probes.base import ProbeResult

    sc = BUILTIN[scenario] if isinstance(scenario, str) else scenario
    if sc.target_faults is None:
        raise DrillError(
            f"scenario {sc.name} needs the demo environment; with --target: "
            + ", ".join(n for n, s in BUILTIN.items() if s.target_faults)
        )
    cfg = load_config(config_path)
    svc_name = service or next(
        (n for n, s in cfg.services.items() if s.tier == "critical" and s.playbook),
        next((n for n, s in cfg.services.items() if s.playbook), None),
    )
    if svc_name is None or svc_name not in cfg.services:
        raise DrillError(
            f"--service: expected a service with a playbook ({', '.join(cfg.services)}), found {svc_name!r}"
        )
    if sc.target_faults == "all" and not cfg.detection.reference_probes:
        raise DrillError(f"scenario {sc.name} needs detection.reference_probes in {config_path}")
    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="continuity-drill-")
    cfg.controller.dry_run = True
    cfg.controller.data_dir = tmp.name
    cfg.leader.backend = "none"
    receiver = PagerDutyReceiver()
    runner, pd_port = await serve(receiver.app(), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{pd_port}/v2/enqueue"
    cfg.notifiers.pagerduty = PagerDuty(routing_key_env="CONTINUITY_DRILL_PD_KEY", events_url=url)
    for other in ("slack", "teams", "webhook", "email", "statuspage"):
        setattr(cfg.notifiers, other, None)
    drill = Drill(sc)
    drill.config = cfg
    drill.focus = svc_name
    drill.opened = SQLiteStore(tmp.name)
    receiver.on_event = drill.on_page
    controller = Controller(cfg, drill.opened, env=lambda name: DRILL_PD_KEY)
    controller.listeners.append(drill.on_event)
    svc_probes = list(cfg.services[svc_name].probes)
    targets = list(cfg.probes) if sc.target_faults == "all" else svc_probes
    faults: set[str] = set()
    real = controller.inputs.run_once

    async def run_once(name: str, cfg: Any) -> ProbeResult:
        if name in faults:
            return ProbeResult(name, False, controller.clock(), 0.0, error=f"drill {sc.name}: injected fault")
        return await real(name, cfg)

    # Faults at the probes: the real controller, its probe runner swapped for this one (mypy forbids
    # assigning to a method; the instance attribute is exactly what the drill means to replace).
    controller.inputs.run_once = run_once  # type: ignore[method-assign]
    tasks: list[asyncio.Task[Any]] = []

    async def inject() -> None:
        drill.note(f"fault injected at the probes of {svc_name}: {', '.join(targets)} fail (dry run)")
        if sc.target_faults == "flap":
            while True:
                faults.update(targets)
                await asyncio.sleep(2.0)
                faults.clear()
                await asyncio.sleep(2.0)
        faults.update(targets)
        if sc.expected == "failover":  # the (dry-run) failover would have fixed it: lift the fault then
            await drill.wait_until(
                "a playbook run to finish",
                lambda: any(r.state not in ("running", "awaiting_approval") for r in drill.store.runs()),
                sc.deadline,
            )
            faults.clear()
            drill.mark("traffic_moved")
            drill.note("the dry-run failover finished: the fault is lifted, as a real failover would have")

    await controller.start()
    try:
        await drill.wait_until(
            f"every probe of {config_path} healthy before the fault",
            lambda: all(controller.detection.probe_healthy(p) for p in cfg.probes),
            20.0,
        )
        drill.t0 = drill.now()
        tasks.append(asyncio.create_task(inject()))
        await drill.until_done()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await controller.stop()
        await runner.cleanup()
    try:
        return score(drill, "target", time.monotonic() - started, service=svc_name)
    finally:
        drill.store.close()
        tmp.cleanup()


# ------------------------------------------------------------------ scoring


def _rel(ts: float | None, t0: float) -> float | None:
    return None if ts is None else round(ts - t0, 3)


def score(drill: Drill, mode: str, wall: float, service: str | None = None) -> DrillResult:
    sc, cfg = drill.scenario, drill.config
    assert cfg is not None
    t0 = drill.t0 if drill.t0 is not None else drill.now()
    incidents = drill.incidents()
    first = drill.first_incident()
    runs = sorted(drill.store.runs(), key=lambda r: r.started_at)
    service = service or drill.focus or (first.service if first else None) or next(iter(cfg.services))
    svc = cfg.services[service]
    triggers = [(t, e) for t, e in drill.pages if e.get("event_action") == "trigger"]
    own = [(t, e) for t, e in triggers if first is not None and e.get("dedup_key") == first.dedup_key]
    triggers = own + [p for p in triggers if p not in own]  # the focus incident's page counts first

    updates = [
        u["at"]
        for inc in ([first] if first is not None else incidents)  # the focus incident's, if any
        for u in (inc.data.get("comms") or {}).get("updates", [])
        if u.get("event") in ("opened", "update")
    ]
    demo = mode == "demo" and drill.env is not None
    if demo:
        from controller.demo.environment import PRIMARY_IP, SECONDARY_IP, STANDBY, WRITER

        record, writer = drill.env.record()[0], drill.env.writer()
        moved_at = drill.record_moves[0][0] if drill.record_moves else None
    else:
        PRIMARY_IP = SECONDARY_IP = STANDBY = WRITER = record = writer = ""
        moved_at = drill.marks.get("traffic_moved")
    succeeded = [r for r in runs if r.state == "succeeded"]
    changed = bool(drill.record_moves or drill.writer_moves) if demo else bool(succeeded)

    data_loss: float | None = None
    orders_lost = 0
    if demo and sc.database and sc.expected == "failover":
        data_loss = 0.0
        if writer != WRITER:  # the standby became the writer: what it had not replicated is gone
            lost = [t for t in drill.env.primary.confirmed_at if t0 - sc.replica_lag < t <= t0]
            orders_lost = len(lost)
            data_loss = round(t0 - min(lost), 3) if lost else 0.0
    measures: dict[str, float | None] = {
        "detect_s": _rel(first.opened_at, t0) if first else (_rel(triggers[0][0], t0) if triggers else None),
        "first_page_s": _rel(triggers[0][0], t0) if triggers else None,
        "first_customer_update_s": _rel(min(updates), t0) if updates else None,
        "traffic_moved_s": _rel(moved_at, t0),
        "recover_s": _rel(first.resolved_at, t0) if first and first.resolved_at else None,
        "data_loss_s": data_loss,
    }

    actions: list[str] = []
    for r in runs:
        steps = ", ".join(f"{s.name} {s.state}" for s in drill.store.steps(r.id))
        dry = " (dry run)" if r.dry_run else ""
        actions.append(f"{r.playbook} run {r.id}{dry}: {r.state} ({steps})")
    for t, ip in drill.record_moves:
        actions.append(f"Route 53 record moved to {ip} at +{t - t0:.1f}s")
    for t, w in drill.writer_moves:
        actions.append(f"Aurora writer moved to {w} at +{t - t0:.1f}s")

    wrong: list[str] = []
    if sc.expected == "failover":
        wrong += [f"an extra failover run: {r.playbook} {r.id} ({r.state})" for r in runs[1:]]
        wrong += [f"Route 53 moved again, to {ip}" for _, ip in drill.record_moves[1:]]
    else:
        wrong += [f"{r.playbook} run {r.id} completed" for r in succeeded]
        wrong += [f"Route 53 record moved to {ip}" for _, ip in drill.record_moves]
        wrong += [f"Aurora writer moved to {w}" for _, w in drill.writer_moves]

    messages = []
    for t, e in drill.pages:
        what = e.get("payload", {}).get("summary") or e.get("summary") or e.get("dedup_key", "")
        messages.append(f"+{t - t0:.1f}s PagerDuty {e.get('event_action')}: {what}")
    for inc in incidents:
        for u in (inc.data.get("comms") or {}).get("updates", []):
            messages.append(
                f"+{u['at'] - t0:.1f}s customers ({inc.id}, status page): {u['event']}, {u['status']}"
            )

    if changed and succeeded:
        outcome = "failover"
    elif changed:
        outcome = "changes without a completed failover"
    elif incidents and triggers:
        outcome = "page_only"
    elif triggers:
        outcome = "no_failover (alert only)"
    else:
        outcome = "no_failover"

    objectives: list[Objective] = []
    if sc.expected == "failover":
        if demo:
            moved = record == SECONDARY_IP and writer == STANDBY
            actual = f"{len(succeeded)} failover(s); record {record}, writer {writer}"
            right = len(succeeded) == 1 and moved
        else:
            actual = f"{len(succeeded)} completed dry-run failover(s)"
            right = len(succeeded) == 1
        objectives.append(Objective("right outcome: fail over", "exactly one failover", actual, right))
    else:
        unchanged = not changed
        actual = "nothing changed" if unchanged else "changes were made"
        if demo:
            actual += f" (record {record}, writer {writer})"
            unchanged = unchanged and record == PRIMARY_IP and writer == WRITER
        what = "page only" if sc.expected == "page_only" else "do not fail over"
        objectives.append(Objective(f"right outcome: {what}", "no change", actual, unchanged))
    if sc.expected in ("failover", "page_only"):
        ttd = measures["detect_s"]
        objectives.append(
            Objective(
                "detected", "an incident opened", _fmt(ttd) if ttd is not None else "never", ttd is not None
            )
        )
        ttp = measures["first_page_s"]
        objectives.append(
            Objective(
                "on-call paged",
                "a PagerDuty trigger",
                _fmt(ttp) if ttp is not None else "never",
                ttp is not None,
            )
        )
    if sc.expected == "failover":
        rec = measures["recover_s"]
        objectives.append(
            Objective(
                "recovered within the RTO",
                format_duration(svc.rto),
                _fmt(rec) if rec is not None else "not recovered",
                rec is not None and rec <= svc.rto,
            )
        )
        if data_loss is not None:
            objectives.append(
                Objective(
                    "data loss within the RPO",
                    format_duration(svc.rpo),
                    f"{_fmt(data_loss)} ({orders_lost} order(s) not replicated)",
                    data_loss <= svc.rpo,
                )
            )
    objectives.append(Objective("no action wrongly taken", "none", "; ".join(wrong) or "none", not wrong))
    objectives.extend(sc.checks(drill))

    marks = {"fault injected": 0.0}
    names = {
        "detect_s": "detected",
        "first_page_s": "first page",
        "first_customer_update_s": "first customer update",
        "traffic_moved_s": "traffic moved",
        "recover_s": "recovered",
    }
    for key, label in names.items():
        if (value := measures[key]) is not None:
            marks[label] = float(value)
    for key, ts in drill.marks.items():
        if key != "traffic_moved":
            marks[key.replace("_", " ")] = round(ts - t0, 3)
    series: dict[str, list[tuple[float, int]]] = {}
    verdicts = drill.verdicts or [
        (e.ts, str(e.data.get("probe")), "down" if " is DOWN" in e.message else "up")
        for inc in incidents
        for e in drill.store.timeline(inc.id)
        if e.kind == "probe"
        and isinstance(e.data, dict)
        and e.data.get("probe")
        and (" is DOWN" in e.message or " is UP" in e.message)
    ]
    for ts, probe, status in sorted(verdicts):
        if ts >= t0 - 1:
            series.setdefault(probe, [(-1.0, 1)]).append((round(ts - t0, 3), 1 if status == "up" else 0))
    return DrillResult(
        scenario=sc.name,
        title=sc.title,
        mode=mode,
        expected=sc.expected,
        right_outcome=sc.right_outcome,
        outcome=outcome,
        passed=all(o.passed for o in objectives),
        started_at=t0,
        wall_s=round(wall, 1),
        service=service,
        rto_s=svc.rto,
        rpo_s=svc.rpo,
        measures=measures,
        objectives=objectives,
        actions_taken=actions,
        actions_wrongly_taken=wrong,
        messages_sent=messages,
        notes=[f"+{t - t0:.1f}s {text}" for t, text in drill.notes],
        marks=marks,
        series=series,
    )


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(max(seconds, 0.0))
