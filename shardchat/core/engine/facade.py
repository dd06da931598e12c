"""The room engine: one shard's room logic as a Sans-I/O state machine.

Like websockets' ``ServerProtocol``, :class:`RoomEngine` does no I/O: it never
reads a clock, schedules, logs, or touches a socket or a segment. Its inputs
are

- a connection's upgrade (:meth:`admit`), its opening (:meth:`open`), its
  text frames (:meth:`receive`) and its end (:meth:`closed`);
- what its broker delivered (:meth:`deliver`: the broker hands it to
  :attr:`RoomEngine.inbox`, which queues it; see
  :mod:`shardchat.core.engine.inbox`);
- the time, given before each batch of inputs with :meth:`advance`, and its
  timer (:meth:`tick`);
- the server's own calls (:meth:`publish_as`, :meth:`join_user`,
  :meth:`leave_user`, :meth:`close_user`);
- the end of the loop turn (:func:`shardchat.core.engine.turn.end_turn`).

Its outputs leave through two swap-and-return getters, in order:
:meth:`take_outputs` (frames, closes and paced replays for connections,
events and call results for the caller's other sinks:
:mod:`shardchat.core.outputs`) and :meth:`take_commands` (calls for the
broker: :mod:`shardchat.core.engine.commands`). Connections are the caller's
own objects (any hashable handle): the engine keeps them as keys and hands
them back.

The engine is built in parts, one above the other, each a module with one
job: ``state`` (what it knows, its output getters), ``rooms``,
``deliveries`` (what the broker told it), ``joins`` (a join's stages),
``requests``, ``connections`` and ``calls`` (the server's own calls);
``inbox`` and ``commands`` are its two lines to the broker and ``turn`` the
order of a loop turn around it.

Fan-out: a room's new frames of one turn are queued per room and, at
:meth:`flush`, joined once into one buffer that goes to each local member:
the caller's per-member work is one transport write.
"""

from __future__ import annotations

from shardchat.core.engine.calls import ServerCalls
from shardchat.core.outputs import C

__all__ = ["RoomEngine"]


class RoomEngine(ServerCalls[C]):
    """One engine per shard: its connections, its rooms, and what it asks of its
    broker. Made with ``RoomEngine(config, shard_id, epoch, broker, counters,
    hooks, id_prefix=..., verify=..., peers=..., log=...)``
    (:class:`~shardchat.core.engine.state.EngineState`)."""

    __slots__ = ()
