"""Continuity: the failover controller (config, detection, incidents, notifiers, CLI)."""
