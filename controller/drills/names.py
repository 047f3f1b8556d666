"""The built-in drill scenarios by name, with the right outcome of each (no imports: config.py reads it)."""

from __future__ import annotations

SCENARIOS: dict[str, str] = {
    "region-lost": "failover",
    "database-lost": "failover",
    "payment-down": "page_only",
    "slow-degradation": "page_only",
    "flapping-network": "no_failover",
    "controller-cut-off": "no_failover",
    "second-outage": "failover",
    "killed-mid-failover": "failover",
}
"""Scenario name -> expected outcome: failover, no_failover or page_only."""
