"""Probe kinds. Each module turns one probe config into a ProbeResult."""
