"""Who holds a room's presence on one box, and what a holder keeps. Pure: no I/O.

docs/ARCHITECTURE.md, One box. A room's
presence (room -> user -> shards) is held by two shards only: its owner
(:func:`~shardchat.brokers.sequencer.owner_of`) and one replica, the next
shard (:func:`holders_of`). Every other shard keeps only its own local
counts (the engine's :class:`~shardchat.core.presence.LocalPresence`), so
each (room, user) is stored at most twice in a box, whatever the number of
shards.

Every shard still announces its first and last local connection of a user in
a room (a PRESENCE record, read by every shard), but only holders apply it.
The owner alone turns a change into a join or leave event, which it writes
on its ring for every shard to deliver: events reach everyone in the owner's
ring order.

The replica also reads the owner's events and keeps, for the owner's rooms,
only where what members were last told differs from its own view
(:attr:`HolderState.told`: empty in steady state). When the owner dies, the
replica has the full view and knows what members believe; it answers
queries meanwhile (from what members were told, so that answers agree with
the events everyone saw) and, on the owner's RESET, hands that belief to the
restarted owner (a TOLD stream), which emits the events that make members'
belief equal to the view, and resumes as holder.

A restarted holder rebuilds before it answers or emits anything
(:meth:`HolderState.begin_rebuild`): each peer's SNAPSHOT (its local pairs,
sent on reading our RESET) gives that peer's bit exactly, since the peer's
announcements we read before its snapshot are already in it; the co-holder's
TOLD gives what members were told. Once all are in (or after
:data:`REBUILD_TIMEOUT`, if a peer never answers), the holder is ready.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from shardchat.brokers.sequencer import owner_of
from shardchat.core.broker import PresenceAnswer as Answer
from shardchat.core.presence import PresenceView

__all__ = [
    "QUERY_RETRY",
    "REBUILD_TIMEOUT",
    "Answer",
    "Event",
    "HolderState",
    "Queries",
    "holders_of",
]

QUERY_RETRY = 0.5  # seconds before a query unanswered by the owner goes to the replica
REBUILD_TIMEOUT = 5.0  # seconds a restarted holder waits for its peers' snapshots at most


def holders_of(room: str, workers: int) -> tuple[int, int]:
    """The room's owner and its replica (the same shard when there is one worker)."""
    owner = owner_of(room, workers)
    return owner, (owner + 1) % workers


class Event(NamedTuple):
    """The owner's view says ``user`` became present (``joined``) or absent."""

    room: str
    user: str
    joined: bool
    total: int  # the room's users after the change, for presence.events_limit


def answer_of(
    users: Iterable[str],
    user: str,
    limit: int,
    budget: int,
    infos: Mapping[str, str] | None = None,
) -> Answer:
    """At most ``limit`` names and ``budget`` bytes of them (a ring record's
    limit), with the listed users' info from ``infos`` while it fits too."""
    listed: list[str] = []
    info: dict[str, str] = {}
    count = 0
    has = False
    for name in users:
        count += 1
        if name == user:
            has = True
        if len(listed) < limit:
            size = len(name.encode()) + 8  # quotes, comma, room for escapes
            if size <= budget:
                listed.append(name)
                budget -= size
                said = infos.get(name) if infos else None
                if said is not None:
                    # Its name again, quoted, and the info as a JSON string
                    # (escaped: at most twice as long, and some room).
                    extra = size + 2 * len(said.encode()) + 8
                    if extra <= budget:
                        info[name] = said
                        budget -= extra
            else:
                limit = len(listed)  # full: list no more
    return Answer(count, listed, len(listed) < count, has, info or None)


class HolderState:
    """The rooms one shard holds (as owner or replica): their view, and for the
    replicated ones where members' belief differs from it."""

    def __init__(self, shard: int, workers: int) -> None:
        self.shard = shard
        self.workers = workers
        self.view = PresenceView()  # held rooms only
        # Held rooms: room -> user -> the latest join's connect-proxy info (JSON),
        # for present users that have one.
        self.infos: dict[str, dict[str, str]] = {}
        # Replicated rooms: room -> user -> told present, only where told != view.
        self.told: dict[str, dict[str, bool]] = {}
        self.ready = True
        self.waiting: set[int] = set()  # peers whose SNAPSHOT end we wait for
        self.waiting_told: set[int] = set()  # co-holders whose TOLD end we wait for
        self._rebuild_told: dict[str, set[str]] = {}  # what co-holders said members were told

    def holds(self, room: str) -> bool:
        owner = owner_of(room, self.workers)
        return owner == self.shard or (owner + 1) % self.workers == self.shard

    def owns(self, room: str) -> bool:
        return owner_of(room, self.workers) == self.shard

    def co_holders(self) -> set[int]:
        """The shards that hold rooms with us: our replica and the owner we replicate."""
        return {(self.shard + 1) % self.workers, (self.shard - 1) % self.workers} - {self.shard}

    # Announcements and events

    def announce(
        self, peer: int, room: str, user: str, joined: bool, info: str | None = None
    ) -> list[Event]:
        """``peer`` announced a first or last local connection, or a join with
        ``info`` (the latest join's info wins); the events to emit."""
        if not self.holds(room) or (not self.ready and peer in self.waiting):
            return []  # not ours, or the peer's coming snapshot holds it already
        if joined and info is not None:
            self.infos.setdefault(room, {})[user] = info
        if not self.view.change(room, user, peer, joined):
            return []
        if not joined:
            self._forget(room, user)
        return self._changed(room, user, joined)

    def _forget(self, room: str, user: str) -> None:
        """``user`` is absent from ``room``: its info goes with it."""
        infos = self.infos.get(room)
        if infos is not None and infos.pop(user, None) is not None and not infos:
            del self.infos[room]

    def _changed(self, room: str, user: str, joined: bool) -> list[Event]:
        if not self.ready:
            return []  # rebuilding: the events come once we know what members were told
        if self.owns(room):
            return [Event(room, user, joined, self.view.count(room))]
        # Members' belief did not move: remember where it now differs.
        told = self.told.setdefault(room, {})
        belief = told.pop(user, not joined)
        if belief != joined:
            told[user] = belief
        elif not told:
            del self.told[room]
        return []

    def event(self, peer: int, room: str, user: str, joined: bool) -> None:
        """The owner ``peer`` told members ``user`` joined or left (its event record)."""
        if owner_of(room, self.workers) != peer or not self.holds(room) or self.owns(room):
            return
        if not self.ready:
            if peer not in self.waiting_told:  # after its TOLD: follow it
                said = self._rebuild_told.setdefault(room, set())
                if joined:
                    said.add(user)
                else:
                    said.discard(user)
            return
        told = self.told.setdefault(room, {})
        if joined == self.view.has(room, user):
            told.pop(user, None)
        else:
            told[user] = joined
        if not told:
            del self.told[room]

    def drop_shard(self, peer: int) -> list[Event]:
        """``peer`` restarted: its users are gone; the events to emit."""
        self.waiting.discard(peer)  # a new incarnation has no local users yet
        self.waiting_told.discard(peer)
        events = []
        for room, user in self.view.drop_shard(peer):
            self._forget(room, user)
            events += self._changed(room, user, False)
        if not self.ready:
            events += self._check_ready()
        return events

    # Answers

    def believed(self, room: str) -> Iterable[str]:
        """The room's users as members were told (the owner: its view)."""
        users = self.view.present.get(room, {})
        told = self.told.get(room)
        if not told:
            return users.keys()
        return [u for u in users if told.get(u, True)] + [
            u for u, present in told.items() if present and u not in users
        ]

    def answer(self, room: str, user: str, limit: int, budget: int) -> Answer | None:
        """None while rebuilding (the asker waits, or asks the other holder)."""
        if not self.ready:
            return None
        return answer_of(self.believed(room), user, limit, budget, self.infos.get(room))

    def told_for(self, peer: int) -> list[tuple[str, str]]:
        """What members were told of every room both we and ``peer`` hold (for its
        rebuild after a restart)."""
        if peer not in self.co_holders():
            return []
        workers = self.workers
        rooms = set(self.view.present) | set(self.told)
        pairs = []
        for room in rooms:
            owner = owner_of(room, workers)
            if peer in (owner, (owner + 1) % workers):
                pairs += [(room, user) for user in self.believed(room)]
        return pairs

    # Rebuilding after a restart

    def begin_rebuild(self, peers: Iterable[int]) -> None:
        self.waiting = set(peers)
        self.waiting_told = self.co_holders()
        self._rebuild_told = {}
        self.ready = not self.waiting

    def snapshot(self, peer: int, pairs: list[tuple[str, str]]) -> list[Event]:
        """A chunk of ``peer``'s local pairs for us; an empty one ends it."""
        if self.ready or peer not in self.waiting:
            # Late (we gave up waiting): as announcements, which they are by then.
            events = []
            for room, user in pairs:
                events += self.announce(peer, room, user, True)
            return events
        for room, user in pairs:
            if self.holds(room):
                self.view.change(room, user, peer, True)
        if not pairs:
            self.waiting.discard(peer)
        return self._check_ready()

    def told_chunk(self, peer: int, pairs: list[tuple[str, str]]) -> list[Event]:
        """A chunk of what a co-holder says members were told; an empty one ends it."""
        if self.ready or peer not in self.waiting_told:
            # Late (we gave up waiting): members still believe these users present.
            return [
                Event(room, user, False, self.view.count(room))
                for room, user in pairs
                if self.owns(room) and not self.view.has(room, user)
            ]
        for room, user in pairs:
            self._rebuild_told.setdefault(room, set()).add(user)
        if not pairs:
            self.waiting_told.discard(peer)
        return self._check_ready()

    def give_up(self) -> list[Event]:
        """Peers that never answered: go on with what we have."""
        self.waiting.clear()
        self.waiting_told.clear()
        return self._check_ready()

    def _check_ready(self) -> list[Event]:
        if self.waiting or self.waiting_told:
            return []
        self.ready = True
        told, self._rebuild_told = self._rebuild_told, {}
        events = []
        view = self.view.present
        for room in set(view) | set(told):
            users = view.get(room, {})
            believed = told.get(room, set())
            if self.owns(room):
                # Make members' belief equal to the view: leaves first, then joins.
                gone = [u for u in believed if u not in users]
                new = [u for u in users if u not in believed]
                count = len(users)
                events += [Event(room, u, False, count) for u in gone]
                events += [Event(room, u, True, count) for u in new]
            else:
                differ = {u: False for u in users if u not in believed}
                differ.update({u: True for u in believed if u not in users})
                if differ:
                    self.told[room] = differ
        return events


class Pending(NamedTuple):
    room: str
    user: str
    limit: int
    target: int
    asked: float  # when it was last sent
    deadline: float  # then it fails: unavailable


class Queries:
    """A non-holder's queries in flight: to the owner, then the replica, then failed."""

    def __init__(self, workers: int, timeout: float) -> None:
        self.workers = workers
        self.timeout = timeout
        self.retry = min(QUERY_RETRY, timeout / 4)
        self.pending: dict[int, Pending] = {}
        self._next = 0

    def ask(self, room: str, user: str, limit: int, now: float) -> tuple[int, int]:
        """A new query id and the shard to send it to (the owner)."""
        self._next += 1
        owner = owner_of(room, self.workers)
        self.pending[self._next] = Pending(room, user, limit, owner, now, now + self.timeout)
        return self._next, owner

    def answered(self, qid: int) -> bool:
        return self.pending.pop(qid, None) is not None

    def due(self, now: float) -> tuple[list[tuple[int, Pending]], list[int]]:
        """Queries to send again (to the other holder) and queries that failed."""
        again, failed = [], []
        for qid, p in list(self.pending.items()):
            if now >= p.deadline:
                del self.pending[qid]
                failed.append(qid)
            elif now - p.asked >= self.retry:
                owner, replica = holders_of(p.room, self.workers)
                target = replica if p.target == owner else owner
                p = self.pending[qid] = p._replace(target=target, asked=now)
                again.append((qid, p))
        return again, failed

    def reset(self, peer: int, now: float) -> list[tuple[int, Pending]]:
        """``peer`` restarted: what was asked of it, asked again (of it)."""
        again = []
        for qid, p in self.pending.items():
            if p.target == peer:
                again.append((qid, p._replace(asked=now)))
        self.pending.update(again)
        return again

    def next_deadline(self) -> float | None:
        if not self.pending:
            return None
        return min(min(p.asked + self.retry, p.deadline) for p in self.pending.values())
