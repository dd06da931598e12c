"""The chat page at GET /, driven in headless Chromium: two people on different shards
chat through it. Needs Debian's chromium (/usr/bin/chromium), which `make test` installs;
without it the test fails rather than skips, so that CI always runs it."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Server

CHROMIUM = "/usr/bin/chromium"

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def test_two_people_chat_through_the_page(server: Server, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pages = []
            shards = set()
            for name in ("ada", "grace"):
                # The kernel picks the shard: open pages until the two are on two shards.
                for _ in range(50):
                    page = await browser.new_page()
                    await page.goto(f"http://127.0.0.1:{server.port}/")
                    await page.fill("#user", name)
                    await page.fill("#room", "webroom")
                    await page.click("#connect")
                    await page.wait_for_selector("text=joined webroom")
                    shard = (await page.inner_text("#status")).rsplit(" ", 1)[1]
                    if shard not in shards:
                        shards.add(shard)
                        pages.append(page)
                        break
                    await page.close()
            assert len(shards) == 2
            ada, grace = pages
            await ada.fill("#text", "hello from ada")
            await ada.press("#text", "Enter")
            await grace.wait_for_selector("text=ada: hello from ada")
            await grace.fill("#text", "hi ada")
            await grace.press("#text", "Enter")
            await ada.wait_for_selector("text=grace: hi ada")
            await ada.wait_for_selector("text=grace joined")
            await ada.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            await browser.close()
