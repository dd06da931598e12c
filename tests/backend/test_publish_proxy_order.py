"""The publish proxy hands verdicts back in the batches' order, and a batch whose ask
failed in an unforeseen way is answered too, so that it never holds the later
batches' verdicts behind it."""

from __future__ import annotations

from typing import Any, cast

from shardchat import stats
from shardchat.backend.http import Response
from shardchat.backend.proxy import PublishProxy
from shardchat.core.config import ProxyConfig
from shardchat.core.hookevents import ProxiedPublish, Verdict
from shardchat.stats import BLOCK_SLOTS
from shardchat.testing.wait import await_until


class Backend:
    """A backend whose first call fails with a bug's exception; the others answer."""

    def __init__(self) -> None:
        self.calls = 0

    async def post(self, body: bytes, headers: Any = None) -> Response:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        return Response(200, {}, b'{"results": []}')

    def close(self) -> None:
        pass


async def test_a_batch_whose_ask_failed_does_not_hold_the_later_ones() -> None:
    answered: list[tuple[str, list[Verdict] | None, str]] = []

    def on_answer(
        items: list[ProxiedPublish[str]], verdicts: list[Verdict] | None, why: str
    ) -> None:
        answered.append((items[0].conn, verdicts, why))

    config = ProxyConfig(publish_url="http://127.0.0.1:9/publish")
    proxy: PublishProxy[str] = PublishProxy(
        config, 0, "box", cast(stats.Counters, [0] * BLOCK_SLOTS), on_answer
    )
    proxy.client = Backend()  # type: ignore[assignment]
    proxy.send([ProxiedPublish("first", "1", None, "r", "ada", "x")])
    proxy.send([ProxiedPublish("second", "2", None, "r", "ada", "y")])
    await await_until(lambda: len(answered) == 2, 5, "both batches answered")
    (first, none, why), (second, verdicts, no_reason) = answered
    assert (first, none) == ("first", None) and "not sent" in why
    assert (second, verdicts, no_reason) == ("second", [Verdict()], "")
