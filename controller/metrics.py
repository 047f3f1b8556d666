"""Prometheus metrics, named the way blackbox_exporter users already read them, prefixed continuity_.

Each controller owns its registry so that several controllers (tests, the demo) never collide.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

#: Upper bounds of continuity_probe_duration_seconds' buckets (+Inf is added).
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ProbeSeries:
    """`continuity_probe_success` and `continuity_probe_duration_seconds` per probe and vantage
    point, held as plain numbers and exported by one collector.

    prometheus_client's labelled children cost about 3.5 KB a probe (a lock and a value object for
    each of the histogram's 12 buckets, and the gauge's): some 70 MB at 20,000 probes, the largest
    part of the controller's memory (bench/scale.py). Here a probe is a list of 13 numbers. The
    exposition is the same: names, labels, cumulative buckets, `_count` and `_sum`. Written on the
    event loop's thread; a scrape copies the dict before reading it."""

    def __init__(self) -> None:
        self._success: dict[tuple[str, str], int] = {}
        self._duration: dict[tuple[str, str], list[float]] = {}

    def record(self, probe: str, vantage: str, ok: bool, seconds: float) -> None:
        key = (probe, vantage)
        self._success[key] = 1 if ok else 0
        counts = self._duration.get(key)
        if counts is None:
            counts = self._duration[key] = [0.0] * (len(PROBE_BUCKETS) + 2)  # buckets, +Inf, sum
        for i, bound in enumerate(PROBE_BUCKETS):
            if seconds <= bound:
                counts[i] += 1
        counts[-2] += 1
        counts[-1] += seconds

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the series of probes no longer configured (after a reload)."""
        kept = set(keep)
        for table in (self._success, self._duration):
            for key in [k for k in table if k[0] not in kept]:
                del table[key]

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "continuity_probe_success", "1 if the probe's last run passed.", labels=["probe", "vantage"]
        )
        for (probe, vantage), value in list(self._success.items()):
            gauge.add_metric([probe, vantage], value)
        yield gauge
        hist = HistogramMetricFamily(
            "continuity_probe_duration_seconds", "Probe run time.", labels=["probe", "vantage"]
        )
        bounds = [*(str(float(b)) for b in PROBE_BUCKETS), "+Inf"]
        for (probe, vantage), counts in list(self._duration.items()):
            values = list(counts)
            hist.add_metric(
                [probe, vantage], buckets=list(zip(bounds, values[:-1], strict=True)), sum_value=values[-1]
            )
        yield hist


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.probes = ProbeSeries()
        r.register(self.probes)
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
        self.heap_frozen = Gauge(
            "continuity_heap_frozen_objects",
            "Long-lived objects kept out of the garbage collector's full passes (frozen after start-up "
            "and after each reload: controller/heap.py).",
            registry=r,
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
        # Prometheus's own names for the same facts (prometheus_config_last_reload_successful), so
        # the chart's ContinuityConfigReloadFailing alert has a series that exists from the start.
        self.reload_failures = Counter(
            "continuity_config_reload_failures_total",
            "Config reloads refused (invalid file) or failed while being applied; the old config runs on.",
            registry=r,
        )
        self.reload_successes = Counter(
            "continuity_config_reload_successes_total", "Config reloads applied.", registry=r
        )
        self.reload_ok = Gauge(
            "continuity_config_last_reload_successful",
            "1 if the last reload attempt was applied (or none was made yet), 0 if it failed.",
            registry=r,
        )
        self.reload_ok.set(1)
        self.insecure_pushes = Gauge(
            "continuity_insecure_unauthenticated_pushes",
            "1 while Alertmanager webhooks and heartbeats are accepted without a credential.",
            registry=r,
        )
        self.pushes_refused = Counter(
            "continuity_pushes_refused_total",
            "Pushed inputs refused before use, by endpoint and reason (auth, rate).",
            ["endpoint", "reason"],
            registry=r,
        )
        self.pushed_dropped = Counter(
            "continuity_pushed_dropped_total",
            "Pushed signals accepted on the wire but not kept because a bound was reached.",
            ["kind"],
            registry=r,
        )
        self.agent_results = Counter(
            "continuity_agent_results_total",
            "Results pushed by agents, by outcome (accepted, clamped, future, stale, unknown, vantages).",
            ["outcome"],
            registry=r,
        )
        self.api_connections = Gauge(
            "continuity_api_connections", "Open connections to the HTTP API.", registry=r
        )
        self.api_connections_refused = Counter(
            "continuity_api_connections_refused_total",
            "API connections answered 503 and closed (over the cap) or closed (no request head in time).",
            ["reason"],
            registry=r,
        )
        # continuity_leader{lock} is registered by controller.leader on this same registry.
        self._exported: dict[tuple[int, str], float] = {}

    def set_labelled(self, gauge: Gauge, label: str, value: float) -> None:
        """`gauge.labels(label).set(value)`, skipped when it was last set here to that value: a tick
        sets one per service (400 at 2,000 probes), and `labels()` takes a lock and builds a key each
        time. Gauges set this way must only be set this way."""
        key = (id(gauge), label)
        if self._exported.get(key) != value:
            gauge.labels(label).set(value)
            self._exported[key] = value
