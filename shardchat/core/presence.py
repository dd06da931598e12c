"""Who is in which room, across shards. Pure: no I/O.

Each engine counts its own connections per (room, user)
(:class:`LocalPresence`) and announces, through its broker, a user's first
connection in a room and its last one. A broker's holders of a room apply
those announcements to a :class:`PresenceView` (on one box: the room's owner
and one replica, :mod:`shardchat.brokers.presence_holders`; with Redis: every
node for its open rooms). A user is present while any engine has a
connection of theirs in the room. :meth:`PresenceView.change` returns
whether a user just became present or absent, which the holder turns into
events.

Which shards a user is
present on is a bit mask in an int, not a set: a set of one shard is a 216-byte
object per user per room per shard, where a mask below 2**8 is one of
CPython's preallocated small ints, stored as a reference in the user's dict
slot. Engine ids are
not bit positions (the Redis broker numbers other nodes' engines from 2**16):
each engine gets the lowest free bit when first heard of, and gives it back
when it is dropped, so that masks stay small ints.
"""

from __future__ import annotations

__all__ = ["LocalPresence", "PresenceView"]


class PresenceView:
    def __init__(self) -> None:
        self.present: dict[str, dict[str, int]] = {}  # room -> user -> mask of shards
        self._bits: dict[int, int] = {}  # engine id -> its bit in the masks
        self._free: list[int] = []  # bit positions of dropped engines, to reuse

    def users(self, room: str) -> list[str]:
        return list(self.present.get(room, ()))

    def count(self, room: str) -> int:
        return len(self.present.get(room, ()))

    def has(self, room: str, user: str) -> bool:
        return user in self.present.get(room, ())

    def change(self, room: str, user: str, shard: int, joined: bool) -> bool:
        """Apply one shard's announcement; True when the user became present
        (``joined``) or absent (not ``joined``) in the room."""
        users = self.present.get(room)
        bit = self._bits.get(shard, 0)
        if not bit:
            if not joined:
                return False
            position = self._free.pop() if self._free else len(self._bits)
            bit = self._bits[shard] = 1 << position
        if joined:
            if users is None:
                users = self.present[room] = {}
            shards = users.get(user, 0)
            users[user] = shards | bit
            return not shards
        if users is None:
            return False
        shards = users.get(user, 0)
        if not shards & bit:
            return False
        shards &= ~bit
        if shards:
            users[user] = shards
            return False
        del users[user]
        if not users:
            del self.present[room]
        return True

    def drop_shard(self, shard: int) -> list[tuple[str, str]]:
        """A shard restarted: its users are gone. The (room, user) that became absent."""
        gone = []
        bit = self._bits.get(shard, 0)
        if bit:
            for room in list(self.present):
                for user in [u for u, shards in self.present[room].items() if shards & bit]:
                    if self.change(room, user, shard, False):
                        gone.append((room, user))
            # No mask has the bit any more: another engine may take it.
            del self._bits[shard]
            self._free.append(bit.bit_length() - 1)
        return gone


class LocalPresence:
    """An engine's own connections per (room, user): per connection, flat in the
    number of shards."""

    def __init__(self) -> None:
        self.local: dict[str, dict[str, int]] = {}  # room -> user -> our connections

    def local_join(self, room: str, user: str) -> bool:
        """One more of our connections of ``user`` in ``room``; True on the first,
        which is to be announced to the other shards."""
        local = self.local.setdefault(room, {})
        count = local.get(user, 0)
        local[user] = count + 1
        return count == 0

    def local_leave(self, room: str, user: str) -> bool:
        """One fewer; True on the last, which is to be announced."""
        local = self.local.get(room)
        if local is None or user not in local:
            return False
        count = local[user] - 1
        if count:
            local[user] = count
            return False
        del local[user]
        if not local:
            del self.local[room]
        return True

    def local_pairs(self) -> list[tuple[str, str]]:
        """Our own (room, user) pairs, for a snapshot to a restarted peer."""
        return [(room, user) for room, users in self.local.items() for user in users]
