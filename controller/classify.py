"""Classification: service health -> incident severity. Pure; the rules are config data."""

from __future__ import annotations

from controller.config import Classification
from controller.detect import ServiceHealth, ServiceState

SEVERITY_RANK = {"low": 0, "moderate": 1, "critical": 2}


def severity(tier: str, health: ServiceHealth, rules: Classification) -> str | None:
    """The severity an incident for this service should have now, or None when there is nothing wrong."""
    rule = getattr(rules, tier)
    if health.state is ServiceState.DOWN:
        return rule.down
    if health.state is ServiceState.DEGRADED:
        return rule.degraded
    return None


def higher(a: str, b: str) -> str:
    return a if SEVERITY_RANK[a] >= SEVERITY_RANK[b] else b
