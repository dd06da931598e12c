"""The engine's output onto the connections' transports: the fan-out's hot loop."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from shardchat.core.outputs import ApiResult, Close, Item, Paced
from shardchat.core.wire import text_frame

if TYPE_CHECKING:
    from shardchat.shard.connection import Connection

__all__ = ["write", "write_turn"]

Output = tuple[Iterable["Connection"], Item]


def write_turn(out: list[Output], rooms: list[Output]) -> None:
    """The end of a turn: the replies (acks above all), then the rooms' frames.

    A sender is usually a member of the room it published to, so its ack and
    the room's frames of the turn go out in one write instead of two (a tenth
    of the writes of small rooms). Each connection still gets its replies
    before its room frames; only the order between different connections
    changes, which nobody can see. A close or a paced replay among the replies
    keeps the plain order.
    """
    held: dict[Connection, bytes] = {}
    # Connections with several replies, joined once below: a burst of refused
    # publishes holds thousands for one connection (adding them up one by one
    # copied the buffer each time: quadratic, seconds of a stuck loop).
    several: dict[Connection, list[bytes]] | None = None
    for conns, item in out:
        if type(item) is not bytes:
            write(out)
            write(rooms)
            return
        for conn in conns:
            before = held.get(conn)
            if before is None:
                held[conn] = item
            elif several is None:
                several = {conn: [before, item]}
            else:
                parts = several.get(conn)
                if parts is None:
                    several[conn] = [before, item]
                else:
                    parts.append(item)
    if several is not None:
        for conn, parts in several.items():
            held[conn] = b"".join(parts)
    take = held.pop
    for conns, item in rooms:
        assert type(item) is bytes  # flush() returns frames only
        for conn in conns:
            transport = conn.out
            if transport is not None:
                # Once per member per turn: most have no reply held (no call then).
                transport.write(take(conn) + item if conn in held else item)
    for conn, item in held.items():
        transport = conn.out
        if transport is not None:
            transport.write(item)


def write(out: Iterable[Output]) -> None:
    """The engine's output onto the transports: the fan-out's hot loop.

    A frame goes to ``conn.out``, which the adapter sets exactly while frames may
    be written beside the Sans-I/O protocol (the transport, or the connection's
    own queue); replays are paced by the adapter; closes go through it.
    """
    for conns, item in out:
        if type(item) is bytes:
            for conn in conns:
                transport = conn.out
                if transport is not None:
                    transport.write(item)
        elif type(item) is Paced:
            payloads = item.payloads
            for conn in conns:
                conn.send_paced(text_frame(payload) for payload in payloads)
        elif type(item) is Close:
            for conn in conns:
                if item.fail:
                    conn.fail(item.code, item.reason)
                else:
                    conn.close(item.code, item.reason)
        elif type(item) is ApiResult:
            # A server call's answer: its token is the caller's callback
            # (core/apiinputs.py), told the seq, or None when not published.
            answer = item.token
            if callable(answer):
                answer(item.seq if item.ok else None)
