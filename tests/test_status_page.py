"""The built-in status page and the human doors: escaping, a real browser at phone and desktop
widths, the Atom feed and banner, write calls refused without the token, and the CLI."""

from __future__ import annotations

import asyncio
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import aiohttp
import pytest

from controller.api import app
from controller.cli import main
from controller.notify.receivers import serve
from controller.statuspage_site import render_html, snapshot
from tests.comms_env import FakeClock, controller, cycle, feed, load, receivers, write_config

EVIL = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">'
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def _open_incident(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, r):  # type: ignore[no-untyped-def]
    from controller.comms import commands

    cfg = load(write_config(tmp_path, r))
    clock = FakeClock()
    ctrl = controller(cfg, clock)
    feed(ctrl, False, clock)
    await cycle(ctrl)
    await cycle(ctrl)  # the playbook's success is observed: monitoring
    inc = ctrl.store.list_incidents(status="open")[0]
    commands.update(ctrl.store, inc.id, "alice", "identified", f"Card payments fail. {EVIL}", "45m")
    await cycle(ctrl)
    return ctrl, inc, clock


def test_status_page_escapes_incident_text_and_renders_in_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    playwright = pytest.importorskip("playwright.async_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)")

    async def main_() -> None:
        async with receivers(tmp_path, monkeypatch) as r:
            ctrl, inc, _ = await _open_incident(tmp_path, monkeypatch, r)
            page_html = render_html(snapshot(ctrl))
            assert "<script" not in page_html and "onerror=" not in page_html.replace("onerror=&#34;", "")
            assert "&lt;script&gt;" in page_html
            snap = snapshot(ctrl)
            eta = snap["open"][0]["eta"]
            assert eta and snap["open"][0]["public_status"] == "identified"
            async with serve(app(ctrl)) as base, playwright.async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                try:
                    for width in (390, 1280):
                        page = await browser.new_page(viewport={"width": width, "height": 900})
                        await page.goto(f"{base}/status")
                        card = page.locator(f"#incident-{inc.id}")
                        assert await card.is_visible()
                        latest = card.locator(".latest-update")
                        assert await latest.is_visible()
                        text = await latest.inner_text()
                        assert "Card payments fail." in text and "<script>window.__pwned = 1</script>" in text
                        assert await card.locator(".eta-value").inner_text() == eta
                        assert await card.locator(".eta-value").is_visible()
                        assert await page.evaluate("window.__pwned === undefined")
                        assert await page.evaluate("document.querySelectorAll('script, img').length") == 0
                        # Readable on a phone: nothing wider than the screen.
                        assert await page.evaluate("document.documentElement.scrollWidth") <= width
                        await page.close()
                finally:
                    await browser.close()
            ctrl.store.close()

    asyncio.run(main_())


def test_feed_banner_json_and_writes_refused_without_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTINUITY_API_TOKEN", "s3cret")

    async def main_() -> None:
        async with receivers(tmp_path, monkeypatch) as r:
            ctrl, inc, _ = await _open_incident(tmp_path, monkeypatch, r)
            async with serve(app(ctrl)) as base, aiohttp.ClientSession() as s:
                async with s.get(f"{base}/status.atom") as resp:
                    feed_xml = await resp.text()
                root = ET.fromstring(feed_xml)  # well-formed despite the markup in the message
                ns = {"a": "http://www.w3.org/2005/Atom"}
                contents = [c.text or "" for c in root.findall("a:entry/a:content", ns)]
                assert any(EVIL in c for c in contents)  # carried as text, escaped on the wire
                assert "<script>" not in feed_xml
                async with s.get(f"{base}/status.json") as resp:
                    body = await resp.json()
                assert body["open"][0]["id"] == inc.id and body["open"][0]["eta"]
                assert body["services"][0]["state"] == "outage"
                async with s.get(f"{base}/status/banner.js") as resp:
                    js = await resp.text()
                assert "textContent" in js and "innerHTML" not in js
                url = f"{base}/incidents/{inc.id}/update"
                payload = {"status": "monitoring", "message": "Fixed, watching.", "eta": "10m"}
                async with s.post(url, json=payload) as resp:
                    assert resp.status == 401
                async with s.post(url, json=payload, headers={"Authorization": "Bearer wrong"}) as resp:
                    assert resp.status == 401
                assert ctrl.store.flags("comms:request:") == {}  # nothing was written
                auth = {"Authorization": "Bearer s3cret"}
                async with s.post(url, json={**payload, "status": "bogus"}, headers=auth) as resp:
                    assert resp.status == 409
                async with s.post(url, json={**payload, "by": "erin"}, headers=auth) as resp:
                    assert resp.status == 200
                for verb, extra in (("ack", {}), ("assign", {"ic": "frank"})):
                    async with s.post(f"{base}/incidents/{inc.id}/{verb}", json=extra) as resp:
                        assert resp.status == 401
                    async with s.post(f"{base}/incidents/{inc.id}/{verb}", json=extra, headers=auth) as resp:
                        assert resp.status == 200
            await cycle(ctrl)
            comms = ctrl.store.get_incident(inc.id).data["comms"]
            assert comms["public_status"] == "monitoring" and comms["acked_at"] is not None
            assert comms["roles"]["incident_commander"] == "frank"
            assert comms["updates"][-1]["by"] == "erin"
            ctrl.store.close()

    asyncio.run(main_())


def test_cli_incident_commands_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def main_() -> None:
        async with receivers(tmp_path, monkeypatch) as r:
            ctrl, inc, _ = await _open_incident(tmp_path, monkeypatch, r)
            cfg_path = str(tmp_path / "continuity.yaml")
            assert main(["incident", "ack", inc.id, "-c", cfg_path, "--by", "alice"]) == 0
            assert main(["incident", "assign", inc.id, "-c", cfg_path, "--ic", "bob"]) == 0
            assert (
                main(
                    [
                        "incident",
                        "update",
                        inc.id,
                        "-c",
                        cfg_path,
                        "--status",
                        "monitoring",
                        "--message",
                        "Watching.",
                        "--eta",
                        "soon",
                    ]
                )
                == 1
            )  # a bad ETA is refused
            assert (
                main(["incident", "update", inc.id, "-c", cfg_path, "--message", "Watching.", "--eta", "20m"])
                == 0
            )
            assert main(["incident", "resolve", inc.id, "-c", cfg_path, "--message", "All good."]) == 0
            # Requests apply in order: the communicator applies the ack, hand-over and update, then
            # the resolve is decide's (the next reconcile, kicked at once in a running controller).
            await cycle(ctrl)
            assert ctrl.store.get_incident(inc.id).status == "open"  # type: ignore[union-attr]
            await cycle(ctrl)
            done = ctrl.store.get_incident(inc.id)
            assert done.status == "resolved" and done.data["comms"]["roles"]["incident_commander"] == "bob"
            assert [e["event_action"] for e in r.pd.events] == ["trigger", "acknowledge", "resolve"]
            assert main(["incident", "ack", inc.id, "-c", cfg_path]) == 1  # resolved: nothing to ack
            out = tmp_path / "rep"
            assert main(["report", inc.id, "-c", cfg_path, "--out", str(out)]) == 0
            assert (out / f"{inc.id}.md").exists() and (out / f"{inc.id}.png").exists()
            assert main(["report", "INC-nope", "-c", cfg_path, "--out", str(out)]) == 1
            ctrl.store.close()

    asyncio.run(main_())
    assert "acknowledged by alice" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "rep", ignore_errors=True)
