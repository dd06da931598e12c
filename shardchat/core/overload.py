"""Admission control: the bounded queues a publish can wait in, and its refusal. Pure.

A publish accepted past what a shard can deliver waits in a queue, and every
accepted message behind it waits as long: latency grows without bound and
the excess is answered ``unavailable`` only after ``delivery.publish_timeout``.
So every queue a publish can wait in has a bound (``overload.*``), and past
it a new publish is refused at once with ``overloaded`` and a
``retry_after`` (PROTOCOL.md, Extensions, Overload): it was not sequenced,
retrying it later is safe, and it does not count towards
``limits.max_errors``.
"""

from __future__ import annotations

import enum

from shardchat.core.errors import ErrorCode, ProtocolError

__all__ = ["Queue", "overloaded"]


class Queue(enum.StrEnum):
    """The bounded queues, named as ``/metrics`` labels them (``queue``)."""

    FORWARDS = "forwards"  # forwards in flight from this shard to the room's owner
    BACKLOG = "backlog"  # the owner's unread peer records (forwards it has to sequence)
    PIPELINE = "pipeline"  # publishes waiting for or in a Redis pipeline
    TURN = "turn"  # room frames this loop turn of the shard has queued, in bytes
    STORE = "store"  # messages the owner sequenced that its room store has not written yet
    PROXY = "proxy"  # publishes waiting for the publish proxy's verdict (proxy.publish_url)


_WHAT = {
    Queue.FORWARDS: "too many publishes wait for the room's owner",
    Queue.BACKLOG: "the room's owner is behind on sequencing",
    Queue.PIPELINE: "too many publishes wait for the broker",
    Queue.TURN: "the server is delivering as fast as it can",
    Queue.STORE: "the room's store is behind on writing",
    Queue.PROXY: "too many publishes wait for the application's backend",
}


def overloaded(queue: Queue, retry_after: float, request_id: str | None) -> ProtocolError:
    """The refusal of a publish because ``queue`` is full."""
    return ProtocolError(
        ErrorCode.OVERLOADED,
        f"server overloaded ({_WHAT[queue]}); not sent, retry after {retry_after:g} s",
        request_id,
        retry_after,
    )
