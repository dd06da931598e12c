"""The chat page at GET /, driven in headless Chromium: people on different shards chat
through it, switch rooms without losing anything, ride out a killed shard and a full
restart by themselves, see why a connection was refused, and can use it on a 375 px
phone. Needs Debian's chromium (/usr/bin/chromium), which `make test` installs; without
it the tests fail rather than skip, so that CI always runs them.

Each state is saved as a screenshot in tests/artifacts/ (gitignored) for people to
look at."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest

from shardchat.testing.wait import await_until
from tests.support.browser import ms, shot
from tests.support.helpers import (
    Server,
    cleanup_server,
    connect_client,
    off_the_killed_shard,
    running_server,
    start_server,
)

# One Chromium for the module (each test opens its own contexts).
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def wait_connected(page: Any, timeout: float = 15) -> int:
    await page.wait_for_selector('#status[data-state="connected"]', timeout=ms(timeout))
    return int(await page.get_attribute("#status", "data-shard"))


async def open_page(browser: Any, port: int, name: str, room: str, **context: Any) -> Any:
    page = await (await browser.new_context(**context)).new_page()
    await page.goto(f"http://127.0.0.1:{port}/")
    await page.fill("#user", name)
    await page.fill("#room", room)
    await page.click("#connect")
    await wait_connected(page)
    return page


async def pages_on_shards(browser: Any, port: int, names: list[str], room: str) -> list[Any]:
    """One page per name, each on a shard none of the others is on (the kernel picks)."""
    pages: list[Any] = []
    shards: set[int] = set()
    for name in names:
        for _ in range(60):
            page = await open_page(browser, port, name, room)
            shard = int(await page.get_attribute("#status", "data-shard"))
            if shard not in shards:
                shards.add(shard)
                pages.append(page)
                break
            await page.context.close()
        else:
            raise AssertionError(f"no page of {name} on a new shard")
    return pages


async def say(page: Any, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


async def contents(page: Any) -> list[str]:
    texts: list[str] = await page.locator("#log li.msg .content").all_inner_texts()
    return texts


async def wait_contents(page: Any, expected: list[str], timeout: float = 20) -> None:
    """Wait until the shown room's messages are exactly ``expected`` (each once)."""
    got: list[str] = []

    async def shown() -> bool:
        got[:] = await contents(page)
        return got == expected

    await await_until(shown, timeout, lambda: f"page shows {got}, expected {expected}")


async def test_two_people_on_two_shards_chat(server: Server, browser: Any) -> None:
    ada, grace = await pages_on_shards(browser, server.port, ["ada", "grace"], "webroom")
    await say(ada, "hello from ada")
    await grace.wait_for_selector("text=hello from ada", timeout=ms(10))
    await say(grace, "hi ada")
    await ada.wait_for_selector("text=hi ada", timeout=ms(10))
    await ada.wait_for_selector("#log li.sys >> text=grace joined", timeout=ms(10))
    await wait_contents(ada, ["hello from ada", "hi ada"])
    await wait_contents(grace, ["hello from ada", "hi ada"])
    # Own messages are set apart; the member list has both.
    assert await ada.locator("#log li.own .content").all_inner_texts() == ["hello from ada"]
    assert await grace.locator("#log li.own .content").all_inner_texts() == ["hi ada"]
    assert await ada.locator("#members li").all_inner_texts() == ["ada", "grace"]
    # A late joiner sees the room's latest messages (history on join).
    late = await open_page(browser, server.port, "late", "webroom")
    await wait_contents(late, ["hello from ada", "hi ada"])
    await ada.wait_for_selector("#members li >> text=late", timeout=ms(10))
    # Content is text, never HTML.
    await say(grace, "<b>not bold</b>")
    await ada.wait_for_selector("text=<b>not bold</b>", timeout=ms(10))
    assert await ada.locator("#log b").count() == 0
    await shot(ada, "two-shards-ada")
    await shot(grace, "two-shards-grace")


async def test_room_switch_and_back_loses_nothing(server: Server, browser: Any) -> None:
    ada, grace = await pages_on_shards(browser, server.port, ["ada2", "grace2"], "first")
    # Ada also joins a second room and looks at it.
    await ada.fill("#room", "second")
    await ada.click("#join button")
    await ada.wait_for_selector('#rooms li.current[data-room="second"]', timeout=ms(5))
    for i in range(3):
        await say(grace, f"while away {i}")
    await say(ada, "in second")
    await wait_contents(ada, ["in second"])
    badge = ada.locator('#rooms li[data-room="first"] .unread')
    await badge.wait_for(timeout=ms(10))

    async def three_unread() -> bool:
        return await badge.inner_text() == "3"

    await await_until(three_unread, 5, "3 unread on the first room's badge")
    await shot(ada, "room-switch-unread")
    await ada.click('#rooms li[data-room="first"] button.room')
    await say(ada, "back in first")
    await wait_contents(ada, [f"while away {i}" for i in range(3)] + ["back in first"])
    await ada.click('#rooms li[data-room="second"] button.room')
    await wait_contents(ada, ["in second"])
    await ada.click('#rooms li[data-room="first"] button.room')
    await wait_contents(ada, [f"while away {i}" for i in range(3)] + ["back in first"])
    await shot(ada, "room-switch-back")


async def test_kill_9_and_full_restart_reconnect_by_themselves(browser: Any) -> None:
    # The room store (the default kind) in a directory of the test's own.
    store = Path(tempfile.mkdtemp(prefix="shardchat-browser-store-"))
    stored = [f"storage.dir={store}"]
    srv = start_server(workers=2, settings=stored)
    port = srv.port
    try:
        page = await open_page(browser, port, "steady", "resilient")
        shard = await wait_connected(page)
        talker = await connect_client(srv.url, user="talker", rooms=["resilient"])
        await talker.recv_type("joined")
        expected: list[str] = []
        for i in range(3):
            await talker.send(type="message", room="resilient", content=f"before {i}", id=f"b{i}")
            expected.append(f"before {i}")
        await wait_contents(page, expected)
        # kill -9 of the page's shard; the talker is on the other or reconnects.
        os.kill(srv.shard_pids()[shard], signal.SIGKILL)
        await page.wait_for_selector('#status[data-state="reconnecting"]', timeout=ms(10))
        await shot(page, "kill9-reconnecting")
        talker = await off_the_killed_shard(srv, talker, shard, "resilient", starts=3)
        for i in range(3):
            await talker.send(type="message", room="resilient", content=f"during {i}", id=f"d{i}")
            expected.append(f"during {i}")
        await wait_connected(page, timeout=30)
        await wait_contents(page, expected)
        await say(page, "page is back")
        expected.append("page is back")
        await wait_contents(page, expected)
        await shot(page, "kill9-recovered")
        await talker.close()
        # A full restart: 1001 shutdown, then a new server on the same port and
        # storage.dir: the room keeps its epoch and seq, the page resumes.
        srv.stop()
        cleanup_server(srv)
        await page.wait_for_selector('#status[data-state="reconnecting"]', timeout=ms(10))
        srv = start_server(workers=2, port=port, settings=stored)
        await wait_connected(page, timeout=60)
        await page.wait_for_selector("text=recovered every message", timeout=ms(10))
        assert await page.locator("text=the server restarted").count() == 0
        assert await page.locator("text=could not be recovered").count() == 0
        await wait_contents(page, expected)  # each once
        talker = await connect_client(srv.url, user="talker", rooms=["resilient"])
        await talker.recv_type("joined")
        await talker.send(type="message", room="resilient", content="same epoch", id="n0")
        expected.append("same epoch")
        await wait_contents(page, expected)
        await say(page, "after restart")
        expected.append("after restart")
        await wait_contents(page, expected)
        await talker.close()
        await shot(page, "restart-recovered")
    finally:
        cleanup_server(srv)
        shutil.rmtree(store, ignore_errors=True)


async def test_a_refused_name_and_a_refused_token_show_their_reason(browser: Any) -> None:
    with running_server(
        workers=1, settings=["auth.secret=browser-secret-of-at-least-32-bytes"]
    ) as srv:
        page = await (await browser.new_context()).new_page()
        await page.goto(f"http://127.0.0.1:{srv.port}/")
        # Checked on the page, before connecting.
        await page.fill("#user", "bad name")
        await page.click("#connect")
        await page.wait_for_selector("#notice >> text=no spaces", timeout=ms(5))
        assert await page.get_attribute("#status", "data-state") == "disconnected"
        await shot(page, "refused-name")
        # Refused by the server (no token): the reason is read and shown, no retrying.
        await page.fill("#user", "ada")
        await page.click("#connect")
        await page.wait_for_selector('#status[data-state="refused"]', timeout=ms(10))
        status = await page.inner_text("#status")
        assert "401" in status and "token is required" in status
        await shot(page, "refused-token")


async def test_a_375px_phone_has_every_control_in_view_and_tappable(
    server: Server, browser: Any
) -> None:
    phone = {"viewport": {"width": 375, "height": 667}, "has_touch": True, "is_mobile": True}
    page = await open_page(browser, server.port, "phone", "mobile", **phone)
    await page.fill("#room", "mobile2")
    await page.click("#join button")
    await page.click('#rooms li[data-room="mobile"] button.room')
    await say(page, "typed on a phone")
    await wait_contents(page, ["typed on a phone"])
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    controls = page.locator("input:visible, button:visible")
    count = await controls.count()
    assert count >= 8
    for i in range(count):
        control = controls.nth(i)
        box = await control.bounding_box()
        assert box is not None
        label = await control.evaluate("e => e.id || e.textContent || e.placeholder")
        assert box["x"] >= 0 and box["y"] >= 0, label
        assert box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 667, label
        assert box["height"] >= 24 and box["width"] >= 24, label
        # Tappable: the element at its centre is the control itself (or inside it).
        hit = await page.evaluate(
            "([x, y, i]) => { const c = document.querySelectorAll('input, button');"
            " const v = [...c].filter(e => e.offsetParent !== null)[i];"
            " const h = document.elementFromPoint(x, y); return v === h || v.contains(h); }",
            [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, i],
        )
        assert hit, label
    await page.tap('#rooms li[data-room="mobile2"] button.room')
    await page.wait_for_selector('#rooms li.current[data-room="mobile2"]', timeout=ms(5))
    await shot(page, "phone-375")


async def test_two_people_without_a_name_are_two_guests(server: Server, browser: Any) -> None:
    first = await open_page(browser, server.port, "", "guests")
    second = await open_page(browser, server.port, "", "guests")
    names = [
        (await page.inner_text("#status")).split(" as ", 1)[1].split(" ")[0]
        for page in (first, second)
    ]
    assert all(name.startswith("guest-") for name in names) and names[0] != names[1]
    await say(first, "which guest am I")
    await wait_contents(second, ["which guest am I"])
    assert await second.locator("#log li.own").count() == 0
    assert await first.locator("#log li.own").count() == 1
    await shot(second, "two-guests")
