"""``room_occupied`` and ``room_vacated``, where the room's presence is held.

A room's broker tells :meth:`Occupancy.changed` when the room got its first
member anywhere or lost its last (on one box the room's owner shard, which
alone turns presence changes into events; across boxes the node whose Redis
script made the change). A room left empty is reported after
``webhooks.vacated_grace`` only if it is still empty then, so a member who
reconnects at once does not flap it: a room occupied again within the grace
sends neither event. With Redis, the grace's end asks Redis (``confirm``),
which alone knows whether another box filled the room meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from shardchat.backend.webhooks import WebhookSender

__all__ = ["Occupancy"]


class Occupancy:
    def __init__(
        self,
        sender: WebhookSender,
        grace: float,
        confirm: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.sender = sender
        self.grace = grace
        self.confirm = confirm  # Redis: is the room still empty, and ours to report?
        self._pending: dict[str, asyncio.TimerHandle] = {}

    def changed(self, room: str, user: str, occupied: bool) -> None:
        """``room`` got its first member (``user``) or lost its last."""
        if occupied:
            handle = self._pending.pop(room, None)
            if handle is not None:
                handle.cancel()  # back within the grace: neither event
                return
            # After the turn's engine events (the join that did it) are queued.
            asyncio.get_running_loop().call_soon(
                self.sender.emit, "room_occupied", user, room, None
            )
        elif room not in self._pending:
            loop = asyncio.get_running_loop()
            self._pending[room] = loop.call_later(
                self.grace, self._vacated, room, user, time.time()
            )

    def _vacated(self, room: str, user: str, when: float) -> None:
        del self._pending[room]
        if self.confirm is None:
            self.sender.emit("room_vacated", user, room, when=when)
        else:
            asyncio.get_running_loop().create_task(self._confirmed(room, user, when))

    async def _confirmed(self, room: str, user: str, when: float) -> None:
        if await self.confirm(room):  # type: ignore[misc]
            self.sender.emit("room_vacated", user, room, when=when)

    def close(self) -> None:
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()
