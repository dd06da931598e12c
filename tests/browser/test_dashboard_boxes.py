"""The dashboard of a server of two boxes joined by Redis (a real redis-server): the
boxes, their shards and connections, and Redis' counters, seen from either box."""

from __future__ import annotations

from tests.support.browser import ARTIFACTS, launched, ms
from tests.support.helpers import FAST, connect_client, running_server
from tests.support.redis_helpers import delete_prefix, redis_server

API_KEY = "boxes-api-key-of-some-length"


async def test_the_dashboard_shows_both_boxes() -> None:
    prefix = "dashboxes:"
    with redis_server() as redis:
        settings = [
            *FAST,
            "broker.kind=redis",
            f"redis.url={redis.url}",
            f"redis.prefix={prefix}",
            f"api.key={API_KEY}",
        ]
        try:
            with running_server(1, settings) as one, running_server(1, settings) as two:
                ada = await connect_client(one.url, user="ada", rooms=["across"])
                grace = await connect_client(two.url, user="grace", rooms=["across"])
                async with launched() as browser:
                    page = await (await browser.new_context()).new_page()
                    await page.goto(f"http://127.0.0.1:{one.admin_port}/")
                    rows = page.locator("#boxes tbody tr")
                    await page.wait_for_function(
                        "() => document.querySelectorAll('#boxes tbody tr').length === 2",
                        timeout=ms(15),
                    )
                    boxes = {
                        await row.get_attribute("data-box"): await row.locator(
                            "td"
                        ).all_inner_texts()
                        for row in await rows.all()
                    }
                    pids = {f":{one.proc.pid}", f":{two.proc.pid}"}
                    assert {box[box.rindex(":") :] for box in boxes if box} == pids
                    for cells in boxes.values():
                        assert cells[1:] == ["1", "1", "up"]  # a shard, a connection each
                    assert "2 boxes · redis" in await page.inner_text("#box-count")
                    assert "Redis redis://" in await page.inner_text("#redis")
                    await page.click('#rooms tbody tr[data-room="across"]', timeout=ms(10))
                    await page.wait_for_function(
                        "() => [...document.querySelectorAll('#presence li')]"
                        ".map(l => l.textContent).join() === 'ada,grace'",
                        timeout=ms(15),
                    )
                    await page.screenshot(
                        path=str(ARTIFACTS / "dashboard-two-boxes.png"), full_page=True
                    )
                await ada.close()
                await grace.close()
        finally:
            delete_prefix([redis], prefix)
