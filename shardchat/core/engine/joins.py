"""A join's stages: one :class:`PendingJoin` per join in flight, its stage explicit.

A ``join`` can wait on its broker three times before it is answered, in this
order (each stage is skipped when the broker has what it needs at once):

1. ``OPENING``: a broker that carries only the rooms it is asked for (Redis)
   subscribes and loads the room's state at the room's first join here, or
   again after it lost its store for a while (``Broker.open_room``);
2. ``FETCHING``: the room's history is fetched back (a room this engine
   dropped, or a resume past what it holds) or its gap filled, so that
   ``since`` and a later ``history`` are answered from everything the server
   holds (``GapFill.ensure_history``);
3. ``ASKING``: the room's presence holder is asked who is in it, for
   ``limits.room_size`` and ``joined.users`` (``Broker.presence``).

Then it is ``DONE``: answered with ``joined`` or refused. A join named in
the upgrade's query (``?room=``) waits ``ADMITTED`` until the connection
opens. Each wait ends with an input queued in the engine's inbox (never a
call from inside the broker) that names the :class:`PendingJoin`, which
carries the join on from its stage. Meanwhile the connection's other
requests wait behind its joins (``ConnState.deferred``), so that a message
sent right after a join is taken as a member's; they are taken at the end of
the turn in which its last join ended (``RoomEngine.take_deferred``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic

from shardchat.core.messages import Join
from shardchat.core.outputs import C

__all__ = ["MAX_DEFERRED", "JoinStage", "PendingJoin"]

MAX_DEFERRED = 256  # requests a connection may send while its joins wait


class JoinStage(enum.IntEnum):
    """Where a join is; each stage waits on the broker, in this order."""

    ADMITTED = 0  # named in the upgrade's query: starts when the connection opens
    OPENING = 1  # the broker subscribes to the room and loads its state
    FETCHING = 2  # the room's history is fetched back, or its gap filled, first
    ASKING = 3  # the room's presence holder is asked who is in it
    DONE = 4  # answered with `joined`, or refused


@dataclass(slots=True, eq=False)
class PendingJoin(Generic[C]):
    """One join in flight: its connection, its request and its stage."""

    conn: C
    request: Join
    stage: JoinStage = JoinStage.ADMITTED
