"""Prometheus metrics, named the way blackbox_exporter users already read them, prefixed continuity_.

Each controller owns its registry so that several controllers (tests, the demo) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.probe_success = Gauge(
            "continuity_probe_success", "1 if the probe's last run passed.", ["probe", "vantage"], registry=r
        )
        self.probe_duration = Histogram(
            "continuity_probe_duration_seconds",
            "Probe run time.",
            ["probe", "vantage"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.service_state = Gauge(
            "continuity_service_state", "0 up, 1 degraded, 2 down, -1 unknown.", ["service"], registry=r
        )
        self.incidents_open = Gauge("continuity_incidents_open", "Open incidents.", ["severity"], registry=r)
        self.incidents_total = Counter(
            "continuity_incidents_total", "Incidents opened.", ["service", "severity"], registry=r
        )
        self.playbook_runs = Counter(
            "continuity_playbook_runs_total", "Playbook runs by outcome.", ["playbook", "outcome"], registry=r
        )
        self.step_duration = Histogram(
            "continuity_playbook_step_duration_seconds",
            "Playbook step time.",
            ["playbook", "step"],
            registry=r,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.outbox_depth = Gauge(
            "continuity_outbox_depth", "Messages waiting for delivery.", ["channel"], registry=r
        )
        self.notifications = Counter(
            "continuity_notifications_total",
            "Delivery attempts by outcome.",
            ["channel", "outcome"],
            registry=r,
        )
        self.last_tick = Gauge(
            "continuity_loop_last_tick_timestamp_seconds", "When the decision loop last ran.", registry=r
        )
        self.isolated = Gauge(
            "continuity_isolated",
            "1 while the controller is isolated (isolation_quorum reference targets down).",
            registry=r,
        )
        self.prober_errors = Counter(
            "continuity_prober_errors_total",
            "Probe runs that failed on the prober's side (emfile, resolver, loop_stall): UNKNOWN, no vote.",
            ["kind"],
            registry=r,
        )
        self.task_restarts = Counter(
            "continuity_task_restarts_total",
            "Background task failures recovered by restarting it (reconcile: a failed cycle).",
            ["task"],
            registry=r,
        )
        self.probe_flapping = Gauge(
            "continuity_probe_flapping", "1 while a probe flaps.", ["probe"], registry=r
        )
        self.silenced = Gauge(
            "continuity_silenced", "1 while a service is silenced or in maintenance.", ["service"], registry=r
        )
        self.paused = Gauge("continuity_paused", "1 while automatic actions are paused.", registry=r)
        self.failover_seconds = Histogram(
            "continuity_failover_seconds",
            "From incident opened to its playbook's success.",
            ["playbook"],
            registry=r,
            buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
        )
        self.reloads = Counter(
            "continuity_config_reloads_total",
            "Config reloads by outcome (applied, rejected).",
            ["outcome"],
            registry=r,
        )
        # continuity_leader{lock} is registered by controller.leader on this same registry.
