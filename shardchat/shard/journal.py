"""A shard's open connections and their rooms, kept for its successor.

With webhooks on, a shard appends one line per connect, join, leave and
disconnect to ``/dev/shm/shardchat.<supervisor pid>.hooks.<shard>`` (a file in
memory, swept with the box's other shared-memory names). A shard killed with
``kill -9`` cannot send the ``leave`` and ``disconnect`` events of its users;
the shard that takes its place (same id, started by the supervisor at once)
reads what its predecessor left open and sends them, with event ids derived
from the predecessor's pid and the connection, so a report made twice carries
the same ids. The file is rewritten from the live state when it outgrows it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import orjson

from shardchat.brokers.redis.hooks import death_id
from shardchat.brokers.segments import PREFIX, SHM_DIR

__all__ = ["Journal", "Leftover", "journal_path"]

COMPACT_AT = 1 << 20  # bytes; then rewritten from the live state, at least doubling


def journal_path(supervisor_pid: int, shard: int) -> Path:
    return Path(SHM_DIR) / f"{PREFIX}.{supervisor_pid}.hooks.{shard}"


class Leftover(NamedTuple):
    """A connection a dead shard left open: its id, user and rooms."""

    conn: int
    user: str
    rooms: tuple[str, ...]

    def event_id(self, pid: int, node: str, kind: str, room: str | None = None) -> str:
        """The same id whoever reports it, however many times. With the Redis broker
        (``node``: the dead shard's node name) the id other boxes would give the
        same report when they find the node gone."""
        if node:
            return death_id(node, self.user, kind, room or "")
        key = f"{pid}:{self.conn}:{kind}:{room or ''}".encode()
        return "evt_d" + hashlib.sha256(key).hexdigest()[:24]


def read_leftovers(path: Path) -> tuple[int, str, list[Leftover]]:
    """The predecessor's pid, its Redis node name (or ""), the connections it left open."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, "", []
    pid = 0
    node = ""
    conns: dict[int, tuple[str, list[str]]] = {}
    for line in data.splitlines():
        try:
            kind, conn, user, room = orjson.loads(line)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            continue  # a line cut by the kill
        if kind == "p":
            pid, node = conn, user
        elif kind == "o":
            conns[conn] = (user, [])
        elif kind == "c":
            conns.pop(conn, None)
        elif conn in conns:
            rooms = conns[conn][1]
            if kind == "j" and room not in rooms:
                rooms.append(room)
            elif kind == "l" and room in rooms:
                rooms.remove(room)
    return pid, node, [Leftover(c, user, tuple(rooms)) for c, (user, rooms) in conns.items()]


_KINDS = {"connect": "o", "join": "j", "leave": "l", "disconnect": "c"}


class Journal:
    """This shard's lines; :meth:`record` is called for each engine event."""

    def __init__(self, path: Path, node: str = "") -> None:
        self.path = path
        self.node = node  # the Redis broker's node name of this shard
        self.pid = os.getpid()
        self.size = 0
        self.compact_at = COMPACT_AT
        self.fd = -1
        self._rewrite([])

    def _rewrite(self, live: Iterable[tuple[int, str, tuple[str, ...]]]) -> None:
        lines = [orjson.dumps(["p", self.pid, self.node, ""])]
        for conn, user, rooms in live:
            lines.append(orjson.dumps(["o", conn, user, ""]))
            lines += [orjson.dumps(["j", conn, user, room]) for room in rooms]
        data = b"\n".join(lines) + b"\n"
        tmp = self.path.with_name(self.path.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        os.write(fd, data)
        os.replace(tmp, self.path)  # whole or not at all, whenever a kill comes
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.size = len(data)
        self.compact_at = max(COMPACT_AT, 2 * self.size)

    def record(self, kind: str, conn: int, user: str, room: str | None) -> bool:
        """Note an engine event; True when the file should be compacted."""
        letter = _KINDS.get(kind)
        if letter is None:
            return False
        line = orjson.dumps([letter, conn, user, room or ""]) + b"\n"
        os.write(self.fd, line)
        self.size += len(line)
        return self.size >= self.compact_at

    def compact(self, live: Iterable[tuple[int, str, tuple[str, ...]]]) -> None:
        self._rewrite(live)

    def close(self, *, remove: bool) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if remove:
            self.path.unlink(missing_ok=True)
