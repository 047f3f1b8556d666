"""The probe metrics are held as plain numbers (controller/metrics.py, ProbeSeries) to save some
3 KB a probe; what a scrape reads must be what prometheus_client's own Gauge and Histogram say."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import PROBE_BUCKETS, Metrics


def samples(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {
        (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("continuity_probe_success", "continuity_probe_duration_seconds"))
        and not s.name.endswith("_created")
    }


def test_the_exposition_is_prometheus_clients_own() -> None:
    ours = Metrics()
    reference = CollectorRegistry()
    gauge = Gauge("continuity_probe_success", "x", ["probe", "vantage"], registry=reference)
    name = "continuity_probe_duration_seconds"
    hist = Histogram(name, "x", ["probe", "vantage"], registry=reference, buckets=PROBE_BUCKETS)
    rng = random.Random(7)
    for _ in range(500):
        probe, vantage = rng.choice(["web", "api", "db"]), rng.choice(["local", "eu", "us"])
        ok, seconds = rng.random() < 0.8, rng.choice([0.005, 1.0, 10.0, 11.0, rng.expovariate(2.0)])
        ours.probes.record(probe, vantage, ok, seconds)
        gauge.labels(probe, vantage).set(1 if ok else 0)
        hist.labels(probe, vantage).observe(seconds)
    got, want = samples(generate_latest(ours.registry).decode()), samples(generate_latest(reference).decode())
    assert len(want) == 9 * (1 + len(PROBE_BUCKETS) + 3)  # gauge, buckets, +Inf, _count, _sum
    assert got == want
    web = {"probe": "web", "vantage": "eu"}
    assert ours.registry.get_sample_value("continuity_probe_success", web) in (0, 1)


def test_a_probe_removed_by_a_reload_leaves_the_scrape() -> None:
    m = Metrics()
    m.probes.record("web", "local", True, 0.01)
    m.probes.record("gone", "local", False, 3.0)
    m.probes.forget(["web"])
    text = generate_latest(m.registry).decode()
    assert 'probe="web"' in text and 'probe="gone"' not in text
    assert m.registry.get_sample_value("continuity_probe_success", {"probe": "web", "vantage": "local"}) == 1
    assert (
        m.registry.get_sample_value("continuity_probe_success", {"probe": "gone", "vantage": "local"}) is None
    )
