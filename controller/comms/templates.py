"""The words: one Jinja2 template per audience and event, overridable per deployment from files.

Defaults live in controller/templates/ as `{audience}_{event}.txt.j2`. A deployment points
`communications.templates_dir` at a directory holding files of the same names; each one found
replaces the default. Every override is compiled AND rendered against a sample incident at config
load, with undefined variables an error, so a typo is a config error (`FILE: path: message`) at
`continuity validate` time, never a crash in the middle of an incident. Should a template still
fail at render time, the default is used and the failure logged: a notice must go out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import structlog

from controller.comms.settings import AUDIENCES

log = structlog.get_logger("continuity.comms")

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "templates"
EVENTS: tuple[str, ...] = ("opened", "update", "resolved", "followup")
NAMES: tuple[str, ...] = tuple(f"{a}_{e}.txt.j2" for a in AUDIENCES for e in EVENTS)

SAMPLE: dict[str, Any] = {
    "incident": {
        "id": "INC-20260101-abcdef",
        "service": "checkout",
        "severity": "critical",
        "title": "checkout down: checkout-api: HTTP 503",
        "started_at": 1_767_225_600.0,
    },
    "service_name": "Checkout",
    "severity": "critical",
    "health": "down",
    "impact": "Customers cannot complete purchases.",
    "public_status": "identified",
    "status_words": "We have found the cause and are fixing it.",
    "message": "Traffic is moving to the standby region.",
    "automatic": False,
    "failing": ["checkout-api"],
    "reasons": {"checkout-api": "HTTP 503"},
    "playbook": "region-failover",
    "step": "switch-dns",
    "progress": "1 of 3 steps done",
    "workaround": "Orders placed in the app are kept and completed later.",
    "eta": "2026-01-01 00:20 UTC",
    "eta_moved": True,
    "previous_eta": "2026-01-01 00:15 UTC",
    "next_update": "2026-01-01 00:30 UTC",
    "duration": "12m",
    "started": "2026-01-01 00:00 UTC",
    "now": "2026-01-01 00:12 UTC",
    "rto": "15m",
    "rto_verdict": "within",
    "update_number": 2,
    "roles": {
        "incident_commander": "alice",
        "communications_lead": "bob",
        "technical_owners": ["payments-oncall"],
    },
}
"""Every variable a template may use, with a plausible value: the contract for override authors."""


def _env(loader: jinja2.BaseLoader, strict: bool) -> jinja2.Environment:
    return jinja2.Environment(
        loader=loader,
        autoescape=False,  # plain text; each channel escapes for its own markup
        undefined=jinja2.StrictUndefined if strict else jinja2.ChainableUndefined,
        keep_trailing_newline=False,
        trim_blocks=False,
    )


def check_dir(directory: str | Path) -> list[tuple[str, str, str]]:
    """Problems with an override directory as (file, config path, message); empty when all is well."""
    root = Path(directory)
    where = "communications.templates_dir"
    if not root.is_dir():
        return [(str(root), where, "expected a directory of *.j2 templates, found none")]
    problems: list[tuple[str, str, str]] = []
    env = _env(jinja2.FileSystemLoader(str(root)), strict=True)
    for path in sorted(root.glob("*.j2")):
        name = path.name
        if name not in NAMES:
            problems.append(
                (str(path), f"{where}.{name}", f"expected one of {', '.join(NAMES)}, found {name!r}")
            )
            continue
        try:
            env.get_template(name).render(**SAMPLE)
        except jinja2.TemplateSyntaxError as exc:
            problems.append(
                (
                    str(path),
                    f"{where}.{name}",
                    f"expected a valid Jinja2 template, found line {exc.lineno}: {exc.message}",
                )
            )
        except jinja2.UndefinedError as exc:
            problems.append(
                (str(path), f"{where}.{name}", f"expected only the documented variables, found {exc.message}")
            )
        except Exception as exc:  # a filter misused on a sample value: same class of mistake
            problems.append((str(path), f"{where}.{name}", f"expected a template that renders, found {exc}"))
    return problems


class Templates:
    """Renders `{audience}_{event}` with the deployment's override if any, else the default."""

    def __init__(self, directory: str | None = None) -> None:
        loaders: list[jinja2.BaseLoader] = []
        if directory:
            loaders.append(jinja2.FileSystemLoader(directory))
        loaders.append(jinja2.FileSystemLoader(str(DEFAULT_DIR)))
        self.env = _env(jinja2.ChoiceLoader(loaders), strict=False)
        self.defaults = _env(jinja2.FileSystemLoader(str(DEFAULT_DIR)), strict=False)

    def render(self, audience: str, event: str, context: dict[str, Any]) -> str:
        name = f"{audience}_{event}.txt.j2"
        try:
            text = self.env.get_template(name).render(**context)
        except Exception as exc:  # never let a template stop a notice going out
            log.error("template failed; using the default", template=name, error=str(exc))
            text = self.defaults.get_template(name).render(**context)
        return "\n".join(line.rstrip() for line in text.strip().splitlines() if line.strip())
