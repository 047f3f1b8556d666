"""`continuity plan`: the business-continuity plan, rendered from the config the controller runs.

Every figure comes from the loaded Config (and the drill results in the store), through the same
helpers the controller uses at run time (roles fall back to the owners exactly as the communicator
does; detection times from the same thresholds), so the document cannot drift from what runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from controller.comms.communicator import default_roles
from controller.comms.templates import DEFAULT_DIR
from controller.config import Config
from controller.drills.names import SCENARIOS
from controller.drills.report import latest
from controller.durations import format_duration
from controller.report import Doc
from controller.stores import Store

TIER_ORDER = {"critical": 0, "important": 1, "supporting": 2}
LIKELIHOOD = ["rare", "unlikely", "possible", "likely", "almost_certain"]
IMPACT = ["minor", "moderate", "major", "severe"]
EVENTS = ("opened", "update", "resolved", "followup")


def _d(seconds: float) -> str:
    return format_duration(seconds) if seconds else "0s"


def detection_time(cfg: Config, service: str) -> float:
    """Worst case from the first failure to the incident: the slowest probe's threshold x interval,
    plus its timeout, plus the confirmation burst."""
    burst = cfg.detection.confirm
    worst = 0.0
    for name in cfg.services[service].probes:
        p = cfg.probes[name]
        n, _ = cfg.thresholds(name)
        extra = burst.probes * (p.timeout + burst.spacing) if burst.probes else 0.0
        worst = max(worst, n * p.interval + p.timeout + extra)
    return worst


def resolve_time(cfg: Config, service: str) -> float:
    """From the fix to the incident's resolution: success_threshold x the slowest interval."""
    return max(cfg.thresholds(p)[1] * cfg.probes[p].interval for p in cfg.services[service].probes)


def playbook_time(cfg: Config, playbook: str) -> tuple[float, list[list[str]]]:
    """The longest a run may take (every attempt of every step to its timeout) and a row per step."""
    pb = cfg.playbooks[playbook]
    rows, total = [], 0.0
    for step in pb.steps:
        worst = step.timeout * (step.retries + 1)
        total += worst
        rows.append([playbook, step.name, step.action, _d(step.timeout), str(step.retries), _d(worst)])
    return total, rows


def render(cfg: Config, store: Store | None, source: str = "", now: float | None = None) -> Doc:
    now = time.time() if now is None else now
    doc = Doc()
    doc.heading("Business continuity plan", 1)
    doc.para(
        f"Rendered {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(now))} from "
        f"{source or 'the loaded config'}, the same configuration the Continuity controller runs: "
        "change the config, and this plan changes."
    )

    services = sorted(cfg.services.items(), key=lambda kv: (TIER_ORDER[kv[1].tier], kv[0]))
    doc.heading("1. Critical business functions")
    doc.table(
        ["Function", "What it does", "Tier", "RTO", "RPO", "Owners", "Recovery playbook", "Depends on"],
        [
            [
                s.display_name or name,
                s.description or "-",
                s.tier,
                _d(s.rto),
                _d(s.rpo),
                ", ".join(s.owners) or "-",
                s.playbook or "none (manual recovery)",
                ", ".join(s.depends_on) or "-",
            ]
            for name, s in services
        ],
    )

    drills = latest(store) if store is not None else {}
    doc.heading("2. Risk register")
    if cfg.risks:
        rows = []
        ranked = sorted(
            cfg.risks.items(),
            key=lambda kv: -(LIKELIHOOD.index(kv[1].likelihood) + 1) * (IMPACT.index(kv[1].impact) + 1),
        )
        for name, r in ranked:
            score = (LIKELIHOOD.index(r.likelihood) + 1) * (IMPACT.index(r.impact) + 1)
            last = drills.get(r.drill)
            rehearsed = (
                f"{r.drill}: {'passed' if last['passed'] else 'FAILED'} "
                f"{time.strftime('%Y-%m-%d', time.gmtime(last['at']))}"
                if last
                else f"{r.drill}: never rehearsed"
            )
            rows.append(
                [
                    name,
                    r.description,
                    r.likelihood.replace("_", " "),
                    r.impact,
                    f"{score}/20",
                    ", ".join(r.services) or "-",
                    r.mitigation or "-",
                    r.owner or "-",
                    rehearsed,
                ]
            )
        doc.table(
            [
                "Risk",
                "Scenario",
                "Likelihood",
                "Impact",
                "Rating",
                "Services",
                "Mitigation",
                "Owner",
                "Drill",
            ],
            rows,
        )
    else:
        doc.para("No risks are registered: add a `risks:` section to the config.")

    doc.heading("3. Roles and responsibilities")
    doc.table(
        ["Function", "Incident commander", "Communications lead", "Technical owners", "Escalation"],
        [
            [
                name,
                roles["incident_commander"] or "UNASSIGNED",
                roles["communications_lead"] or "UNASSIGNED",
                ", ".join(roles["technical_owners"]) or "UNASSIGNED",
                " -> ".join(s.roles.escalation) or "-",
            ]
            for name, s in services
            for roles in [default_roles(s)]
        ],
    )
    doc.para(
        "An unacknowledged critical incident goes to the next escalation contact after "
        f"{_d(cfg.communications.escalate_after)}."
    )

    doc.heading("4. Recovery phases")
    rows = []
    step_rows: list[list[str]] = []
    for name, s in services:
        detect = detection_time(cfg, name)
        cadence = (
            cfg.communications.cadence.critical
            if s.tier == "critical"
            else cfg.communications.cadence.moderate
        )
        if s.playbook:
            took, steps = playbook_time(cfg, s.playbook)
            step_rows += steps
            pb = cfg.playbooks[s.playbook]
            how = f"{s.playbook}: {len(pb.steps)} step(s), approval {pb.approval}, cooldown {_d(pb.cooldown)}"
        else:
            took, how = 0.0, "no playbook: the technical owners recover by hand"
        rows.append(
            [
                name,
                f"up to {_d(detect)}",
                f"up to {_d(took)} ({how})" if s.playbook else how,
                f"updates every {_d(cadence)}",
                f"{_d(resolve_time(cfg, name))} of passing probes",
                f"follow-up after {_d(cfg.communications.followup_after)}",
                _d(s.rto)
                + (" (EXCEEDED by detection + worst-case recovery)" if detect + took > s.rto else ""),
            ]
        )
    doc.para(
        "Immediate response: detection, incident opened, on-call paged. Technical recovery: the playbook. "
        "Business continuity: customers, colleagues and executives kept informed on a cadence. Full "
        "recovery and testing: probes must pass again before the incident resolves. Post-recovery "
        "review: the follow-up message and `continuity report` for the post-incident review."
    )
    doc.table(
        [
            "Function",
            "Immediate response",
            "Technical recovery",
            "Business continuity",
            "Full recovery and testing",
            "Post-recovery review",
            "RTO",
        ],
        rows,
    )
    if step_rows:
        doc.para("Playbook steps, with the longest each may take (timeout x attempts):")
        doc.table(["Playbook", "Step", "Action", "Timeout", "Retries", "At most"], step_rows)

    doc.heading("5. Communication plan")
    aud = cfg.communications.audiences
    n = cfg.notifiers
    channels = [["PagerDuty", "on-call responders", "every incident (trigger, resolve)"]]
    for ch, audience in (("slack", aud.slack), ("teams", aud.teams), ("webhook", aud.webhook)):
        if getattr(n, ch) is not None:
            channels.append([ch, audience, "opened, updates, resolved, follow-up"])
    if n.email is not None:
        channels.append(["email", ", ".join(aud.email), "opened, updates, resolved, follow-up"])
    if n.statuspage is not None:
        channels.append(["Statuspage", aud.statuspage, "opened, updates, resolved"])
    channels.append(["built-in /status page", "customers", "opened, updates, resolved"])
    if not cfg.communications.enabled:
        channels = channels[:1]
        doc.para("Communications are switched off (communications.enabled: false): only PagerDuty pages.")
    doc.table(["Channel", "Audience", "Messages"], channels)
    c = cfg.communications.cadence
    doc.table(
        ["Severity", "Public update at least every"],
        [["critical", _d(c.critical)], ["moderate", _d(c.moderate)], ["low", _d(c.low)]],
    )
    tdir = cfg.communications.templates_dir
    templates = []
    for audience in ("customers", "internal", "partners", "executives"):
        for event in EVENTS:
            name = f"{audience}_{event}.txt.j2"
            override = tdir is not None and (Path(tdir) / name).exists()
            templates.append(
                [audience, event, name, f"{tdir} (override)" if override else f"default ({DEFAULT_DIR})"]
            )
    doc.table(["Audience", "Event", "Template", "From"], templates)

    doc.heading("6. Testing: latest drill of each scenario")
    max_age = cfg.drills.max_age
    rows = []
    stale = 0
    for scenario, expected in SCENARIOS.items():
        last = drills.get(scenario)
        if last is None:
            rows.append([scenario, expected, "never", "-", "NOT TESTED"])
            stale += 1
            continue
        age = now - float(last["at"])
        flag = "STALE" if age > max_age else "current"
        stale += flag == "STALE"
        rows.append(
            [
                scenario,
                expected,
                time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last["at"])),
                ("passed" if last["passed"] else "FAILED: " + ", ".join(last.get("missed", [])))
                + f" ({last['mode']})",
                f"{flag} ({format_duration(age)} old)",
            ]
        )
    doc.para(
        f"A drill older than {format_duration(max_age)} (drills.max_age) is flagged STALE; "
        f"{stale} of {len(SCENARIOS)} scenario(s) need a drill. Run `continuity drill --all`."
    )
    doc.table(["Scenario", "Right outcome", "Last drill", "Result", "Freshness"], rows)
    return doc


def write_plan(cfg: Config, store: Store | None, out: Path, source: str = "") -> list[Path]:
    doc = render(cfg, store, source)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "continuity-plan.md", out / "continuity-plan.html"
    md.write_text("\n".join(doc.md), encoding="utf-8")
    page.write_text(
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>Business continuity plan</title><style>body{font-family:system-ui,sans-serif;max-width:70rem;"
        "margin:auto;padding:1rem}table{border-collapse:collapse;margin-bottom:1rem}"
        "td,th{border:1px solid #ccc;padding:.3rem;text-align:left;vertical-align:top}</style></head><body>"
        + "".join(doc.html)
        + "</body></html>",
        encoding="utf-8",
    )
    return [md, page]


def as_text(doc: Doc) -> str:
    return "\n".join(doc.md)
