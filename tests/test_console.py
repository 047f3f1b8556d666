"""The operator console (/console): who may see it, CSRF, escaping, and a responder's whole round in
Debian's Chromium at phone and desktop widths: sign in, approve the failover, acknowledge, post an
update with an ETA, watch the timeline live, resolve, pause and resume, silence.

Every button must take the CLI's durable path: each check reads the store (the flag or request
the CLI would have written) and then lets the controller apply it with a real cycle.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.api import app
from controller.notify.receivers import serve
from tests.comms_env import cycle
from tests.console_env import EVIL, TOKEN, World, world

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
SHOTS = os.environ.get("CONTINUITY_SCREENSHOTS_DIR")
"""Set to a directory (docs/) to keep the screenshots the README shows."""


def session() -> aiohttp.ClientSession:
    # 127.0.0.1 is an IP address: aiohttp's jar only keeps cookies for it when told it may.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def login(s: aiohttp.ClientSession, base: str, name: str = "alice", token: str = TOKEN) -> int:
    r = await s.post(f"{base}/console/login", data={"name": name, "token": token}, allow_redirects=False)
    return r.status


async def csrf_of(s: aiohttp.ClientSession, url: str) -> str:
    page = await (await s.get(url)).text()
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, page[:500]
    return found.group(1)


def test_console_needs_a_login_and_refuses_forged_posts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with world(tmp_path, monkeypatch) as w, serve(app(w.ctrl)) as base, session() as s:
            store = w.ctrl.store
            # Nothing without a login: pages redirect, actions are refused and change nothing.
            r = await s.get(f"{base}/console/incidents/{w.incident.id}", allow_redirects=False)
            assert r.status == 303 and r.headers["Location"].startswith("/console/login?next=%2Fconsole%2F")
            r = await s.post(f"{base}/console/pause", data={"csrf": "x"}, allow_redirects=False)
            assert r.status == 401 and store.get_flag("paused") is None
            r = await s.get(f"{base}/console/incidents/{w.incident.id}/events", allow_redirects=False)
            assert r.status == 303
            # A wrong token is refused; a right one signs in.
            assert await login(s, base, token="wrong") == 401
            assert await login(s, base, name="") == 401
            assert await login(s, base) == 303
            token = await csrf_of(s, f"{base}/console")
            # Forged: no CSRF token, a wrong one, or another origin.
            for data, headers in (
                ({}, {}),
                ({"csrf": "0" * 40}, {}),
                ({"csrf": token}, {"Origin": "https://evil.example"}),
            ):
                r = await s.post(f"{base}/console/pause", data=data, headers=headers, allow_redirects=False)
                assert r.status == 403, (data, headers)
            assert store.get_flag("paused") is None
            # The real form works and records who did it, like `continuity pause --by alice`.
            r = await s.post(
                f"{base}/console/pause",
                data={"csrf": token, "reason": "db migration", "next": "https://evil.example/"},
                allow_redirects=False,
            )
            assert r.status == 303 and r.headers["Location"] == "/console"  # never an open redirect
            assert (store.get_flag("paused") or "").startswith("by alice at ")
            # Another user's CSRF token is not this user's.
            async with session() as other:
                assert await login(other, base, name="mallory") == 303
                r = await other.post(f"{base}/console/resume", data={"csrf": token}, allow_redirects=False)
                assert r.status == 403
            # A bearer token works for scripts, with the same CSRF rule.
            auth = {"Authorization": f"Bearer {TOKEN}"}
            r = await s.get(f"{base}/console/playbooks", headers=auth)
            assert r.status == 200
            # A tampered session cookie is no session.
            async with session() as forged:
                forged.cookie_jar.update_cookies({"continuity_console": "Ym9i.9999999999.deadbeef"})
                r = await forged.get(f"{base}/console", allow_redirects=False)
                assert r.status == 303

    asyncio.run(main())


def test_console_behind_an_authenticating_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        extra = "inbound: {}\n"
        async with world(tmp_path, monkeypatch, extra) as w:
            w.ctrl.config.console.trusted_header = "X-Forwarded-Email"
            async with serve(app(w.ctrl)) as base, session() as s:
                hdr = {"X-Forwarded-Email": "oncall@shop.example"}
                page = await (await s.get(f"{base}/console", headers=hdr)).text()
                assert "oncall@shop.example" in page
                token = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)  # type: ignore[union-attr]
                r = await s.post(
                    f"{base}/console/runs/{w.run.id}/approve",
                    data={"csrf": token},
                    headers=hdr,
                    allow_redirects=False,
                )
                assert r.status == 303
                assert w.ctrl.store.get_flag(f"approval:{w.run.id}") == "approved by oncall@shop.example"
            # The header from a peer outside trusted_proxies is ignored.
            w.ctrl.config.console.trusted_proxies = ["10.0.0.0/8"]
            async with serve(app(w.ctrl)) as base, session() as s:
                r = await s.get(f"{base}/console", headers=hdr, allow_redirects=False)
                assert r.status == 303

    asyncio.run(main())


def test_console_is_off_without_a_token_or_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with world(tmp_path, monkeypatch) as w:
            monkeypatch.delenv("CONSOLE_TEST_TOKEN")
            async with serve(app(w.ctrl)) as base, session() as s:
                r = await s.get(f"{base}/console", allow_redirects=False)
                assert r.status == 403 and "The console is off: set CONSOLE_TEST_TOKEN" in await r.text()
                r = await s.post(
                    f"{base}/console/login", data={"name": "a", "token": ""}, allow_redirects=False
                )
                assert r.status == 401

    asyncio.run(main())


def _keep(path: Path) -> None:
    assert path.stat().st_size > 20_000
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        (Path(SHOTS) / path.name).write_bytes(path.read_bytes())


async def _shot(page: Any, name: str, tmp: Path, full: bool = True) -> None:
    path = tmp / f"{name}.png"
    await page.screenshot(path=str(path), full_page=full)
    _keep(path)


async def _round(w: World, base: str, browser: Any, width: int, tmp: Path) -> None:
    """One responder's round at one width; asserts the store after each button."""
    store, ctrl, tag = w.ctrl.store, w.ctrl, "phone" if width < 600 else "desktop"
    page = await browser.new_page(viewport={"width": width, "height": 900})
    page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await page.goto(f"{base}/console/incidents/{w.incident.id}")
    assert page.url.startswith(f"{base}/console/login")  # the login first, then back here
    await page.fill("input[name=name]", f"alice-{tag}")
    await page.fill("input[name=token]", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base}/console/incidents/{w.incident.id}")

    # The overview while the failover waits for a human.
    await page.goto(f"{base}/console")
    assert await page.locator(f"#run-{w.run.id} button.approve").is_visible()
    await _shot(page, f"console-approval-{tag}", tmp, full=width > 600)
    await page.goto(f"{base}/console/incidents/{w.incident.id}")

    # Approve the failover from the incident page: the CLI's flag, then a real cycle runs it.
    await page.click(f"#run-{w.run.id} button.approve")
    await page.wait_for_selector("#flash")
    assert f"approved by alice-{tag}" in await page.inner_text("#flash")
    assert store.get_flag(f"approval:{w.run.id}") == f"approved by alice-{tag}"
    await cycle(ctrl)
    await cycle(ctrl)
    assert store.get_run(w.run.id).state == "succeeded"  # type: ignore[union-attr]
    await page.reload()
    steps = page.locator(f"#run-{w.run.id} .step")
    assert await steps.count() == 3
    assert "done" in await steps.nth(0).inner_text()

    # Acknowledge: the request the CLI writes; the communicator applies it; the open page hears it live.
    await page.click("#ack")
    await page.wait_for_selector("#flash")
    await cycle(ctrl)
    await page.wait_for_selector(f"#timeline li:has-text('acknowledged by alice-{tag}')", timeout=10_000)
    assert await page.locator("#live").is_visible()

    # An update with an ETA, carrying hostile text: escaped on the page and in the live timeline.
    await page.select_option("#update select[name=status]", "identified")
    await page.fill("#update input[name=eta]", "45m")
    await page.fill("#update textarea[name=message]", f"Card payments fail. {EVIL}")
    await page.click("#update button[type=submit]")
    await page.wait_for_selector("#flash")
    assert "ETA in 45m00s" in await page.inner_text("#flash")
    await cycle(ctrl)
    entry = page.locator("#timeline li", has_text="Card payments fail.").first
    await entry.wait_for(timeout=10_000)
    assert "<script>window.__pwned = 1</script>" in await entry.inner_text()
    assert await page.evaluate("window.__pwned === undefined")
    assert await page.evaluate("document.querySelectorAll('main script, main img').length") == 0
    inc = store.get_incident(w.incident.id)
    assert inc is not None and inc.data["comms"]["public_status"] == "identified"
    assert inc.data["comms"]["eta"] is not None
    # Nothing wider than the screen.
    assert await page.evaluate("document.documentElement.scrollWidth") <= width
    await page.reload()
    await _shot(page, f"console-incident-{tag}", tmp, full=width > 600)

    # The overview: pause and resume, silence a service; then the playbooks' plans.
    await page.goto(f"{base}/console")
    assert await page.locator(f"#incident-{w.incident.id}").is_visible()
    await _shot(page, f"console-overview-{tag}", tmp)
    await page.click("#pause")
    await page.wait_for_selector("#resume")
    assert (store.get_flag("paused") or "").startswith(f"by alice-{tag}")
    await page.click("#resume")
    await page.wait_for_selector("#pause")
    assert store.get_flag("paused") is None
    await page.fill("#service-search input[name=duration]", "2h")
    await page.fill("#service-search input[name=reason]", "reindex")
    await page.click("#service-search button:has-text('Silence')")
    await page.wait_for_selector("#service-search button:has-text('Unsilence')")
    assert "reindex (by alice-" in (store.get_flag("silence:search") or "")
    await page.click("#service-search button:has-text('Unsilence')")
    await page.wait_for_selector("#service-search button:has-text('Silence')")
    assert store.get_flag("silence:search") is None
    assert await page.evaluate("document.documentElement.scrollWidth") <= width

    await page.goto(f"{base}/console/playbooks")
    card = page.locator("#playbook-dns-failover")
    assert "guard: probes UP: checkout-secondary" in await card.inner_text()
    assert "route53.change_resource_record_sets" in await card.inner_text()
    assert await page.evaluate("document.documentElement.scrollWidth") <= width
    await _shot(page, f"console-playbooks-{tag}", tmp)
    await page.close()


def test_a_responders_round_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    playwright = pytest.importorskip("playwright.async_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)")

    async def main() -> None:
        for width in (390, 1280):
            here = tmp_path / str(width)
            here.mkdir()
            async with world(here, monkeypatch) as w, serve(app(w.ctrl)) as base:
                async with playwright.async_playwright() as p:
                    browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                    try:
                        await _round(w, base, browser, width, here)
                    finally:
                        await browser.close()
                # Resolve last (from a plain session; the page test above covered the buttons).
                async with session() as s:
                    assert await login(s, base) == 303
                    url = f"{base}/console/incidents/{w.incident.id}"
                    token = await csrf_of(s, url)
                    r = await s.post(
                        f"{url}/resolve", data={"csrf": token, "message": "fixed"}, allow_redirects=False
                    )
                    assert r.status == 303
                    await cycle(w.ctrl)
                    inc = w.ctrl.store.get_incident(w.incident.id)
                    assert inc is not None and inc.status == "resolved"

    asyncio.run(main())


def test_the_timeline_stream_sends_new_entries_and_ends_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with world(tmp_path, monkeypatch) as w, session() as s:
            count = len(w.ctrl.store.timeline(w.incident.id))
            seen: list[dict[str, Any]] = []
            async with serve(app(w.ctrl)) as base:
                assert await login(s, base) == 303
                resp = await s.get(f"{base}/console/incidents/{w.incident.id}/events?after={count}")
                assert resp.headers["Content-Type"].startswith("text/event-stream")

                async def read() -> None:
                    event = ""
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\n")
                        if line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: ") and event == "entry":
                            seen.append(json.loads(line[6:]))

                reader = asyncio.create_task(read())
                w.ctrl.store.append(w.incident.id, w.clock(), "comms", f"note {EVIL}")
                for _ in range(100):
                    if seen:
                        break
                    await asyncio.sleep(0.05)
                assert [e["message"] for e in seen] == [f"note {EVIL}"]  # JSON: the page sets textContent
                assert seen[0]["n"] == count + 1
            # The server shut down: the stream ended rather than holding the shutdown up.
            await asyncio.wait_for(reader, timeout=20)

    asyncio.run(main())
