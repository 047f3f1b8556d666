"""`continuity report ID`: the post-incident report, written from the timeline.

The timeline is the single source of truth (DESIGN.md), so the report only reads: the incident,
its timeline, its playbook runs and the outbox. It writes Markdown (for the wiki or a pull
request), HTML (for a browser) and a PNG chart of probe health with the key events marked, and
leaves headed, empty sections for what only humans know: root cause, lessons, action items.
"""

from __future__ import annotations

import html
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.config import Config
from controller.durations import format_duration
from controller.notify.common import human_time
from controller.stores import Event, Incident, Store


class ReportError(Exception):
    """No such incident, or the report cannot be written."""


def _md(text: str) -> str:
    """Text from incidents (titles, messages, reasons) as Markdown shows it: no raw HTML, since
    Markdown renderers pass it through and incident text can come from outside. Every tag, comment
    or processing instruction starts with `<`, so escaping it is enough; `->` stays readable."""
    return text.replace("<", "&lt;")


@dataclass
class Doc:
    """Writes Markdown and HTML side by side from the same calls, so the two never disagree."""

    md: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {_md(text)}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(_md(text) + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def bullets(self, items: list[str]) -> None:
        self.md.append("\n".join(f"- {_md(i)}" for i in items) + "\n")
        self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def table(self, head: list[str], rows: list[list[str]]) -> None:
        def cell(v: str) -> str:
            return _md(v).replace("|", "\\|").replace("\n", " ")

        self.md.append(
            "| "
            + " | ".join(head)
            + " |\n|"
            + "---|" * len(head)
            + "\n"
            + "".join("| " + " | ".join(cell(c) for c in r) + " |\n" for r in rows)
        )
        self.html.append(
            "<table><thead><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</tbody></table>"
        )

    def image(self, src: str, alt: str) -> None:
        self.md.append(f"![{_md(alt)}]({src})\n")
        self.html.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" style="max-width:100%">')


def _d(seconds: float | None) -> str:
    return format_duration(max(seconds, 0.0)) if seconds is not None else "not recorded"


def _versus(took: float | None, target: float, name: str) -> str:
    if took is None:
        return "not recorded"
    verdict = "within" if took <= target else "OVER"
    return f"{format_duration(max(took, 0.0))} ({verdict} the {name} of {format_duration(target)})"


def measures(inc: Incident, events: list[Event], config: Config) -> dict[str, Any]:
    """The figures of the report, as data: tests and dashboards read them without parsing text."""
    comms = inc.data.get("comms") or {}
    svc = config.services.get(inc.service)
    rto = svc.rto if svc else float(inc.data.get("rto_s") or 0)
    rpo = svc.rpo if svc else float(inc.data.get("rpo_s") or 0)
    mitigated = next(
        (e.ts for e in events if e.kind == "playbook" and e.message.startswith("recovery done")), None
    )
    if mitigated is None:
        mitigated = next((u["at"] for u in comms.get("updates", []) if u.get("status") == "monitoring"), None)
    lag = [
        float(e.data[k])
        for e in events
        for k in ("replica_lag_s", "data_loss_s")
        if isinstance(e.data, dict) and isinstance(e.data.get(k), int | float)
    ]
    end = inc.resolved_at
    return {
        "detect_s": inc.opened_at - inc.started_at,
        "acknowledge_s": comms["acked_at"] - inc.opened_at if comms.get("acked_at") else None,
        "mitigate_s": mitigated - inc.started_at if mitigated is not None else None,
        "recover_s": end - inc.started_at if end is not None else None,
        "customer_minutes": round((end - inc.started_at) / 60, 1) if end is not None else None,
        "data_loss_s": max(lag) if lag else None,
        "rto_s": rto,
        "rpo_s": rpo,
    }


# matplotlib and what it pulls in (numpy, fonttools, pillow) are about 170 MB, a third of the image,
# for one picture: it is the optional `charts` extra, and a report without it says how to add it.
NO_CHART = "No chart: matplotlib is not installed (pip install 'continuity[charts]')."


def charts_available() -> bool:
    """Whether matplotlib can be imported, so the reports can draw their PNG chart."""
    return importlib.util.find_spec("matplotlib") is not None


def chart(inc: Incident, events: list[Event], path: Path) -> None:
    """Probe health over time (1 up, 0 down, one line per probe) with the key events marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a server or CI writes the PNG
    import matplotlib.pyplot as plt

    end = inc.resolved_at or max([e.ts for e in events] + [inc.opened_at])
    t0 = min([inc.started_at] + [e.ts for e in events]) - 60
    series: dict[str, list[tuple[float, int]]] = {}
    for e in events:
        if e.kind != "probe":
            continue
        probe = e.data.get("probe") if isinstance(e.data, dict) else None
        if not probe:
            continue
        if "first failed" in e.message or " is DOWN" in e.message:
            series.setdefault(probe, [(t0, 1)]).append((e.ts, 0))
        elif " is UP" in e.message:
            series.setdefault(probe, [(t0, 0)]).append((e.ts, 1))
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    for n, (probe, points) in enumerate(sorted(series.items())):
        ordered = sorted(points)
        points = [*ordered, (end + 60, ordered[-1][1])]
        xs = [(t - inc.started_at) / 60 for t, _ in points]
        ys = [v + n * 0.03 for _, v in points]
        ax.step(xs, ys, where="post", label=probe)
    marks = [("opened", inc.opened_at)]
    comms = inc.data.get("comms") or {}
    if comms.get("acked_at"):
        marks.append(("acknowledged", comms["acked_at"]))
    marks += [("recovered", e.ts) for e in events if e.kind == "playbook" and "recovery done" in e.message]
    if inc.resolved_at:
        marks.append(("resolved", inc.resolved_at))
    for n, (label, ts) in enumerate(sorted(marks, key=lambda m: m[1])):
        x = (ts - inc.started_at) / 60
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        # Staggered heights: events seconds apart would otherwise print over each other.
        ax.text(x, 1.08 + 0.08 * (n % 3), label, fontsize=7, ha="left", va="bottom")
    ax.set_ylim(-0.15, 1.35)
    ax.set_yticks([0, 1], ["down", "up"])
    ax.set_xlabel("minutes since the outage began")
    ax.set_title(f"{inc.id}: {inc.service}", fontsize=9, loc="left")
    if series:
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_report(store: Store, config: Config, incident_id: str, out: Path) -> list[Path]:
    inc = store.get_incident(incident_id)
    if inc is None:
        raise ReportError(f"no incident {incident_id!r}")
    events = store.timeline(inc.id)
    m = measures(inc, events, config)
    comms = inc.data.get("comms") or {}
    roles = comms.get("roles") or {}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"{out}: cannot create the directory: {exc.strerror or exc}") from None
    png = out / f"{inc.id}.png" if charts_available() else None
    if png is not None:
        chart(inc, events, png)

    doc = Doc()
    doc.heading(f"Post-incident report: {inc.id}", 1)
    doc.heading("Summary")
    doc.para(inc.title)
    doc.bullets(
        [
            f"Service: {inc.service}",
            f"Severity: {inc.severity}",
            f"Status: {inc.status}",
            f"Outage began: {human_time(inc.started_at)}; incident opened: {human_time(inc.opened_at)}; "
            f"resolved: {human_time(inc.resolved_at) if inc.resolved_at else 'not yet'}",
            f"Incident commander: {roles.get('incident_commander') or 'unassigned'}; communications lead: "
            f"{roles.get('communications_lead') or 'unassigned'}; technical owners: "
            f"{', '.join(roles.get('technical_owners') or []) or 'unassigned'}",
        ]
    )
    if png is not None:
        doc.image(png.name, "probe health over the incident, key events marked")
    else:
        doc.para(NO_CHART)
    doc.heading("Impact")
    doc.bullets(
        [
            f"Services affected: {inc.service}",
            f"Severity: {inc.severity}",
            f"Duration: {_d(m['recover_s'])}",
            "Customer-facing minutes: "
            + (f"{m['customer_minutes']}" if m["customer_minutes"] is not None else "not yet known"),
        ]
    )
    doc.heading("Response times")
    doc.table(
        ["Measure", "Time", "Against"],
        [
            ["Time to detect", _d(m["detect_s"]), "outage start to incident opened"],
            ["Time to acknowledge", _d(m["acknowledge_s"]), "incident opened to a human's ack"],
            ["Time to mitigate", _versus(m["mitigate_s"], m["rto_s"], "RTO"), "outage start to recovery"],
            ["Time to recover", _versus(m["recover_s"], m["rto_s"], "RTO"), "outage start to resolution"],
            [
                "Data-loss window",
                _versus(m["data_loss_s"], m["rpo_s"], "RPO")
                if m["data_loss_s"] is not None
                else f"not measured (no replica lag recorded); RPO {format_duration(m['rpo_s'])}",
                "replication lag at failover",
            ],
        ],
    )
    doc.heading("Timeline")
    doc.table(
        ["Time (UTC)", "Kind", "What happened"], [[human_time(e.ts), e.kind, e.message] for e in events]
    )
    doc.heading("Playbook steps")
    rows = []
    for run in store.runs(service=inc.service):
        if run.incident_id != inc.id:
            continue
        for s in store.steps(run.id):
            took = s.ended_at - s.started_at if s.started_at and s.ended_at else None
            rows.append([run.playbook, s.name, s.state, str(s.attempts), _d(took), s.detail or ""])
    if rows:
        doc.table(["Playbook", "Step", "State", "Attempts", "Took", "Detail"], rows)
    else:
        doc.para("No playbook ran for this incident.")
    doc.heading("Messages sent")
    audience = {
        e.data.get("key"): e.data.get("audience")
        for e in events
        if e.kind == "notification" and isinstance(e.data, dict) and e.data.get("audience")
    }
    recipients = config.notifiers.email.to if config.notifiers.email else None
    msgs = []
    for msg in store.outbox(include_delivered=True):
        if msg.incident_id != inc.id:
            continue
        who = audience.get(msg.key) or "on-call"
        if msg.channel == "email" and recipients is not None:
            who += ": " + ", ".join(getattr(recipients, str(msg.payload.get("audience")), []) or [])
        outcome = (
            f"delivered {human_time(msg.delivered_at)}"
            if msg.delivered_at
            else ("REFUSED: " + (msg.last_error or "") if msg.dead else "waiting: " + (msg.last_error or ""))
        )
        msgs.append([human_time(msg.created_at), msg.channel, who, msg.key.split("/")[-1], outcome])
    if msgs:
        doc.table(["Queued (UTC)", "Channel", "To", "Message", "Outcome"], msgs)
    else:
        doc.para("No messages were sent.")
    for title in ("Root cause", "Lessons learned", "Action items"):
        doc.heading(title)
        doc.para("_To be written by the incident team._")

    md_path, html_path = out / f"{inc.id}.md", out / f"{inc.id}.html"
    md_path.write_text("\n".join(doc.md), encoding="utf-8")
    html_path.write_text(
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(inc.id)}</title><style>body{{font-family:system-ui,sans-serif;max-width:60rem;"
        "margin:auto;padding:1rem}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem;"
        "text-align:left;vertical-align:top}</style></head><body>" + "".join(doc.html) + "</body></html>",
        encoding="utf-8",
    )
    return [md_path, html_path] if png is None else [md_path, html_path, png]
