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
from shardchat.brokers.redis.hooks import death_id
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
                node = str(getattr(shard.broker, "node", ""))  # Redis: this shard's node
                self.journal = shard.journal = Journal(path, node)
                # The journal follows every connection and room, whatever is sent.
                shard.engine.hook_kinds |= {"connect", "join", "leave", "disconnect"}
            redis = config.broker.kind == "redis"
            if self.sender.kinds & {"room_occupied", "room_vacated"}:
                # Across boxes only Redis knows whether the room is still empty.
                confirm = getattr(shard.broker, "vacated", None) if redis else None
                self.occupancy = Occupancy(self.sender, config.webhooks.vacated_grace, confirm)
                shard.broker.occupancy = self.occupancy.changed
            if redis and self.sender.kinds & {"leave", "disconnect"}:
                shard.broker.dead_user = self.report_dead_user  # type: ignore[attr-defined]
        if config.proxy.connect_url:
            self.connect = shard.connect_proxy = ConnectProxy(
                config.proxy, spec.shard_id, box, mine
            )
        if config.proxy.publish_url:
            self.publish = shard.publish_proxy = PublishProxy(
                config.proxy, spec.shard_id, box, mine, shard.publish_answered
            )
            shard.engine.publish_proxy = True

    def report_leftovers(self, pid: int, node: str, leftovers: list[Leftover]) -> None:
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
                    event_id=left.event_id(pid, node, "leave", room),
                )
            sender.emit(
                "disconnect",
                left.user,
                None,
                {"conn": left.conn, "code": 1006, "reason": "shard died"},
                event_id=left.event_id(pid, node, "disconnect"),
            )

    def report_dead_user(self, node: str, user: str, room: str | None) -> None:
        """A dead box's user (Redis broker): its leave of ``room``, or its disconnect;
        this node is the one survivor that reports it."""
        sender = self.sender
        assert sender is not None
        parts = node.split(":")
        fields: dict[str, object] = {
            "shard": int(parts[2]) if len(parts) == 4 and parts[2].isdigit() else -1,
            "box": node,  # the dead node, host:pid:shard:nonce
            "reported_by": sender.box,
        }
        if room is not None:
            fields["reason"] = "box_died"
            sender.emit("leave", user, room, fields, event_id=death_id(node, user, "leave", room))
        else:
            fields.update(code=1006, reason="box died")
            sender.emit(
                "disconnect", user, None, fields, event_id=death_id(node, user, "disconnect")
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
