"""Scenarios: the marketplace the controller watches, and the fault timeline it lives through.

A scenario is data (config switches, faults, events), generated from a seed, so a failing run
prints it and `--sim-seed N` rebuilds exactly the same one. The named regression scenarios (one per
bug of issue 10) are written out by hand at the bottom.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

from controller.config import Config, Detection
from tests.sim.world import Event, Fault

SETTLE = 450.0
"""The last 450 simulated seconds of every scenario are fault-free: queued messages must get out."""

HAS_INTERMITTENT = "intermittent" in Detection.model_fields
APPROVAL_TIMEOUT = 300.0
"""A failover awaiting approval expires after this long (scenarios last minutes)."""
HEARTBEAT_PERIOD = 60.0
STATUSPAGE_PAGE = "simpage"


@dataclass
class Scenario:
    seed: int
    name: str = ""
    duration: float = 3600.0
    store: str = "sqlite"
    """sqlite | kube (KubernetesStore on tests/fakes/kubeapi.py)."""
    replicas: int = 1
    references: bool = False
    agents: bool = False
    failback: bool = False
    db_step: bool = False
    http_step: bool = False
    http_timeout: float = 30.0
    """The http step's own `timeout` (its request deadline) and its step timeout."""
    only_api: bool = False
    """The figures' set-up: checkout with one http probe at the defaults (and the guard's probe)."""
    lean: bool = False
    """Measurement runs: no stall monitor, the outbox polled every 60 s (new messages still wake it)."""
    playbook: bool = True
    """False: checkout has no failover playbook (the incident stays open while the outage lasts)."""
    cooldown: float = 1800.0
    tick: float = 10.0
    """The reconcile period (production default 1 s). A verdict change reconciles at once anyway, so
    this only delays time-based decisions (failback, communicator updates) by up to a tick; 10 s
    keeps 200 scenarios inside the CI budget."""
    pushes: bool = False
    """Pushed inputs through the real API app: Alertmanager (the `payments` service), a heartbeat
    job (`worker`), agents' results over /results, and an attacker's forged pushes."""
    approval: str | None = None
    """None: the failover runs unattended. approve | reject | never: it needs a human, who answers so
    (through the API, with the token) a while after the approval is asked for."""
    comms: bool = False
    """Email (SMTP) and Statuspage channels besides PagerDuty and Slack."""
    lease: bool = False
    """Two replicas elect a leader with the real LeaseElector (controller/leader.py) over the
    simulated Lease API, instead of the world choosing the leader."""
    faults: list[Fault] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    checks: tuple[str, ...] | None = None
    """Only these invariants (a regression scenario names the one it is about); None: all."""

    def describe(self) -> str:
        flags = [
            f"store={self.store}",
            f"replicas={self.replicas}",
            f"duration={self.duration:.0f}s",
            *(
                name
                for name in (
                    "references",
                    "agents",
                    "failback",
                    "db_step",
                    "http_step",
                    "pushes",
                    "comms",
                    "lease",
                )
                if getattr(self, name)
            ),
            *([f"approval={self.approval}"] if self.approval else []),
        ]
        head = f"scenario {self.name or 'random'} seed={self.seed}: " + " ".join(flags)
        lines = [head]
        lines += [f"  fault {f.describe()}" for f in sorted(self.faults, key=lambda f: f.start)]
        lines += [f"  event {e.describe()}" for e in sorted(self.events, key=lambda e: e.at)]
        return "\n".join(lines)


# ====================================================================== the marketplace


def config(s: Scenario) -> Config:
    """Checkout (critical, fails over eu -> us through Route 53) and catalog (important, eu only)."""
    probes: dict[str, Any] = {
        "checkout-api": {
            "kind": "http",
            "url": "http://checkout.shop.sim/health",
            "interval": "10s",
            "timeout": "3s",
            "latency_slo": "1s",
        },
        "checkout-journey": {
            "kind": "transaction",
            "interval": "30s",
            "timeout": "10s",
            "steps": [
                {"name": "home", "url": "http://checkout.shop.sim/"},
                {"name": "cart", "url": "http://checkout.shop.sim/cart"},
                {"name": "pay", "url": "http://checkout.shop.sim/pay"},
            ],
        },
        "eu-direct": {"kind": "http", "url": "http://eu.shop.sim/health", "interval": "15s", "timeout": "3s"},
        "us-direct": {"kind": "http", "url": "http://us.shop.sim/health", "interval": "15s", "timeout": "3s"},
        "catalog-api": {"kind": "http", "url": "http://catalog.eu.shop.sim/health", "interval": "15s"},
    }
    if s.only_api:
        probes = {
            "checkout-api": {"kind": "http", "url": "http://checkout.shop.sim/health"},
            "us-direct": {"kind": "http", "url": "http://us.shop.sim/health"},
        }
    detection: dict[str, Any] = {}
    if s.references:
        probes["ref-a"] = {"kind": "http", "url": "http://ref-a.sim/", "interval": "20s"}
        probes["ref-b"] = {"kind": "http", "url": "http://ref-b.sim/", "interval": "20s"}
        detection["reference_probes"] = ["ref-a", "ref-b"]
    if s.agents:
        detection["quorum"] = 2
    if HAS_INTERMITTENT and not s.only_api:
        # Scenarios last minutes, so the rule is tightened to judge within them; the figures'
        # set-up (only_api) keeps the production defaults, since it measures what users get.
        detection["intermittent"] = {"window": "3m", "rate": 0.3, "min_runs": 6}

    def switch(region_ip: str, guard: str) -> dict[str, Any]:
        return {
            "name": "switch-dns",
            "action": "aws.route53.switch_record",
            "with": {"zone": "ZSIM", "record": "checkout.shop.sim.", "values": [region_ip]},
            "guards": [{"probes_healthy": [guard]}],
        }

    forward: list[dict[str, Any]] = [switch("10.0.2.1", "us-direct")]
    back: list[dict[str, Any]] = [switch("10.0.1.1", "eu-direct")]
    if s.db_step:
        forward.append(
            {
                "name": "move-writer",
                "action": "aws.rds.failover_db_cluster",
                "with": {"cluster": "shop-db", "target_instance": "shop-us"},
            }
        )
        back.append(
            {
                "name": "move-writer",
                "action": "aws.rds.failover_db_cluster",
                "with": {"cluster": "shop-db", "target_instance": "shop-eu"},
            }
        )
    if s.http_step:
        forward.append(
            {
                "name": "purge-cdn",
                "action": "http",
                "timeout": f"{s.http_timeout:g}s",
                "with": {
                    "url": "http://hooks.sim/purge",
                    "json": {"incident": "{{ incident_id }}", "region": "us"},
                    "timeout": f"{max(s.http_timeout, 5):g}s",
                },
            }
        )
    services: dict[str, Any] = {
        "checkout": {
            "tier": "critical",
            "rto": "5m",
            "probes": ["checkout-api", "checkout-journey"],
            "playbook": "region-failover",
        },
        "catalog": {"tier": "important", "rto": "30m", "probes": ["catalog-api"]},
    }
    playbooks: dict[str, Any] = {
        "region-failover": {"steps": forward, "approval": "auto", "cooldown": f"{s.cooldown:g}s"}
    }
    if s.approval:
        playbooks["region-failover"].update(approval="manual", approval_timeout=f"{APPROVAL_TIMEOUT:g}s")
    if s.pushes:
        # Checked every 15 s (defaults 5 s and 10 s): the pushes, not the checks, carry the news,
        # and three times fewer evaluations keep the CI budget.
        probes["payments-alerts"] = {
            "kind": "alertmanager",
            "matchers": {"service": "payments"},
            "interval": "15s",
        }
        probes["worker-heartbeat"] = {
            "kind": "heartbeat",
            "period": f"{HEARTBEAT_PERIOD:g}s",
            "grace": "30s",
            "token_env": "SIM_HEARTBEAT_TOKEN",
            "interval": "15s",
        }
        services["payments"] = {
            "tier": "important",
            "rto": "30m",
            "probes": ["payments-alerts"],
            "playbook": "payments-switch",
        }
        services["worker"] = {"tier": "supporting", "rto": "1h", "probes": ["worker-heartbeat"]}
        playbooks["payments-switch"] = {
            "steps": [
                {
                    "name": "switch-provider",
                    "action": "http",
                    "with": {
                        "url": "http://hooks.sim/payments-switch",
                        "json": {"incident": "{{ incident_id }}"},
                    },
                }
            ],
            "approval": "auto",
            "cooldown": "30m",
        }
    if not s.playbook:
        del services["checkout"]["playbook"]
    if s.only_api:
        services = {"checkout": {**services["checkout"], "probes": ["checkout-api"]}}
    notifiers: dict[str, Any] = {
        "pagerduty": {
            "routing_key_env": "SIM_PD_ROUTING_KEY",
            "events_url": "http://events.pagerduty.sim/v2/enqueue",
        },
        "slack": {"webhook_url_env": "SIM_SLACK_URL"},
    }
    if s.comms:
        notifiers["email"] = {
            "host": "smtp.shop.sim",
            "from": "continuity@shop.sim",
            "to": {"internal": ["oncall@shop.sim"], "customers": ["status-subscribers@shop.sim"]},
            "timeout": "10s",
        }
        notifiers["statuspage"] = {
            "page_id": STATUSPAGE_PAGE,
            "api_key_env": "SIM_STATUSPAGE_KEY",
            "base_url": "http://api.statuspage.sim/v1",
            "components": {"checkout": "cmp-checkout", "catalog": "cmp-catalog"},
        }
    if s.failback:
        playbooks["region-failback"] = {"steps": back, "approval": "auto"}
        services["checkout"]["failback"] = {
            "playbook": "region-failback",
            "healthy_probes": ["eu-direct"],
            "healthy_for": "5m",
            "approval": "auto",
        }
    return Config.model_validate(
        {
            "services": services,
            "probes": probes,
            "detection": detection,
            "playbooks": playbooks,
            "notifiers": notifiers,
            "controller": {
                "tick": f"{s.tick:g}s",
                "max_runs_per_hour": 6,
                "api_token_env": "SIM_API_TOKEN",
                # The API's per-source limit runs on the wall clock (time.monotonic), not the
                # controller's: a second of wall time holds minutes of simulated pushes. Out of reach
                # here, so a replay stays exact.
                "push_burst": 1_000_000,
            },
        }
    )


# ====================================================================== random scenarios

FAULT_WEIGHTS = {
    "refused": 3,
    "hang": 3,
    "http5xx": 3,
    "step": 2,
    "slow": 2,
    "flaky": 3,
    "emfile": 1,
    "resolver": 1,
    "isolation": 1,
    "vantage": 1,
}


def generate(seed: int, *, duration: float | None = None) -> Scenario:
    """A random scenario from a seed: a few faults and events, then a quiet end to settle."""
    rng = random.Random(seed)
    dur = duration or (700.0 if seed % 40 == 3 else 1000.0)
    s = Scenario(
        seed=seed,
        duration=dur,
        store="kube" if seed % 40 == 3 else "sqlite",
        replicas=2 if rng.random() < 0.15 else 1,
        references=rng.random() < 0.5,
        agents=rng.random() < 0.1,
        failback=rng.random() < 0.5,
        db_step=rng.random() < 0.4,
        http_step=rng.random() < 0.3,
    )
    last = dur - SETTLE
    kinds = [k for k in FAULT_WEIGHTS if (k != "isolation" or s.references) and (k != "vantage" or s.agents)]
    weights = [FAULT_WEIGHTS[k] for k in kinds]
    for _ in range(rng.randint(1, 4)):
        kind = rng.choices(kinds, weights)[0]
        start = rng.uniform(120.0, last - 60.0)
        length = rng.uniform(15.0, 60.0) if rng.random() < 0.3 else rng.uniform(120.0, 350.0)
        end = min(start + length, last)
        region = "us" if rng.random() < 0.2 else "eu"
        if kind in ("emfile", "resolver", "isolation"):
            s.faults.append(Fault(kind, start, end))
        elif kind == "vantage":
            s.faults.append(Fault(kind, start, end, step=rng.choice(("agent-a", "agent-b"))))
        elif kind == "flaky":  # long enough, often, for the intermittent window to judge it
            end = min(start + rng.uniform(200.0, 450.0), last)
            s.faults.append(Fault(kind, start, end, region, rate=rng.choice((0.05, 0.2, 0.35, 0.6))))
        elif kind == "step":
            s.faults.append(Fault(kind, start, end, region, step=rng.choice(("cart", "pay"))))
        elif kind == "slow":
            s.faults.append(Fault(kind, start, end, region, latency=rng.choice((1.5, 2.5))))  # < timeout
        else:
            s.faults.append(Fault(kind, start, end, region))

    def window(lo: float, hi: float) -> tuple[float, float]:
        at = rng.uniform(60.0, last - hi)
        return at, at + rng.uniform(lo, hi)

    if rng.random() < 0.3:
        at = rng.uniform(60.0, last)
        s.events.append(Event("crash", at, value=rng.uniform(2.0, 60.0), target="A"))
    if s.replicas == 2 and rng.random() < 0.7:
        for _ in range(rng.randint(1, 2)):
            s.events.append(Event("leader_change", rng.uniform(60.0, last), value=rng.uniform(1.0, 15.0)))
    if rng.random() < 0.3:
        a, b = window(5.0, 40.0)
        s.events.append(Event("store_error", a, b))
    if rng.random() < 0.4:
        a, b = window(30.0, 400.0)
        s.events.append(Event("receiver_down", a, b, target=rng.choice(("pagerduty", "slack"))))
    if rng.random() < 0.4:
        a, b = window(60.0, 400.0)
        mode = rng.choice(("throttle", "fail", "slow", "timeout_after"))
        s.events.append(
            Event("aws", a, b, target=mode, value=rng.uniform(5.0, 40.0) if mode == "slow" else 0.0)
        )
    if s.http_step and rng.random() < 0.5:
        a, b = window(60.0, 400.0)
        s.events.append(Event("hook_slow", a, b, value=rng.choice((2.0, 8.0, 45.0))))
    if rng.random() < 0.1:
        s.events.append(Event("loop_stall", rng.uniform(60.0, last), value=rng.uniform(1.0, 8.0)))
    _extend(s, random.Random(seed * 7_919 + 11), last)
    return s


def _extend(s: Scenario, rng: random.Random, last: float) -> None:
    """Pushed inputs, approvals, more channels and the real Lease elector, drawn from a second
    random stream so the faults and events above stay what they were for every seed."""
    s.pushes = rng.random() < 0.3
    s.comms = rng.random() < 0.3
    if rng.random() < 0.25:
        s.approval = rng.choice(("approve", "reject", "never"))
    s.lease = s.replicas == 2 and rng.random() < 0.6

    def window(lo: float, hi: float) -> tuple[float, float]:
        at = rng.uniform(60.0, last - hi)
        return at, at + rng.uniform(lo, hi)

    if s.pushes:
        if rng.random() < 0.6:
            a, b = window(60.0, 300.0)
            s.faults.append(Fault("payments_down", a, b))
        if rng.random() < 0.5:
            a, b = window(60.0, 300.0)
            s.faults.append(Fault("worker_down", a, b))
        for _ in range(rng.randint(1, 2)):
            a, b = window(60.0, 400.0)
            s.events.append(Event("forged_push", a, b))
        if s.agents and rng.random() < 0.7:
            a, b = window(60.0, 300.0)
            skew = rng.choice((-600.0, -200.0, 120.0, 900.0))  # stale, stale, future, far future
            s.events.append(Event("agent_skew", a, b, target=rng.choice(("agent-a", "agent-b")), value=skew))
    if s.comms:
        if rng.random() < 0.4:
            a, b = window(30.0, 300.0)
            s.events.append(Event("receiver_down", a, b, target=rng.choice(("email", "statuspage"))))
        if rng.random() < 0.3:
            a, b = window(30.0, 200.0)
            s.events.append(
                Event("receiver_slow", a, b, target=rng.choice(("email", "statuspage")), value=4.0)
            )
        if rng.random() < 0.3:
            a, b = window(30.0, 200.0)
            s.events.append(Event("smtp_451", a, b))


def with_checks(s: Scenario, *checks: str) -> Scenario:
    return replace(s, checks=tuple(checks))
