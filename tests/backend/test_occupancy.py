"""room_occupied / room_vacated with the grace: a room left empty is reported after
it, once; a return within it sends neither event; with Redis the grace's end asks
whether the room is still empty and ours to report."""

from __future__ import annotations

import asyncio
from typing import Any

from shardchat.backend.occupancy import Occupancy
from shardchat.testing.wait import await_until


class Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str | None]] = []

    def emit(self, kind: str, user: str, room: str | None = None, *_: Any, **__: Any) -> None:
        self.sent.append((kind, user, room))


async def test_vacated_after_the_grace_and_no_flap_within_it() -> None:
    sender = Sender()
    occupancy = Occupancy(sender, 0.05)  # type: ignore[arg-type]
    occupancy.changed("r", "ada", True)
    occupancy.changed("r", "ada", False)
    occupancy.changed("r", "bob", True)  # back within the grace: neither event
    await asyncio.sleep(0.1)
    assert sender.sent == [("room_occupied", "ada", "r")]
    occupancy.changed("r", "bob", False)
    await await_until(lambda: len(sender.sent) == 2, 2, "vacated")
    assert sender.sent[1] == ("room_vacated", "bob", "r")
    occupancy.close()


async def test_with_redis_the_grace_end_asks_whether_to_report() -> None:
    sender = Sender()
    answers = [False, True]

    async def confirm(room: str) -> bool:
        return answers.pop(0)

    occupancy = Occupancy(sender, 0.01, confirm)  # type: ignore[arg-type]
    occupancy.changed("r", "ada", False)  # another box filled it meanwhile: no event
    await asyncio.sleep(0.05)
    assert sender.sent == []
    occupancy.changed("r", "ada", False)
    await await_until(lambda: sender.sent == [("room_vacated", "ada", "r")], 2, "vacated")
