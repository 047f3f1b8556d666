"""Drills: rehearse a disaster against the demo environment (or a staging config in dry run) and
score what the real controller did against the service's objectives.

`names` is imported by the config (a risk names the drill that rehearses it), so this package's
top level stays free of heavy imports; the runner lives in `controller.drills.runner`.
"""
