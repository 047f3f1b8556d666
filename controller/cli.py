"""The `continuity` command. Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad config.

Every error a user can cause is caught here and printed as one clear message: a traceback at
3 a.m. is a bug.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.config import Config, ConfigError, json_schema, listen_address, load_config
from controller.durations import format_duration, parse_duration

if TYPE_CHECKING:
    import asyncio

    from controller.stores import Store

# Each command imports what it needs where it runs: `continuity validate` must answer any hostile
# file in under a second of CPU (issue 13), and asyncio, the stores, the probe engines and
# importlib.metadata cost a good part of that in start-up alone. tests/test_cli_imports.py pins it.

DEFAULT_CONFIG = "continuity.yaml"
RELOAD_TIMEOUT = 30.0
"""Seconds a config reload may parse before it is refused (the old config keeps running)."""
# moto (an in-process AWS) is a test double: only the demo and its drills need it, so it is the
# optional `demo` extra, and the production image and a plain install do without it.
DEMO_EXTRA = "pip install 'continuity[demo]'"


def version() -> str:
    """The installed distribution's version: pyproject.toml is its one source of truth."""
    import importlib.metadata

    try:
        return importlib.metadata.version("continuity")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed; pip install .)"


def _require_demo_extra(what: str) -> None:
    """Refuse, with the command that fixes it, when the demo's in-process AWS is not installed."""
    missing = [m for m in ("moto", "flask") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{what} needs the demo extra ({', '.join(missing)} not installed): {DEMO_EXTRA}")


class _Version(argparse.Action):
    """`--version`, looking the version up only when asked (reading the installed metadata costs
    start-up that every other command would pay)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"continuity {version()}")  # on stdout, as argparse's own version action prints it
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="continuity",
        description="Failover controller for online marketplaces: detect, classify, fail over, notify.",
    )
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "-c",
            "--config",
            default=DEFAULT_CONFIG,
            help=f"config file or directory of *.yaml (default: {DEFAULT_CONFIG})",
        )
        return sp

    run = with_config(
        sub.add_parser("run", help="run the controller (probes, decisions, playbooks, notifications)")
    )
    run.add_argument(
        "--listen", help="HTTP address for /metrics, /healthz and the API (overrides the config)"
    )
    run.add_argument("--data-dir", help="state directory (overrides controller.data_dir)")
    run.add_argument("--dry-run", action="store_true", help="decide and record everything, change nothing")
    run.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")

    val = with_config(sub.add_parser("validate", help="check a config and report every problem at once"))
    val.add_argument(
        "--require-env",
        action="store_true",
        help="fail (exit 2) when a secret variable the config names is unset (default: a warning)",
    )
    sub.add_parser("schema", help="print the configuration's JSON Schema (for editors)")

    probe = with_config(
        sub.add_parser("probe", help="run one probe once and print every step and expectation")
    )
    probe.add_argument("name")
    probe.add_argument("--json", action="store_true", help="print the result as JSON")

    pb = sub.add_parser("playbook", help="show or run playbooks")
    pb_sub = pb.add_subparsers(dest="playbook_command", metavar="ACTION", required=True)
    pb_run = with_config(pb_sub.add_parser("run", help="run a playbook now (by hand), or show its plan"))
    pb_run.add_argument("name")
    pb_run.add_argument("--dry-run", action="store_true", help="print the exact API calls; change nothing")
    pb_run.add_argument("--data-dir", help="state directory for the run's journal")

    inc = with_config(sub.add_parser("incidents", help="list incidents"))
    inc.add_argument("--open", action="store_true", help="only open incidents")
    inc.add_argument("--json", action="store_true")
    inc.add_argument("--data-dir")

    one = sub.add_parser("incident", help="look at one incident")
    one_sub = one.add_subparsers(dest="incident_command", metavar="ACTION", required=True)
    show = with_config(one_sub.add_parser("show", help="an incident and its timeline"))
    show.add_argument("id")
    show.add_argument("--data-dir")
    _incident_commands(one_sub, with_config)

    rep = with_config(
        sub.add_parser("report", help="write the post-incident report (Markdown, HTML and a PNG chart)")
    )
    rep.add_argument("id")
    rep.add_argument("--out", default=".", help="directory for the report files (default: here)")
    rep.add_argument("--data-dir")

    for verb, text in (
        ("approve", "approve a playbook run that awaits approval"),
        ("reject", "reject a playbook run that awaits approval"),
    ):
        sp = with_config(sub.add_parser(verb, help=text))
        sp.add_argument("run_id")
        sp.add_argument("--by", default=os.environ.get("USER", "cli"), help="who decides (default: $USER)")
        sp.add_argument("--reason", default="")
        sp.add_argument("--data-dir")
    sp = with_config(
        sub.add_parser("pause", help="stop all automatic playbook runs (incidents still open and page)")
    )
    sp.add_argument("--by", default=os.environ.get("USER", "cli"))
    sp.add_argument("--reason", default="")
    sp.add_argument("--data-dir")
    sp = with_config(sub.add_parser("resume", help="allow automatic playbook runs again"))
    sp.add_argument("--by", default=os.environ.get("USER", "cli"))
    sp.add_argument("--data-dir")
    sp = with_config(sub.add_parser("ack", help="unfreeze a service's playbook after a failed run"))
    sp.add_argument("service")
    sp.add_argument("--by", default=os.environ.get("USER", "cli"))
    sp.add_argument("--data-dir")

    sp = with_config(
        sub.add_parser("silence", help="suppress incidents and actions for a service for a while")
    )
    sp.add_argument("service")
    sp.add_argument("--for", dest="duration", required=True, help="how long, e.g. 30m")
    sp.add_argument("--reason", default="")
    sp.add_argument("--by", default=os.environ.get("USER", "cli"))
    sp.add_argument("--data-dir")
    sp = with_config(sub.add_parser("unsilence", help="lift a silence before it expires"))
    sp.add_argument("service")
    sp.add_argument("--by", default=os.environ.get("USER", "cli"))
    sp.add_argument("--data-dir")

    ag = with_config(
        sub.add_parser("agent", help="probe from another vantage point and push results to a controller")
    )
    ag.add_argument(
        "--controller", required=True, help="the controller's base URL, e.g. http://continuity:8080"
    )
    ag.add_argument("--vantage", required=True, help="this vantage point's name, e.g. eu-central-1")
    ag.add_argument("--probes", default="", help="comma-separated probe names (default: every polled probe)")
    ag.add_argument(
        "--token-env", default="CONTINUITY_API_TOKEN", help="env var holding the controller's token"
    )

    sub.add_parser("demo", help="run the simulated two-region marketplace and a failover, end to end")

    dr = with_config(sub.add_parser("drill", help="rehearse a disaster and score it against the RTO and RPO"))
    dr.add_argument("scenario", nargs="?", help="a scenario name (see --list)")
    dr.add_argument("--all", action="store_true", help="run every scenario and print a table")
    dr.add_argument("--list", action="store_true", help="list the scenarios and their right outcomes")
    dr.add_argument(
        "--target",
        metavar="CONFIG",
        help="rehearse with this (staging) config in dry run instead of the demo",
    )
    dr.add_argument("--service", help="with --target: the service to break (default: the first critical one)")
    dr.add_argument(
        "--out",
        help="directory for the reports (default: drill-reports/ under the data directory: --data-dir, "
        "the config's controller.data_dir, else $XDG_STATE_HOME/continuity)",
    )
    dr.add_argument("--data-dir", help="where drill results are kept (default: the config's store)")

    pl = with_config(
        sub.add_parser("plan", help="render the business-continuity plan (Markdown and HTML) from the config")
    )
    pl.add_argument("--out", default=".", help="directory for continuity-plan.md and .html (default: here)")
    pl.add_argument("--data-dir", help="where drill results are kept (default: the config's store)")
    return p


def _incident_commands(one_sub: Any, with_config: Any) -> None:
    """`continuity incident ack|update|resolve|assign`: durable requests the controller applies."""
    who = os.environ.get("USER", "cli")
    for verb, text in (
        ("ack", "acknowledge an incident (PagerDuty stops escalating)"),
        ("update", "post an update to every audience and channel"),
        ("resolve", "resolve an incident; the resolution goes out at once"),
        ("assign", "hand the incident commander role to someone else"),
    ):
        sp = with_config(one_sub.add_parser(verb, help=text))
        sp.add_argument("id")
        sp.add_argument("--by", default=who, help="who does it (default: $USER)")
        sp.add_argument("--data-dir")
        if verb == "update":
            sp.add_argument("--status", choices=["investigating", "identified", "monitoring"])
            sp.add_argument("--message", required=True, help="what customers and colleagues read")
            sp.add_argument("--eta", help="expected resolution from now, e.g. 45m")
        elif verb == "resolve":
            sp.add_argument("--message", default="")
        elif verb == "assign":
            sp.add_argument("--ic", required=True, help="the new incident commander")


def _answer(args: argparse.Namespace, act: Callable[[Config, Store], str]) -> int:
    """Run one human command against the store: one line on success, one clear line on refusal."""
    from controller.commands import CommandError

    cfg = _load(args.config)
    store = _store(cfg, args.data_dir)
    try:
        text = act(cfg, store)
    except CommandError as exc:
        print(f"continuity: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(text)
    return 0


def _service(cfg: Config, name: str) -> str:
    if name not in cfg.services:
        raise UsageError(f"no service named {name!r} (known: {', '.join(sorted(cfg.services))})")
    return name


def cmd_incident(args: argparse.Namespace) -> int:
    if args.incident_command == "show":
        return cmd_incident_show(args)
    from controller.comms import commands

    acts: dict[str, Callable[[Config, Store], str]] = {
        "ack": lambda cfg, st: commands.ack(st, args.id, args.by),
        "update": lambda cfg, st: commands.update(st, args.id, args.by, args.status, args.message, args.eta),
        "resolve": lambda cfg, st: commands.resolve(st, args.id, args.by, args.message),
        "assign": lambda cfg, st: commands.assign(st, args.id, args.by, args.ic),
    }
    return _answer(args, acts[args.incident_command])


def cmd_report(args: argparse.Namespace) -> int:
    from controller.report import ReportError, write_report

    cfg = _load(args.config)
    store = _store(cfg, args.data_dir)
    try:
        paths = write_report(store, cfg, args.id, Path(args.out))
    except ReportError as exc:
        print(f"continuity: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    for path in paths:
        print(path)
    return 0


def _load(path: str) -> Config:
    return load_config(path)


def _store(cfg: Config, data_dir: str | None) -> Store:
    """SQLite in the data directory, or Kubernetes objects, as the config's `store` section says."""
    from controller.stores import open_store

    return open_store(cfg, data_dir)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check the file; then report every secret variable it names that is unset here, and when the
    controller reads it. A warning by default (CI validates without production secrets); an error
    (exit 2) with --require-env, for the host or image that will run the controller."""
    from controller.config import secret_env_names

    cfg = _load(args.config)
    for warning in placement_warnings(cfg, os.environ) + cfg.detection_warnings():
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    unset = [(n, where, when) for n, where, when in secret_env_names(cfg) if not os.environ.get(n)]
    if unset and args.require_env:
        raise ConfigError(
            [
                f"environment: {n} ({where}): expected the secret set, found it unset; read {when}"
                for n, where, when in unset
            ]
        )
    for n, where, when in unset:
        print(f"{args.config}: warning: {n} ({where}) is unset here; read {when}", file=sys.stderr)
    note = (
        f"; {len(unset)} secret variable(s) unset here (see above; --require-env fails on them)"
        if unset
        else ""
    )
    print(
        f"{args.config}: ok: {len(cfg.services)} service(s), {len(cfg.probes)} probe(s), "
        f"{len(cfg.playbooks)} playbook(s){note}"
    )
    return 0


def cmd_schema(_: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import asyncio

    from probes.runner import run_probe

    cfg = _load(args.config)
    if args.name not in cfg.probes:
        known = ", ".join(sorted(cfg.probes)) or "none"
        print(f"continuity: no probe named {args.name!r} (known: {known})", file=sys.stderr)
        return 2
    if cfg.probes[args.name].kind in ("heartbeat", "alertmanager"):
        print(
            f"continuity: probe {args.name!r} is passive ({cfg.probes[args.name].kind}): the running "
            "controller evaluates it from what is pushed to it; see GET /services",
            file=sys.stderr,
        )
        return 2
    result = asyncio.run(run_probe(args.name, cfg.probes[args.name]))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.ok else 1
    print(f"probe {args.name}: {'PASS' if result.ok else 'FAIL'} in {format_duration(result.latency)}")
    for step in result.steps:
        mark = "ok  " if step.ok else "FAIL"
        print(
            f"  [{mark}] {step.name}: {step.request} -> "
            f"{step.status if step.status is not None else '-'} in {format_duration(step.latency)}"
        )
        if step.error:
            print(f"         error: {step.error}")
        for check in step.checks:
            print(
                f"         {'ok  ' if check.ok else 'FAIL'} {check.name}: expected {check.expected}, "
                f"found {check.found}"
            )
    if not result.ok:
        print(f"reason: {result.reason}")
    return 0 if result.ok else 1


def cmd_playbook_run(args: argparse.Namespace) -> int:
    import asyncio

    from playbooks.engine import render_plan

    cfg = _load(args.config)
    if args.name not in cfg.playbooks:
        known = ", ".join(sorted(cfg.playbooks)) or "none"
        print(f"continuity: no playbook named {args.name!r} (known: {known})", file=sys.stderr)
        return 2
    pb = cfg.playbooks[args.name]
    print(render_plan(args.name, pb))
    if args.dry_run:
        print("dry run: nothing was changed")
        return 0
    return asyncio.run(_manual_run(cfg, args))


async def _manual_run(cfg: Config, args: argparse.Namespace) -> int:
    from controller.loop import Controller

    store = _store(cfg, args.data_dir)
    controller = Controller(cfg, store)
    controller.listeners.append(
        lambda kind, facts: print(f"  {facts['message']}") if "message" in facts else None
    )
    await controller.start(decide=False)
    try:
        result = await controller.runs.run_playbook_by_hand(args.name)
    finally:
        await controller.stop()
        store.close()
    print(f"run {result.run_id}: {'succeeded' if result.ok else 'FAILED: ' + result.error}")
    return 0 if result.ok else 1


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _reading_store(args: argparse.Namespace) -> Store:
    """The store to read incidents from: the config's, or with only --data-dir, SQLite there."""
    from controller.stores import SQLiteStore

    if args.data_dir and args.config == DEFAULT_CONFIG and not Path(args.config).exists():
        if not Path(args.data_dir).is_dir():
            raise UsageError(f"--data-dir {args.data_dir}: no such directory")
        return SQLiteStore(args.data_dir)
    if args.config == DEFAULT_CONFIG and not Path(args.config).exists():
        raise UsageError(
            f"no {DEFAULT_CONFIG} here: pass -c FILE (the controller's config) or --data-dir DIR "
            "(its data directory)"
        )
    return _store(_load(args.config), args.data_dir)


def cmd_incidents(args: argparse.Namespace) -> int:
    store = _reading_store(args)
    items = store.list_incidents(status="open" if args.open else None)
    if args.json:
        print(json.dumps([i.to_dict() for i in items], indent=2))
        return 0
    if not items:
        print("no incidents")
    else:
        print(f"{'ID':<22} {'SERVICE':<14} {'SEVERITY':<9} {'STATUS':<9} {'OPENED':<20} DURATION")
        for i in items:
            took = format_duration((i.resolved_at or time.time()) - i.started_at)
            print(f"{i.id:<22} {i.service:<14} {i.severity:<9} {i.status:<9} {_when(i.opened_at):<20} {took}")
    moved = {s: f for s, f in store.failover_states().items() if f.state != "primary" or f.run_id}
    if moved:  # where each service stands between its primary and its secondary, and why
        print(f"\n{'SERVICE':<14} {'FAILOVER STATE':<27} {'RUN':<20} {'SINCE':<20} REASON")
        for name, f in sorted(moved.items()):
            print(f"{name:<14} {f.state:<27} {f.run_id or '-':<20} {_when(f.since):<20} {f.reason}")
    return 0


def cmd_incident_show(args: argparse.Namespace) -> int:
    store = _reading_store(args)
    inc = store.get_incident(args.id)
    if inc is None:
        print(f"continuity: no incident {args.id!r}", file=sys.stderr)
        return 1
    print(f"{inc.id}  {inc.service}  {inc.severity}  {inc.status}\n{inc.title}")
    for ev in store.timeline(inc.id):
        print(f"  {_when(ev.ts)}  {ev.kind:<12} {ev.message}")
    return 0


def controller_region(cfg: Config, environ: Mapping[str, str]) -> str | None:
    """Where this controller runs: `controller.region`, else the AWS SDK's own variables."""
    return cfg.controller.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None


def placement_warnings(cfg: Config, environ: Mapping[str, str]) -> list[str]:
    """A controller in the region its playbooks fail away from goes down with that region, exactly
    when it is needed: say so (a warning, not an error: a drill config may do it on purpose)."""
    region = controller_region(cfg, environ)
    if not region:
        return []
    source = "controller.region" if cfg.controller.region else "AWS_REGION"
    return [
        f"playbooks.{name}.fails_away_from: the controller runs in {region} ({source}), the region this "
        "playbook fails away from; an outage of that region takes the controller down with it. Run it "
        "in a management cluster or another region (README: Where to run it)"
        for name, pb in sorted(cfg.playbooks.items())
        if pb.fails_away_from == region
    ]


def ha_problems(cfg: Config, environ: Mapping[str, str]) -> list[str]:
    """Refuse per-pod state in a Deployment of several replicas. The chart tells the pod its replica
    count (CONTINUITY_REPLICAS); with more than one, a file lock or a SQLite file on each pod's own
    emptyDir would let every replica lead: two incidents, two pages, every step applied twice."""
    raw = environ.get("CONTINUITY_REPLICAS", "").strip()
    if not raw:
        return []
    try:
        replicas = int(raw)
    except ValueError:
        return [f"CONTINUITY_REPLICAS: expected a whole number of replicas, found {raw!r}"]
    if replicas <= 1:
        return []
    where = f"in a Deployment of {replicas} replicas (CONTINUITY_REPLICAS={replicas})"
    problems = []
    if cfg.leader.backend != "kubernetes":
        problems.append(
            f"leader.backend: expected kubernetes {where}, found {cfg.leader.backend!r}: a lock on each "
            "pod's own disk lets every replica lead, fail over and page"
        )
    if cfg.store.backend != "kubernetes":
        problems.append(
            f"store.backend: expected kubernetes {where}, found {cfg.store.backend!r}: each pod would "
            "keep its own incidents, runs and outbox, and a new leader would start from nothing"
        )
    return problems


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from controller import logs
    from controller.stores import open_store

    logs.configure(args.log_format)
    cfg = _load(args.config)
    if args.dry_run:
        cfg.controller.dry_run = True
    if args.listen:
        try:
            parse_listen(args.listen)
        except ValueError as exc:
            raise UsageError(f"--listen: expected {exc}") from None
        cfg.controller.listen = args.listen
    if args.data_dir:
        # One directory for the store and the lock that protects it: moving one moves both.
        cfg.controller.data_dir = args.data_dir
    problems = ha_problems(cfg, os.environ)
    if problems:
        raise ConfigError([f"{args.config}: {p}" for p in problems])
    for warning in placement_warnings(cfg, os.environ):
        logs.get("continuity.config").warning("controller placement", problem=warning)
    store = open_store(cfg, args.data_dir, cache=True)  # every tick reads: served from memory
    try:
        _event_loop_policy()
        asyncio.run(_serve(cfg, store, args.config))
    finally:
        store.close()
    return 0


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (an empty host, or 0.0.0.0, is every interface; IPv6 as [::1]:8080) -> (host, port).

    Raises ValueError saying what was expected: `127.0.0.1:99999` must not bind some other port."""
    return listen_address(value)


def _event_loop_policy() -> None:
    import asyncio

    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms that lack it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _identity(cfg: Config) -> str:
    import socket

    return cfg.leader.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def _elector(cfg: Config, registry: Any) -> Any:
    """The leadership lock the config asks for; None means this process always leads."""
    from controller import leader

    lc = cfg.leader
    if lc.backend == "none":
        return None
    if lc.backend == "file":
        Path(cfg.controller.data_dir).mkdir(parents=True, exist_ok=True)
        path = Path(cfg.controller.data_dir) / f"{lc.lease_name}.lock"
        return leader.FileLockElector(path, _identity(cfg), lc.retry_period, registry=registry)
    from kubernetes import client
    from kubernetes import config as kube_config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config()
        else:
            kube_config.load_kube_config()
    except Exception as exc:  # no cluster to talk to is a configuration problem, said plainly
        raise UsageError(f"leader.backend is kubernetes but no cluster is reachable: {exc}") from None
    namespace = lc.namespace or os.environ.get("POD_NAMESPACE") or _pod_namespace()
    try:
        return leader.LeaseElector(
            client.ApiClient(),
            namespace,
            os.environ.get("CONTINUITY_LEASE_NAME", lc.lease_name),
            _identity(cfg),
            lc.lease_duration,
            lc.renew_deadline,
            lc.retry_period,
            registry=registry,
        )
    except ValueError as exc:
        raise ConfigError(
            [f"leader: expected lease_duration > renew_deadline > 1.2 x retry_period, found {exc}"]
        ) from None


def _pod_namespace() -> str:
    try:
        return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
    except OSError:
        return "default"


def _fingerprint(path: str) -> str:
    """What the config looks like on disk now (a ConfigMap update swaps a symlink; content tells)."""
    p = Path(path)
    files = sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p]
    import hashlib

    from controller.config import CONFIG_MAX_BYTES

    digest = hashlib.sha256()

    for f in files:
        try:
            with f.open("rb") as fh:  # bounded: a huge file must not be read whole on the loop
                digest.update(fh.read(CONFIG_MAX_BYTES + 1))
            digest.update(str(f.stat().st_size).encode())
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()


async def _serve(cfg: Config, store: Store, config_path: str) -> None:
    import asyncio
    import signal

    from controller import apiserver, heap, logs
    from controller.api import app
    from controller.loop import Controller
    from controller.metrics import Metrics

    metrics = Metrics()
    controller = Controller(cfg, store, metrics=metrics, elector=_elector(cfg, metrics.registry))
    host, port = listen_address(cfg.controller.listen, ephemeral=True)  # checked when the config loaded
    before, soft, hard = apiserver.raise_fd_limit()
    cap = apiserver.connection_cap(cfg.controller.api_max_connections, soft)
    logs.get("continuity.api").info(
        "file descriptors: the API holds at most a share, the rest is kept for probes",
        soft_limit=soft,
        soft_limit_before=before,
        hard_limit=hard,
        api_max_connections=cap,
    )
    limits = apiserver.Limits(cap, cfg.controller.api_header_timeout, metrics)
    try:
        runner, server = await apiserver.serve(app(controller), host, port, limits)
    except OSError as exc:
        raise UsageError(f"cannot listen on {cfg.controller.listen}: {exc.strerror or exc}") from None
    stop = asyncio.Event()
    reload_now = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    labeler = _pod_labeler(cfg)
    label_stop = asyncio.Event()
    label_task = None
    if labeler is not None:
        controller.leadership_hooks.append(labeler.want)
        label_task = asyncio.create_task(labeler.run(label_stop), name="podlabel")
    await controller.start()
    metrics.heap_frozen.set(heap.settle())
    if controller.elector is None:
        from controller.leader import leader_gauge

        gauge = leader_gauge(metrics.registry)
        if gauge is not None:
            gauge.labels("none").set(1)
    watcher = asyncio.create_task(_watch_config(controller, config_path, reload_now, stop))
    await stop.wait()
    watcher.cancel()
    server.close()
    await controller.stop()
    if label_task is not None:  # after the lease is released: the label goes last, then we exit
        label_stop.set()
        await asyncio.gather(label_task, return_exceptions=True)
    await runner.cleanup()


def _pod_labeler(cfg: Config) -> Any:
    """In a pod of the chart (POD_NAME and CONTINUITY_POD_SELECTOR set) with a Lease, the leader
    labels its pod so the push Service routes Alertmanager, heartbeats and agents to it."""
    pod = os.environ.get("POD_NAME")
    selector = os.environ.get("CONTINUITY_POD_SELECTOR")
    if cfg.leader.backend != "kubernetes" or not pod or selector is None:
        return None
    from kubernetes import client

    from controller.podlabel import PodLabeler

    namespace = os.environ.get("POD_NAMESPACE") or _pod_namespace()
    return PodLabeler(client.ApiClient(), namespace, pod, selector, retry_period=cfg.leader.retry_period)


async def _watch_config(controller: Any, path: str, reload_now: asyncio.Event, stop: asyncio.Event) -> None:
    """Reload on SIGHUP or when the file changes; a bad new config is refused, the old one keeps running."""
    import asyncio

    from controller import heap, logs
    from controller.executors import IO, run_in

    log = logs.get("continuity.config")
    seen = _fingerprint(path)
    while not stop.is_set():
        try:
            await asyncio.wait_for(reload_now.wait(), timeout=controller.config.controller.config_poll)
        except TimeoutError:
            pass
        signalled = reload_now.is_set()
        reload_now.clear()
        now = _fingerprint(path)
        if not signalled and now == seen:
            continue
        seen = now
        metrics = controller.metrics
        try:
            # In a worker thread, never on the loop; the loader's bounds (size, depth, values after
            # aliases) keep it short, and a reload that still takes too long is refused, not awaited.
            new = await asyncio.wait_for(run_in(IO, load_config, path), timeout=RELOAD_TIMEOUT)
        except TimeoutError:
            controller.metrics.reloads.labels("rejected").inc()
            log.error("config reload rejected: parsing took too long", seconds=RELOAD_TIMEOUT)
            continue
        except ConfigError as exc:
            metrics.reloads.labels("rejected").inc()
            metrics.reload_failures.inc()
            metrics.reload_ok.set(0)
            for problem in exc.problems:
                log.error("config reload rejected; the previous config keeps running", problem=problem)
            continue
        try:
            await controller.reload(new)
        except Exception:  # a bug while applying must not kill the watcher; the old config runs on
            metrics.reloads.labels("failed").inc()
            metrics.reload_failures.inc()
            metrics.reload_ok.set(0)
            log.exception("config reload failed while being applied; the previous config keeps running")
            continue
        metrics.reloads.labels("applied").inc()
        metrics.reload_successes.inc()
        metrics.reload_ok.set(1)
        metrics.heap_frozen.set(heap.settle())  # the new config's objects live as long as it does
        log.info("config reloaded", services=len(new.services), probes=len(new.probes))


def cmd_demo(_: argparse.Namespace) -> int:
    import asyncio

    _require_demo_extra("continuity demo")
    from controller import logs
    from controller.demo.scenario import run_demo

    logs.configure("console", level="critical")  # the demo prints its own timeline
    result = asyncio.run(run_demo())
    return 0 if result.ok else 1


def _results_store(args: argparse.Namespace, target: str | None = None) -> Store:
    """Where drill results are kept: the store of the config in play, else `--data-dir`/.continuity."""
    from controller.stores import SQLiteStore

    path = target or args.config
    if target or Path(path).exists():
        return _store(_load(path), args.data_dir)
    return SQLiteStore(args.data_dir or str(_state_home()))


def _state_home() -> Path:
    """Where a drill of the demo keeps its results when no config names a data directory: the XDG
    state directory, never whatever directory the command happened to be run from."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "continuity"


def _drill_out(args: argparse.Namespace) -> Path:
    """--out, else drill-reports/ beside the drill results (the data directory in play)."""
    if args.out:
        return Path(args.out)
    if args.data_dir:
        return Path(args.data_dir) / "drill-reports"
    path = args.target or args.config
    if Path(path).exists():
        cfg = _load(path)
        if cfg.store.backend == "sqlite":
            return Path(cfg.controller.data_dir) / "drill-reports"
    return _state_home() / "drill-reports"


def cmd_drill(args: argparse.Namespace) -> int:
    import asyncio

    from controller import logs
    from controller.drills import report
    from controller.drills.drill import DrillError
    from controller.drills.runner import run_demo_drill, run_target_drill
    from controller.drills.scenarios import BUILTIN

    if args.list:
        for sc in BUILTIN.values():
            where = "demo, --target" if sc.target_faults else "demo"
            print(f"{sc.name:<22} {sc.expected:<12} {sc.title} ({where}): {sc.right_outcome}")
        return 0
    if args.all == bool(args.scenario):
        raise UsageError("name one scenario, or --all (see --list)")
    if args.scenario and args.scenario not in BUILTIN:
        raise UsageError(f"no scenario {args.scenario!r} (known: {', '.join(BUILTIN)})")
    names = [args.scenario] if args.scenario else list(BUILTIN)
    if not args.target:
        _require_demo_extra("continuity drill (without --target)")
    if args.target:
        _load(args.target)  # a bad config is exit 2 before anything runs
        if args.all:
            names = [n for n in names if BUILTIN[n].target_faults]
        elif not BUILTIN[args.scenario].target_faults:
            raise UsageError(
                f"scenario {args.scenario} needs the demo environment; with --target: "
                + ", ".join(n for n, sc in BUILTIN.items() if sc.target_faults)
            )
    logs.configure("console", level="critical")  # the drill prints its own summary
    store = _results_store(args, args.target)
    out = _drill_out(args)
    results = []
    try:
        for name in names:
            try:
                if args.target:
                    result = asyncio.run(run_target_drill(name, args.target, args.service))
                else:
                    result = asyncio.run(run_demo_drill(name))
            except DrillError as exc:
                print(f"continuity: drill {name}: {exc}", file=sys.stderr)
                return 1
            report.write(result, out)
            report.record(store, result)
            results.append(result)
            if not args.all:
                print(f"drill {name}: {'PASSED' if result.passed else 'FAILED'} ({result.outcome})")
                for o in result.objectives:
                    print(f"  [{'ok' if o.passed else 'MISSED'}] {o.name}: {o.actual} (target {o.target})")
                for path in result.files:
                    print(path)
    finally:
        store.close()
    if args.all:
        print(report.table(results))
        print(f"reports: {out}")
    return 0 if all(r.passed for r in results) else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from controller.plan import write_plan

    cfg = _load(args.config)
    store = _store(cfg, args.data_dir)
    try:
        paths = write_plan(cfg, store, Path(args.out), source=args.config)
    finally:
        store.close()
    for path in paths:
        print(path)
    return 0


def cmd_human(args: argparse.Namespace) -> int:
    from controller import commands

    def silence(cfg: Config, store: Store) -> str:
        try:
            seconds = parse_duration(args.duration)
        except ValueError as exc:
            raise UsageError(f"--for: expected {exc}") from None
        return commands.silence(store, _service(cfg, args.service), seconds, args.by, args.reason)

    acts: dict[str, Callable[[Config, Store], str]] = {
        "approve": lambda cfg, st: commands.approve(st, args.run_id, args.by),
        "reject": lambda cfg, st: commands.reject(st, args.run_id, args.by, args.reason),
        "pause": lambda cfg, st: commands.pause(st, args.by, args.reason),
        "resume": lambda cfg, st: commands.resume(st, args.by),
        "silence": silence,
        "unsilence": lambda cfg, st: commands.unsilence(st, _service(cfg, args.service), args.by),
        "ack": lambda cfg, st: commands.ack(st, _service(cfg, args.service), args.by),
    }
    return _answer(args, acts[args.command])


def cmd_agent(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from controller import logs
    from controller.remote import Agent

    logs.configure("auto")
    cfg = _load(args.config)
    names = [n.strip() for n in args.probes.split(",") if n.strip()]
    unknown = [n for n in names if n not in cfg.probes]
    if unknown:
        raise UsageError(f"--probes: no probe named {', '.join(map(repr, unknown))}")
    token = os.environ.get(args.token_env, "")
    if not token:
        raise UsageError(f"{args.token_env} is not set: the controller only accepts authenticated agents")
    agent = Agent(cfg, args.controller, args.vantage, token, names or None)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    _event_loop_policy()
    asyncio.run(main())
    return 0


class UsageError(Exception):
    """A problem with how the command was called (exit 2)."""


COMMANDS: dict[str, Any] = {
    "run": cmd_run,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "probe": cmd_probe,
    "incidents": cmd_incidents,
    "approve": cmd_human,
    "reject": cmd_human,
    "pause": cmd_human,
    "resume": cmd_human,
    "ack": cmd_human,
    "silence": cmd_human,
    "unsilence": cmd_human,
    "agent": cmd_agent,
    "demo": cmd_demo,
    "report": cmd_report,
    "drill": cmd_drill,
    "plan": cmd_plan,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "playbook":
        handler = cmd_playbook_run
    elif args.command == "incident":
        handler = cmd_incident
    else:
        handler = COMMANDS[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"continuity: {exc.count:,} problem(s) in the configuration", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"continuity: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A store error can come only from a command that imported the stores (validate never does).
        stores = sys.modules.get("controller.stores.model")
        if stores is None or not isinstance(exc, stores.StoreError):
            raise
        print(f"continuity: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
