"""The shard's links to the application's backend: webhook sender and proxies.

Made at the shard's start from ``webhooks.*`` and ``proxy.*`` and handed to
its :class:`~shardchat.shard.handler.Shard`; closed when the shard exits,
after the drain, giving the webhook queue a moment to go out.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from shardchat.backend.occupancy import Occupancy
from shardchat.backend.proxy import ConnectProxy, PublishProxy
from shardchat.backend.webhooks import WebhookSender
from shardchat.logs import log_event
from shardchat.shard.connection import Connection
from shardchat.shard.journal import Journal, Leftover, journal_path, read_leftovers

if TYPE_CHECKING:
    from shardchat.shard.handler import Shard
    from shardchat.shard.process import ShardSpec

__all__ = ["ENGINE_EVENTS", "BackendLinks", "box_name"]

log = logging.getLogger(__name__)

# Webhook events the engine makes (the others come from presence holders and deaths).
ENGINE_EVENTS = frozenset({"connect", "disconnect", "join", "leave", "message"})


def box_name(supervisor_pid: int) -> str:
    """This server's name in webhook events and proxy calls: host and supervisor pid."""
    return f"{socket.gethostname()}:{supervisor_pid}"


class BackendLinks:
    """What the shard talks to over HTTP, by its configuration."""

    def __init__(self, spec: ShardSpec, shard: Shard) -> None:
        config = spec.config
        mine = shard.counters.mine
        assert mine is not None
        box = box_name(spec.supervisor_pid)
        self.drain_wait = min(2.0, config.server.graceful_timeout / 2)
        self.sender: WebhookSender | None = None
        self.connect: ConnectProxy | None = None
        self.publish: PublishProxy[Connection] | None = None
        self.occupancy: Occupancy | None = None
        self.journal: Journal | None = None
        if config.webhooks.url:
            self.sender = WebhookSender(config.webhooks, spec.shard_id, box, mine)
            shard.webhooks = self.sender
            shard.engine.hook_kinds = self.sender.kinds & ENGINE_EVENTS
            self.sender.start()
            if self.sender.kinds & {"leave", "disconnect"}:
                path = journal_path(spec.supervisor_pid, spec.shard_id)
                self.report_leftovers(*read_leftovers(path))
                self.journal = shard.journal = Journal(path)
                # The journal follows every connection and room, whatever is sent.
                shard.engine.hook_kinds |= {"connect", "join", "leave", "disconnect"}
            if self.sender.kinds & {"room_occupied", "room_vacated"}:
                self.occupancy = Occupancy(self.sender, config.webhooks.vacated_grace)
                shard.broker.occupancy = self.occupancy.changed
        if config.proxy.connect_url:
            self.connect = shard.connect_proxy = ConnectProxy(
                config.proxy, spec.shard_id, box, mine
            )
        if config.proxy.publish_url:
            self.publish = shard.publish_proxy = PublishProxy(
                config.proxy, spec.shard_id, box, mine, shard.publish_answered
            )
            shard.engine.publish_proxy = True

    def report_leftovers(self, pid: int, leftovers: list[Leftover]) -> None:
        """The predecessor (killed) left these connections open: their leaves and
        disconnects, with the ids any report of them carries."""
        sender = self.sender
        assert sender is not None
        if leftovers:
            log_event(log, logging.WARNING, "shard_death_reported", pid=pid, conns=len(leftovers))
        for left in leftovers:
            for room in left.rooms:
                sender.emit(
                    "leave",
                    left.user,
                    room,
                    {"conn": left.conn, "reason": "shard_died"},
                    event_id=left.event_id(pid, "leave", room),
                )
            sender.emit(
                "disconnect",
                left.user,
                None,
                {"conn": left.conn, "code": 1006, "reason": "shard died"},
                event_id=left.event_id(pid, "disconnect"),
            )

    async def close(self, quick: bool) -> None:
        if self.occupancy is not None:
            self.occupancy.close()
        if self.journal is not None:
            # Every connection is closed by now (and its events queued): nothing
            # is left for a successor to report.
            self.journal.close(remove=True)
        if self.connect is not None:
            self.connect.close()
        if self.publish is not None:
            self.publish.close()
        if self.sender is not None:
            # The drain's disconnects, if the receiver takes them quickly.
            await self.sender.close(0.0 if quick else self.drain_wait)
