"""The operator dashboard at / of the admin port, in headless Chromium: its charts move
while a load runs, the shards are listed, a wrong admin token is refused and the right
one lets in (kept in the tab's session only), a room's presence and last messages show
on click, a publish from the dashboard reaches a WebSocket client, a disconnect closes
one, and a 375 px phone can read it all. One server and one browser for the module.

Screenshots go to tests/artifacts/ (gitignored); the README's, docs/img/dashboard.png,
is taken again with SHARDCHAT_README_SHOTS=1.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from shardchat.testing.wait import await_until
from tests.support.browser import ARTIFACTS, ms, shot
from tests.support.helpers import FAST, Server, connect_client, running_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "dashboard-admin-token-of-some-length"
API_KEY = "dashboard-api-key-of-some-length"
# The README's screenshot: rewritten only when asked (SHARDCHAT_README_SHOTS=1), so that a
# run of the suite leaves the work tree as it was; otherwise it goes with the artifacts.
README_SHOT = (
    Path(__file__).resolve().parent.parent.parent / "docs" / "img" / "dashboard.png"
    if os.environ.get("SHARDCHAT_README_SHOTS") == "1"
    else ARTIFACTS / "dashboard-readme.png"
)


@pytest.fixture(scope="module")
def admin_server() -> Iterator[Server]:
    settings = [*FAST, f"server.admin_token={TOKEN}", f"api.key={API_KEY}"]
    with running_server(workers=2, settings=settings) as srv:
        yield srv


def status(server: Server) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.admin_port}/status", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        data: dict[str, Any] = json.loads(answer.read())
        return data


async def logged_in(browser: Any, server: Server, **context: Any) -> Any:
    page = await (await browser.new_context(**context)).new_page()
    errors: list[str] = []
    # Uncaught exceptions and CSP refusals (a refused answer, 401 or 503, is logged by
    # the browser as a failed resource: not an error of the page's).
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    await page.goto(f"http://127.0.0.1:{server.admin_port}/")
    await page.wait_for_selector("#login:not([hidden])", timeout=ms(10))
    await page.fill("#token", TOKEN)
    await page.click("#login button")
    await page.wait_for_selector('#state[data-state="ok"]', timeout=ms(10))
    return page


async def number(page: Any, selector: str) -> float:
    text = ((await page.inner_text(selector)).split() or [""])[0]  # "p50 / p99": the first
    scale = {"k": 1e3, "M": 1e6}.get(text[-1:], 1)
    try:
        return float(text.rstrip("kM")) * scale
    except ValueError:
        return 0.0


async def wait_number(page: Any, selector: str, check: Any, timeout: float = 15) -> float:
    seen: list[float] = [0.0]

    async def shown() -> bool:
        seen[0] = await number(page, selector)
        return bool(check(seen[0]))

    await await_until(shown, timeout, lambda: f"{selector} stayed at {seen[0]}", poll=0.1)
    return seen[0]


async def test_a_wrong_token_is_refused_and_the_right_one_kept_in_the_session(
    admin_server: Server, browser: Any
) -> None:
    page = await (await browser.new_context()).new_page()
    await page.goto(f"http://127.0.0.1:{admin_server.admin_port}/")
    await page.wait_for_selector("#login:not([hidden])", timeout=ms(10))
    assert await page.get_attribute("#state", "data-state") == "login"
    await page.fill("#token", "not-the-token")
    await page.click("#login button")
    await page.wait_for_selector("#login-error >> text=wrong admin token", timeout=ms(10))
    assert await page.evaluate("sessionStorage.length") == 0
    assert await page.locator("#shards tbody tr").count() == 0  # nothing shown without it
    await shot(page, "dashboard-refused-token")
    await page.fill("#token", TOKEN)
    await page.click("#login button")
    await page.wait_for_selector('#state[data-state="ok"]', timeout=ms(10))
    assert await page.evaluate("sessionStorage.getItem('shardchat-admin-token')") == TOKEN
    assert await page.evaluate("localStorage.length") == 0
    # A reload in the same tab stays logged in; the shards are listed.
    await page.reload()
    await page.wait_for_selector('#state[data-state="ok"]', timeout=ms(10))
    rows = page.locator("#shards tbody tr")
    assert await rows.count() == 2
    pids = {s["id"]: s["pid"] for s in (await asyncio.to_thread(status, admin_server))["shards"]}
    for shard, pid in pids.items():
        row = page.locator(f'#shards tbody tr[data-shard="{shard}"] td')
        assert await row.nth(1).inner_text() == str(pid)
    await page.context.close()


async def test_the_charts_move_while_a_load_runs(admin_server: Server, browser: Any) -> None:
    page = await logged_in(browser, admin_server)
    clients = [
        await connect_client(admin_server.url, user=f"load{i}", rooms=["busy"]) for i in range(6)
    ]
    stop = asyncio.Event()

    async def load() -> None:
        n = 0
        while not stop.is_set():
            for client in clients:
                await client.send(type="message", room="busy", content=f"load {n}")
                n += 1
            await asyncio.sleep(0.01)

    async def drain(client: Any) -> None:
        while True:
            await client.ws.recv()

    tasks = [asyncio.create_task(load()), *(asyncio.create_task(drain(c)) for c in clients)]
    try:
        await wait_number(page, "#now-connections", lambda v: v >= 6)
        await wait_number(page, "#now-messages", lambda v: v > 50)
        await wait_number(page, "#now-deliveries", lambda v: v > 300)
        await wait_number(page, "#now-latency", lambda v: v > 0)
        points = int(await page.get_attribute("#chart-messages", "data-points") or 0)
        await wait_number(page, "#now-messages", lambda v: v > 50)
        await page.wait_for_function(
            f"() => Number(document.getElementById('chart-messages').dataset.points) > {points}",
            timeout=ms(10),
        )
        await page.click('#rooms tbody tr[data-room="busy"]')
        await page.wait_for_selector("#presence li >> text=load0", timeout=ms(10))
        await page.wait_for_selector("#room-messages li", timeout=ms(10))
        await shot(page, "dashboard-charts-under-load")
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.set_viewport_size({"width": 1280, "height": 900})
        await page.evaluate("() => window.scrollTo(0, 0)")
        await page.screenshot(path=str(README_SHOT), full_page=False)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
    # Load gone: the message rate falls back to 0 within a few samples.
    await wait_number(page, "#now-messages", lambda v: v == 0)
    assert page.errors == []
    await page.context.close()


async def test_a_room_presence_a_publish_and_a_disconnect(
    admin_server: Server, browser: Any
) -> None:
    page = await logged_in(browser, admin_server)
    ada = await connect_client(admin_server.url, user="ada", rooms=["ops"])
    grace = await connect_client(admin_server.url, user="grace", rooms=["ops"])
    try:
        await ada.recv_type("joined")
        await grace.recv_type("joined")
        await page.click('#rooms tbody tr[data-room="ops"]', timeout=ms(10))
        await page.wait_for_selector("#presence li >> text=grace", timeout=ms(10))
        assert await page.locator("#presence li").all_inner_texts() == ["ada", "grace"]
        assert await page.locator('#rooms tbody tr[data-room="ops"] td').nth(1).inner_text() == "2"
        await shot(page, "dashboard-room-presence")
        # A publish from the dashboard arrives at a WebSocket client.
        assert await page.input_value("#publish-room") == "ops"
        await page.fill("#publish-content", "maintenance at five")
        await page.click("#publish button")
        await page.wait_for_selector("#action-result >> text=published into ops", timeout=ms(10))
        frame = await ada.recv_type("message", timeout=10)
        assert frame["content"] == "maintenance at five" and frame["room"] == "ops"
        await page.wait_for_selector("#room-messages >> text=maintenance at five", timeout=ms(10))
        await shot(page, "dashboard-published")
        # A disconnect closes every connection of the user with 4403: the raw client's
        # and the chat page's (which obeys it: no reconnect).
        chat = await page.context.new_page()
        await chat.goto(f"http://127.0.0.1:{admin_server.port}/")
        await chat.fill("#user", "grace")
        await chat.fill("#room", "ops")
        await chat.click("#connect")
        await chat.wait_for_selector('#status[data-state="connected"]', timeout=ms(15))
        await page.fill("#disconnect-user", "grace")
        await page.click("#disconnect button")
        await page.wait_for_selector("#action-result >> text=disconnected grace", timeout=ms(10))
        with pytest.raises(ConnectionClosed):
            while True:
                await grace.recv(timeout=10)
        assert grace.ws.close_code == 4403  # disconnected by the server: do not reconnect
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#presence li')].map(l => l.textContent).join()"
            " === 'ada'",
            timeout=ms(15),
        )
        await shot(page, "dashboard-disconnected")
        await chat.wait_for_selector('#status[data-state="refused"]', timeout=ms(10))
        assert "disconnected by the server (4403)" in await chat.inner_text("#status")
        assert await chat.inner_text("#connect") == "connect"  # not trying again
        await chat.screenshot(path=str(ARTIFACTS / "dashboard-disconnected-page.png"))
        assert page.errors == []
    finally:
        await ada.close()
        await grace.close()
        await page.context.close()


async def test_a_375px_phone_reads_it_all(admin_server: Server, browser: Any) -> None:
    phone = {"viewport": {"width": 375, "height": 667}, "has_touch": True, "is_mobile": True}
    page = await logged_in(browser, admin_server, **phone)
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    for canvas in await page.locator("canvas").all():
        box = await canvas.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375
        assert box["height"] >= 80
    for control in await page.locator("input:visible, button:visible").all():
        box = await control.bounding_box()
        assert box is not None and box["x"] + box["width"] <= 375 and box["height"] >= 24
    # The shards table fits without scrolling sideways.
    await page.wait_for_selector("#shards tbody tr", timeout=ms(10))
    await shot(page, "dashboard-phone-375")
    widths = await page.evaluate(
        "() => { const t = document.getElementById('shards');"
        " return [t.scrollWidth, t.parentElement.clientWidth]; }"
    )
    assert widths[0] <= widths[1], widths
    font = await page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)")
    assert font >= 14
    await shot(page, "dashboard-phone-375")
    await page.context.close()
