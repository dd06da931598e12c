"""A web developer's check: a page of their own that imports nothing of ours but
/shardchat.js (tests/browser/devcheck.html, served from the server's origin) joins a
room, sends, rides out a kill -9 of its shard, and shows every message once, in order."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from shardchat.testing.wait import await_until
from tests.support.browser import launched, ms, shot
from tests.support.helpers import FAST, connect_client, off_the_killed_shard, running_server

PAGE = Path(__file__).with_name("devcheck.html")


async def test_a_page_that_only_imports_the_client_survives_a_shard_kill() -> None:
    with running_server(workers=2, settings=FAST) as srv:
        # A page answered by the test (not by a server on the network) has no address
        # space: Chromium's local-network checks would block its WebSocket to loopback.
        async with launched("--disable-features=LocalNetworkAccessChecks") as browser:
            page = await (await browser.new_context()).new_page()
            origin = f"http://127.0.0.1:{srv.port}"
            # The developer's own file, on the server's origin, so that "/shardchat.js"
            # is the server's (the route answers this one URL; the rest goes through).
            await page.route(
                f"{origin}/devcheck.html*",
                lambda route: route.fulfill(body=PAGE.read_text(), content_type="text/html"),
            )
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{origin}/devcheck.html?user=dev&room=devroom")
            await page.wait_for_selector("#state >> text=/^connected$/", timeout=ms(15))
            shard = int(await page.inner_text("#shard"))

            async def shown() -> list[str]:
                texts: list[str] = await page.locator("#log li").all_inner_texts()
                return texts

            async def shows(expected: list[str]) -> None:
                async def done() -> bool:
                    return await shown() == expected

                await await_until(done, 20, lambda: f"the page shows {expected}")

            talker = await connect_client(srv.url, user="talker", rooms=["devroom"])
            await talker.recv_type("joined")
            expected = []
            for i in range(3):
                await talker.send(type="message", room="devroom", content=f"before {i}")
                expected.append(f"before {i}")
            await page.fill("#text", "from the page")
            await page.press("#text", "Enter")
            expected.append("from the page")
            await shows(expected)
            # kill -9 of the page's shard; the talker goes on from the other one.
            os.kill(srv.shard_pids()[shard], signal.SIGKILL)
            # The page may be back on the other shard within a few ms (its first retry
            # is jittered from 0), too soon to catch "disconnected" on screen: the page
            # counts its disconnections instead.
            await page.wait_for_selector("body[data-disconnects]", timeout=ms(10))
            talker = await off_the_killed_shard(srv, talker, shard, "devroom", starts=3)
            for i in range(3):
                await talker.send(type="message", room="devroom", content=f"during {i}")
                expected.append(f"during {i}")
            await page.wait_for_selector("#state >> text=reconnected", timeout=ms(30))
            assert await page.inner_text("#state") == "reconnected"  # recovered everything
            await page.fill("#text", "back again")
            await page.press("#text", "Enter")
            expected.append("back again")
            await shows(expected)  # every message once, in order
            seqs = [
                int(s)
                for s in await page.locator("#log li").evaluate_all(
                    "items => items.map(li => li.dataset.seq)"
                )
            ]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            await shot(page, "devcheck-after-kill")
            await talker.close()
            assert errors == []
