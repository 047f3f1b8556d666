"""Incident communications end to end: an incident from opening to report, every channel checked by
its validating receiver, in simulated time; restarts, outages, 429s; the pure rules; templates."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from controller.comms import commands
from controller.comms import lifecycle as lc
from controller.comms.settings import Cadence
from controller.config import ConfigError
from controller.report import write_report
from controller.stores import SQLiteStore
from tests.comms_env import (
    FakeClock,
    controller,
    cycle,
    feed,
    load,
    pd_actions,
    receivers,
    slack_heads,
    write_config,
)

# ------------------------------------------------------------------------------------ pure rules


def test_eta_from_remaining_steps_else_rto_else_unknown() -> None:
    now, start = 10_000.0, 9_940.0
    steps = [
        lc.StepView("drain", "done", 240),
        lc.StepView("switch", "running", 180, started_at=now - 60),
        lc.StepView("verify", "pending", 120),
    ]
    left = lc.remaining(steps, now)
    assert left == 240  # 120 left of the running step + 120 pending
    assert lc.estimate_eta(left, 900, start, now) == (10_260.0, "playbook")  # rounded up to the minute
    assert lc.estimate_eta(None, 900, start, now) == (10_860.0, "rto")  # start + RTO, still ahead
    assert lc.estimate_eta(None, 30, start, now) == (None, "unknown")  # RTO already passed
    assert lc.remaining([lc.StepView("a", "done", 5)], now) is None
    assert lc.measured([("a", 0, 10), ("a", 0, 30), ("a", 5, None), ("b", 0, 4)]) == {"a": 20, "b": 4}


def test_eta_moves_cadence_status_and_escalation() -> None:
    assert not lc.eta_moved(None, 100.0)  # a first estimate is not a move
    assert lc.eta_moved(100.0, 220.0) and lc.eta_moved(100.0, None) and not lc.eta_moved(100.0, 130.0)
    cad = Cadence()
    assert lc.next_update_at("critical", 0, cad) == 1800 and lc.next_update_at("moderate", 0, cad) == 3600
    assert not lc.update_due("critical", 0, 1799, cad) and lc.update_due("critical", 0, 1800, cad)
    assert lc.advance("monitoring", "identified") == "monitoring"  # never backwards on its own
    assert lc.advance("investigating", "identified") == "identified"
    assert lc.escalation_level("critical", False, 0, 599, 600, 2, 0) == 0
    assert lc.escalation_level("critical", False, 0, 1300, 600, 2, 0) == 2
    assert lc.escalation_level("critical", False, 0, 99_999, 600, 2, 0) == 2  # never past the list
    assert lc.escalation_level("critical", True, 0, 1300, 600, 2, 0) == 0  # acknowledged: stays
    assert lc.escalation_level("moderate", False, 0, 1300, 600, 2, 0) == 0


def test_template_with_an_error_is_a_config_error_at_load(tmp_path: Path) -> None:
    tdir = tmp_path / "tpl"
    tdir.mkdir()
    (tdir / "customers_update.txt.j2").write_text("ok\n{% if eta %}by {{ eta }\n", encoding="utf-8")
    (tdir / "internal_opened.txt.j2").write_text("{{ no_such_variable }}", encoding="utf-8")
    (tdir / "custmers_opened.txt.j2").write_text("typo in the name", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "services: {s: {tier: critical, rto: 5m, probes: [p]}}\n"
        "probes: {p: {kind: http, url: 'http://127.0.0.1:9/'}}\n"
        "communications: {templates_dir: tpl}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load(cfg)
    problems = err.value.problems
    assert any(
        p.startswith(
            f"{tdir / 'customers_update.txt.j2'}: communications.templates_dir.customers_update.txt.j2: "
            "expected a valid Jinja2 template, found line 2"
        )
        for p in problems
    ), problems
    assert any("internal_opened.txt.j2" in p and "no_such_variable" in p for p in problems), problems
    assert any("custmers_opened.txt.j2" in p and "expected one of" in p for p in problems), problems


# ------------------------------------------------------------------------------------ end to end


def test_incident_from_opening_to_report_on_every_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with receivers(tmp_path, monkeypatch) as r:
            cfg = load(write_config(tmp_path, r))
            clock = FakeClock()
            ctrl = controller(cfg, clock)
            feed(ctrl, False, clock)  # two failures: DOWN
            await cycle(ctrl)  # opens the incident, starts the playbook, sends the notices
            inc = ctrl.store.list_incidents(status="open")[0]
            comms = inc.data["comms"]
            assert comms["roles"]["incident_commander"] == "alice"
            assert comms["eta_basis"] == "playbook"  # 4m + 3m of steps not yet run
            # The playbook finished (identified -> monitoring); the next cycle says so.
            await cycle(ctrl)
            assert ctrl.store.get_incident(inc.id).data["comms"]["public_status"] == "monitoring"

            commands.ack(ctrl.store, inc.id, "alice")
            commands.update(
                ctrl.store, inc.id, "alice", "monitoring", "Payments work again in the standby region.", "45m"
            )
            clock.advance(5)
            await cycle(ctrl)
            comms = ctrl.store.get_incident(inc.id).data["comms"]
            assert comms["acked_by"] == "alice" and comms["eta_basis"] == "human"

            # Nobody posts for 30 minutes (critical cadence): an automatic update and a reminder.
            clock.advance(29 * 60)
            await cycle(ctrl)
            assert not any("automatic" in h for h in slack_heads(r)[-1:])  # not yet due
            before = len(r.slack.accepted)
            clock.advance(61)
            await cycle(ctrl)
            new = r.slack.accepted[before:]
            assert len(new) == 2, [m["text"] for m in new]  # the update and the reminder to alice
            assert "automatic" in new[0]["blocks"][1]["text"]["text"]
            assert "alice: no update" in new[1]["blocks"][1]["text"]["text"]

            feed(ctrl, True, clock, n=1)  # probe UP: resolved
            await cycle(ctrl)
            done = ctrl.store.get_incident(inc.id)
            assert done.status == "resolved" and done.data["comms"]["resolved_sent"]
            clock.advance(3600)  # communications.followup_after: 1h
            await cycle(ctrl)
            assert "Post-incident review due" in r.slack.accepted[-1]["blocks"][1]["text"]["text"]
            await cycle(ctrl)
            assert sum("review due" in m["blocks"][1]["text"]["text"] for m in r.slack.accepted) == 1

            # PagerDuty: trigger, acknowledge, resolve, all with the stored dedup_key.
            actions = pd_actions(r)
            assert [a for a, _ in actions] == ["trigger", "acknowledge", "resolve"], actions
            assert {k for _, k in actions} == {inc.dedup_key}
            assert r.pd.rejected == []
            # Slack (internal): opened, updates, resolved, in order, all accepted by the Block Kit checks.
            heads = slack_heads(r)
            assert heads[0].startswith(":red_circle: Incident: checkout")
            assert heads[-2].startswith(":large_green_circle: Resolved")  # then the follow-up
            assert r.slack.rejected == [] and r.teams.rejected == []
            assert len(r.teams.accepted) == len(r.slack.accepted)
            # Statuspage (customers): one create, then PATCHes; ends resolved and operational.
            log = r.statuspage.log
            assert log[0][0] == "POST" and all(m == "PATCH" for m, _, _ in log[1:]) and len(log) >= 4
            assert [b["status"] for _, _, b in log] == [
                "investigating",
                "monitoring",
                "monitoring",
                "monitoring",
                "resolved",
            ]
            final = r.statuspage.incidents[log[0][1]]
            assert final["status"] == "resolved" and final["components"] == {"comp-checkout": "operational"}
            assert "checkout-api" not in json.dumps([b for _, _, b in log])  # no jargon for customers
            # Signed webhook (partners): verified, no duplicates, opened first and resolved last.
            events = [m["event"] for m in r.webhook.accepted]
            assert events[0] == "incident.opened" and events[-2:] == [
                "incident.resolved",
                "incident.followup",
            ]
            assert r.webhook.rejected == [] and r.webhook.duplicates == 0
            # Email over STARTTLS: each audience its own list and its own words.
            mails = r.smtp.messages
            assert all(m["tls"] for m in mails)
            by_to = {}
            for m in mails:
                by_to.setdefault(m["rcpt_tos"][0], []).append(m["message"])
            assert set(by_to) == {"customers@shop.example", "sre@shop.example", "cto@shop.example"}
            customer_text = by_to["customers@shop.example"][0].get_body(("plain",)).get_content()
            internal_text = by_to["sre@shop.example"][0].get_body(("plain",)).get_content()
            assert "Customers cannot pay" in customer_text and "checkout-api" not in customer_text
            assert "checkout-api" in internal_text and "IC: alice" in internal_text
            assert "Carts are kept" in customer_text  # what users can do meanwhile
            assert "Next update by" in customer_text
            # The human update carried its ETA; the moved ETA is said in words.
            human = by_to["customers@shop.example"][2].get_body(("plain",)).get_content()
            assert "Payments work again" in human and "(we said" in human
            # Nothing is left in the outbox.
            assert ctrl.store.outbox() == []
            # The report.
            paths = write_report(ctrl.store, cfg, inc.id, tmp_path / "report")
            md = paths[0].read_text()
            for section in (
                "## Impact",
                "Time to detect",
                "Time to acknowledge",
                "Time to recover",
                "within the RTO of 15m",
                "Data-loss window",
                "## Timeline",
                "## Playbook steps",
                "## Messages sent",
                "customers@shop.example",
                "## Root cause",
                "## Lessons learned",
                "## Action items",
            ):
                assert section in md, section
            assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 5000
            assert "<h2>Timeline</h2>" in paths[1].read_text()
            ctrl.store.close()

    asyncio.run(main())


def test_receivers_down_restart_then_back_every_message_once_and_429_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with receivers(tmp_path, monkeypatch) as r:
            cfg = load(write_config(tmp_path, r))
            clock = FakeClock()
            ctrl = controller(cfg, clock)
            r.slack.fail_with = r.webhook.fail_with = r.pd.fail_with = 503
            r.statuspage.fail_with, r.statuspage.retry_after = 429, 120
            feed(ctrl, False, clock)
            await cycle(ctrl)
            inc = ctrl.store.list_incidents(status="open")[0]
            commands.update(ctrl.store, inc.id, "alice", "identified", "We know why.")
            await cycle(ctrl)
            assert r.slack.accepted == [] and r.webhook.accepted == [] and r.pd.events == []
            waiting = {m.key for m in ctrl.store.outbox()}
            assert {f"{inc.id}/slack/internal/opened", f"{inc.id}/webhook/partners/update-1"} <= waiting
            sp = next(m for m in ctrl.store.outbox() if m.channel == "statuspage")
            assert sp.next_attempt_at >= clock() + 120  # Retry-After honoured, not our 5 s backoff
            sp_requests = r.statuspage.requests
            age = ctrl.metrics.registry.get_sample_value(
                "continuity_outbox_oldest_age_seconds", {"channel": "slack"}
            )
            assert age == 0.0  # measured at the tick; nothing had waited yet
            clock.advance(60)
            await ctrl.reconcile()
            assert (
                ctrl.metrics.registry.get_sample_value(
                    "continuity_outbox_oldest_age_seconds", {"channel": "slack"}
                )
                == 60.0
            )
            await ctrl.dispatcher.drain()
            assert r.statuspage.requests == sp_requests  # still inside Retry-After: not even tried

            # The controller restarts; the receivers come back.
            ctrl.store.close()
            ctrl2 = controller(cfg, clock, SQLiteStore(cfg.controller.data_dir))
            r.slack.fail_with = r.webhook.fail_with = r.pd.fail_with = r.statuspage.fail_with = None
            commands.ack(ctrl2.store, inc.id, "alice")  # acknowledged after the restart
            clock.advance(600)
            for _ in range(3):
                await cycle(ctrl2)
                clock.advance(300)
            assert ctrl2.store.outbox() == []
            keys = [m.key for m in ctrl2.store.outbox(include_delivered=True)]
            assert len(keys) == len(set(keys))
            # Exactly once on each receiver: as many accepted as queued for that channel.
            for name, got in (("slack", len(r.slack.accepted)), ("webhook", len(r.webhook.accepted))):
                assert got == sum(1 for k in keys if f"/{name}/" in k), name
            assert r.webhook.duplicates == 0
            assert [a for a, _ in pd_actions(r)] == ["trigger", "acknowledge"]
            assert {k for _, k in pd_actions(r)} == {inc.dedup_key}  # the stored key, after a restart
            ops = [m for m, _, _ in r.statuspage.log]
            assert ops[0] == "POST" and ops.count("POST") == 1
            ctrl2.store.close()

    asyncio.run(main())


def test_unacknowledged_critical_incident_escalates_to_the_next_contact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with receivers(tmp_path, monkeypatch) as r:
            cfg = load(write_config(tmp_path, r, "communications: {escalate_after: 10m}"))
            clock = FakeClock()
            ctrl = controller(cfg, clock)
            feed(ctrl, False, clock)
            await cycle(ctrl)
            inc = ctrl.store.list_incidents(status="open")[0]
            clock.advance(9 * 60)
            await cycle(ctrl)
            assert ctrl.store.get_incident(inc.id).data["comms"]["roles"]["incident_commander"] == "alice"
            clock.advance(61)
            await cycle(ctrl)
            assert ctrl.store.get_incident(inc.id).data["comms"]["roles"]["incident_commander"] == "bob"
            triggers = [e for e in r.pd.events if e["event_action"] == "trigger"]
            assert len(triggers) == 2 and "ESCALATED to bob" in triggers[1]["payload"]["summary"]
            assert any("ESCALATED to bob" in m["blocks"][1]["text"]["text"] for m in r.slack.accepted)
            commands.ack(ctrl.store, inc.id, "bob")
            commands.assign(ctrl.store, inc.id, "bob", "erin")
            clock.advance(30 * 60)
            await cycle(ctrl)
            comms = ctrl.store.get_incident(inc.id).data["comms"]
            assert comms["escalation_level"] == 1 and comms["roles"]["incident_commander"] == "erin"
            assert [e["event_action"] for e in r.pd.events].count("trigger") == 2  # acked: no more
            ctrl.store.close()

    asyncio.run(main())
