"""The engine/broker line holds for a broker that sequences rooms itself.

``StoreBroker`` sequences in a store, as the Redis broker does, without a
network: a shared store assigns each room's seq atomically with appending the
message to the room's stream (Redis: one script per batch), publishes are
batched per turn, and history comes from the store. The engine and its
callers are the same as with the shared-memory rings: only the broker differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from shardchat.brokers.presence_holders import answer_of
from shardchat.core import wire
from shardchat.core.admission import Upgrade
from shardchat.core.broker import BrokerListener, Holding, PresenceAnswer, Publication
from shardchat.core.engine import RoomEngine, after_input, end_turn
from shardchat.core.outputs import Close, Output, Paced
from shardchat.core.presence import PresenceView
from shardchat.hooks import Hooks
from shardchat.stats import BLOCK_SLOTS
from tests.core.box import config, frames_of


class Store:
    """One room -> seq counter and stream for the whole service."""

    def __init__(self) -> None:
        self.seqs: dict[str, int] = {}
        self.streams: dict[str, list[tuple[int, bytes]]] = {}
        self.brokers: list[StoreBroker] = []
        self.round_trips = 0
        self.presence = PresenceView()  # the service's one view, as a store would hold it

    def sequence(self, batch: list[Publication]) -> list[tuple[Publication, int, bytes]]:
        """Increment and append, atomically, for a whole batch: one round trip."""
        self.round_trips += 1
        out = []
        for p in batch:
            seq = self.seqs[p.room] = self.seqs.get(p.room, 0) + 1
            json = wire.message_json(p.room, p.sender, p.content, seq, p.timestamp, p.msg_id)
            self.streams.setdefault(p.room, []).append((seq, json))
            out.append((p, seq, json))
        return out


class StoreBroker:
    def __init__(self, store: Store, engine_id: int) -> None:
        self.store = store
        self.engine_id = engine_id
        self.listener: BrokerListener | None = None
        self.batch: list[Publication] = []
        store.brokers.append(self)

    def publish(self, publication: Publication, now: float) -> None:
        self.batch.append(publication)  # one pipeline per turn

    def full(self, room: str) -> None:
        return None  # unbounded here

    @property
    def commit_due(self) -> bool:
        return bool(self.batch)

    def commit(self) -> None:
        """The turn's end: one pipeline for the turn's publishes."""
        batch, self.batch = self.batch, []
        if not batch:
            return
        for p, seq, json in self.store.sequence(batch):
            for broker in self.store.brokers:
                assert broker.listener is not None
                broker.listener.on_message(p.room, seq, p.msg_id, json, p.publish_ns)
            assert self.listener is not None
            self.listener.on_published(p.msg_id, p.room, seq)

    def announce(self, room: str, user: str, joined: bool, info: str | None = None) -> None:
        view = self.store.presence
        if view.change(room, user, self.engine_id, joined):
            for broker in self.store.brokers:
                if broker.listener is not None:
                    broker.listener.on_presence_event(room, user, joined, view.count(room))

    def presence(
        self, room: str, user: str, limit: int, then: Callable[[PresenceAnswer | None], None]
    ) -> PresenceAnswer | None:
        """The store holds every room's presence: answered at once."""
        return answer_of(self.store.presence.present.get(room, {}), user, limit, 1 << 20)

    def snapshot(self, peer: int, pairs: list[tuple[str, str]]) -> None:
        raise AssertionError("no engine resets in these tests")

    def fill(self, room: str, first: int, last: int) -> None:
        assert self.listener is not None
        stream = [(s, j) for s, j in self.store.streams.get(room, []) if first <= s <= last]
        if not stream or stream[0][0] > first:
            self.listener.on_replay_lost(room, (stream[0][0] - 1) if stream else last)
        for seq, json in stream:
            self.listener.on_replay(room, seq, json)
        self.listener.on_replay_end(room, last)

    def latest_seq(self, room: str) -> int | None:
        return self.store.seqs.get(room)

    def serves_history(self, room: str) -> bool:
        return False  # the store does

    def holding(self, room: str) -> Holding:
        return Holding.EVERY  # each engine its own copy, as with Redis

    def catch_up(self) -> None:
        """Deliveries are synchronous here: nothing waits."""

    def open_room(self, room: str, then: Callable[[], None]) -> bool:
        return True

    def close_room(self, room: str) -> None:
        pass

    def epoch_of(self, room: str) -> str | None:
        return None


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[dict[str, Any]] = []
        self.closed: Close | None = None


def run(engine: RoomEngine[Conn], step: Callable[[], None]) -> None:
    engine.advance(1000.0, 1.8e9)
    step()
    collect(after_input(engine, broker_of(engine)))


def broker_of(engine: RoomEngine[Conn]) -> StoreBroker:
    broker = engine.broker.broker
    assert isinstance(broker, StoreBroker)
    return broker


def collect(out: list[Output[Conn]]) -> None:
    for conns, item in out:
        for conn in conns:
            if isinstance(item, Close):
                conn.closed = item
            elif isinstance(item, Paced):
                conn.frames += [orjson.loads(payload) for payload in item.payloads]
            else:
                conn.frames += frames_of(item)


def turn(engines: list[RoomEngine[Conn]]) -> None:
    """Each engine's turn end (``end_turn``), twice: the second round delivers
    what the others' commits sent it."""
    for _ in range(2):
        for engine in engines:
            replies, rooms = end_turn(engine, broker_of(engine))
            collect(replies)
            collect(rooms)


def connect(engine: RoomEngine[Conn], user: str, conn_id: int) -> Conn:
    conn = Conn(user)
    upgrade = Upgrade(conn_id, "127.0.0.1", f"/ws?user={user}", f"user={user}", {})
    run(engine, lambda: engine.admit(conn, upgrade, 1))
    run(engine, lambda: engine.open(conn))
    return conn


def send(engine: RoomEngine[Conn], conn: Conn, **obj: object) -> None:
    run(engine, lambda: engine.receive(conn, wire.encode(dict(obj))))


def test_a_store_sequenced_broker_serves_the_same_engine() -> None:
    store = Store()
    brokers = [StoreBroker(store, i) for i in range(2)]
    engines: list[RoomEngine[Conn]] = []
    for i, broker in enumerate(brokers):
        engine: RoomEngine[Conn] = RoomEngine(
            config(), i, "epoch-s", broker, [0] * BLOCK_SLOTS, Hooks(None), id_prefix=f"s{i}"
        )
        broker.listener = engine.inbox
        engines.append(engine)
    a = connect(engines[0], "a", 1)
    b = connect(engines[1], "b", 2)
    send(engines[0], a, type="join", room="r")
    send(engines[1], b, type="join", room="r")
    for i in range(3):
        send(engines[0], a, type="message", room="r", content=f"a{i}", id=f"a{i}")
        send(engines[1], b, type="message", room="r", content=f"b{i}", id=f"b{i}")
    turn(engines)
    assert store.round_trips == 2  # one batch per engine per turn
    for conn in (a, b):
        msgs = [f for f in conn.frames if f["type"] == "message"]
        assert [m["seq"] for m in msgs] == [1, 2, 3, 4, 5, 6]
        assert [m["content"] for m in msgs] == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert [f["seq"] for f in a.frames if f["type"] == "ack"] == [1, 2, 3]
    assert [f["seq"] for f in b.frames if f["type"] == "ack"] == [4, 5, 6]
    joined = [f for f in b.frames if f["type"] == "joined"][0]
    assert joined["count"] == 2  # a's join reached b's engine through the broker

    # A newcomer whose engine holds no copy of the room resumes from the store.
    engines[1].logs.pop("r")
    c = connect(engines[1], "c", 3)
    send(engines[1], c, type="join", room="r", since=2, epoch="epoch-s")
    joined = [f for f in c.frames if f["type"] == "joined"][0]
    assert joined["recovered"] and joined["seq"] == 6
    assert [f["seq"] for f in c.frames if f["type"] == "message"] == [3, 4, 5, 6]


class OpeningBroker(StoreBroker):
    """A broker that carries only the rooms it is asked for, with a room epoch of
    its own (the Redis broker's shape): a room opens later, not at once."""

    def __init__(self, store: Store, engine_id: int) -> None:
        super().__init__(store, engine_id)
        self.opening: dict[str, list[Callable[[], None]]] = {}
        self.open: set[str] = set()
        self.closed: list[str] = []
        self.epochs: dict[str, str] = {}

    def open_room(self, room: str, then: Callable[[], None]) -> bool:
        if room in self.open:
            return True
        self.opening.setdefault(room, []).append(then)
        return False

    def opened(self, room: str) -> None:
        self.open.add(room)
        for then in self.opening.pop(room):
            then()

    def close_room(self, room: str) -> None:
        self.open.discard(room)
        self.closed.append(room)

    def epoch_of(self, room: str) -> str | None:
        return self.epochs.get(room)


def test_a_join_waits_for_its_broker_to_open_the_room_and_a_new_epoch_restarts_it() -> None:
    store = Store()
    broker = OpeningBroker(store, 0)
    broker.epochs["r"] = "e1"
    engine: RoomEngine[Conn] = RoomEngine(
        config(), 0, "engine-epoch", broker, [0] * BLOCK_SLOTS, Hooks(None), id_prefix="o"
    )
    broker.listener = engine.inbox
    a = connect(engine, "a", 1)
    send(engine, a, type="join", room="r", id="j1")
    assert not [f for f in a.frames if f["type"] == "joined"]  # not before the room is open
    run(engine, lambda: broker.opened("r"))
    (joined,) = [f for f in a.frames if f["type"] == "joined"]
    assert joined["epoch"] == "e1"  # the broker's epoch of the room, not the engine's
    send(engine, a, type="message", room="r", content="x")
    turn([engine])
    assert [f["seq"] for f in a.frames if f["type"] == "message"] == [1]

    # The store lost the room: a new epoch. The member is closed to rejoin.
    broker.epochs["r"] = "e2"
    run(engine, lambda: engine.inbox.on_room_state("r", "e2", 0))
    assert a.closed is not None and a.closed.code == 1012
    run(engine, lambda: engine.closed(a, 1012, ""))
    assert broker.closed == ["r"]  # its last member left
    b = connect(engine, "b", 2)
    send(engine, b, type="join", room="r", since=1, epoch="e1")
    run(engine, lambda: broker.opened("r"))
    (joined,) = [f for f in b.frames if f["type"] == "joined"]
    assert joined["epoch"] == "e2" and joined["recovered"] is False
