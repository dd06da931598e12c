"""A box in one process: several room engines, each with its shared-memory broker
over plain bytearrays, standing for the shards of a server.

Nothing here does I/O: rings are memoryviews of bytearrays, doorbells count
their posts, time is a number the test moves. A test connects clients to
shards, feeds them requests, runs loop turns (:meth:`Box.turn`: commit, flush,
deliver every ring until the box is quiet) and reads what each client
received, frame by frame.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from shardchat.addrtable import AddrTable, PeerTable, table_capacity
from shardchat.auth import verifier_from_config
from shardchat.brokers.shm import ShmBroker
from shardchat.configload import load_config
from shardchat.core.admission import Refusal, Upgrade
from shardchat.core.config import Config
from shardchat.core.engine import RoomEngine, after_input, end_turn
from shardchat.core.outputs import Close, Output, Paced
from shardchat.hooks import Hooks
from shardchat.ring.layout import segment_size
from shardchat.ring.ring import init_ring
from shardchat.ring.seqtable import SLOT_SIZE
from shardchat.stats import BLOCK_SLOTS
from shardchat.testing.rawws import OP_TEXT, parse_frames
from shardchat.testing.rooms import room_owned_by

__all__ = ["Box", "Client", "config", "covered", "frames_of", "room_owned_by"]

RING = 1 << 16  # the smallest ring the config allows
TABLE = 256  # seq table slots per shard


def config(**settings: object) -> Config:
    """The defaults, with ``settings`` given as ``section__key=value``."""
    return load_config(overrides={k.replace("__", "."): v for k, v in settings.items()}, environ={})


def frames_of(buf: bytes) -> list[dict[str, Any]]:
    """The JSON objects of the unmasked text frames in ``buf``."""
    frames, used = parse_frames(buf)
    assert used == len(buf) and all(op == OP_TEXT for op, _ in frames), "whole text frames"
    return [orjson.loads(payload) for _, payload in frames]


class Bell:
    """A doorbell that counts its posts."""

    def __init__(self) -> None:
        self.posts = 0

    def ring(self) -> None:
        self.posts += 1

    def wait(self, timeout: float) -> bool:
        return False

    def absorb(self) -> None:
        self.posts = 0


@dataclass(eq=False)
class Client:
    """One connection: what it received and how it was closed."""

    name: str
    shard: int
    frames: list[dict[str, Any]] = field(default_factory=list)
    closed: Close | None = None

    def __hash__(self) -> int:
        return id(self)

    def take(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The frames received so far (of ``kind`` only, if given), forgotten after."""
        got = [f for f in self.frames if kind is None or f["type"] == kind]
        self.frames = [f for f in self.frames if f not in got]
        return got

    def seqs(self, room: str) -> list[int]:
        return [f["seq"] for f in self.frames if f["type"] == "message" and f["room"] == room]


class Box:
    """``workers`` engines wired by their rings; ``stopped`` shards read nothing."""

    def __init__(self, workers: int = 3, cfg: Config | None = None, app: object = None) -> None:
        self.config = cfg if cfg is not None else config()
        self.workers = workers
        self.app = app
        self.now = 1000.0
        self.wall = 1_800_000_000.0
        size = segment_size(RING, TABLE, SLOT_SIZE)
        self.segments = [memoryview(bytearray(size)) for _ in range(workers)]
        for view in self.segments:
            init_ring(view, RING, TABLE)
        self.bells = [Bell() for _ in range(workers)]
        self.stats = [[0] * BLOCK_SLOTS for _ in range(workers)]
        # The whole server's connections per address, as in the stats segment.
        server = self.config.server
        capacity = table_capacity(server.max_per_ip, server.max_connections, workers)
        self._addr_slots = (
            memoryview(bytearray(8 * AddrTable.slots_needed(workers, capacity))).cast("Q")
            if capacity
            else None
        )
        self._capacity = capacity
        self.engines: list[RoomEngine[Client]] = []
        self.brokers: list[ShmBroker] = []
        self.stopped: set[int] = set()
        self.unaddressed: list[object] = []  # outputs for no connection, in order
        self._ids = itertools.count(1)
        self._guests = itertools.count(1)  # guest names in order, not random
        for shard in range(workers):
            engine, broker = self._engine(shard)
            self.engines.append(engine)
            self.brokers.append(broker)
        for shard in range(workers):
            self._start(shard)
        self.turn()

    def _engine(self, shard: int) -> tuple[RoomEngine[Client], ShmBroker]:
        broker = ShmBroker(
            shard,
            self.segments,
            RING,
            TABLE,
            self.bells,
            self.stats[shard],
            self.config.delivery.publish_timeout,
            overload=self.config.overload,
        )
        slots = self._addr_slots
        peers = (
            None
            if slots is None
            else PeerTable(AddrTable(slots, self.workers, self._capacity, shard))
        )
        verifier = verifier_from_config(self.config.auth)
        return RoomEngine(
            self.config,
            shard,
            "epoch-1",
            broker,
            self.stats[shard],
            Hooks(self.app, guest_name=lambda: f"guest-{next(self._guests):04x}"),
            verify=None if verifier is None else verifier.verify,
            peers=peers,
            id_prefix=f"i{next(self._ids)}",
        ), broker

    def _start(self, shard: int) -> None:
        engine = self.engines[shard]
        engine.advance(self.now, self.wall)
        self.brokers[shard].recover(engine.inbox, self.now)
        self.settle(shard)

    def restart(self, shard: int) -> None:
        """kill -9 and restart: records not committed are lost with the process;
        its clients are gone without a word."""
        for client in list(self.engines[shard].conns):
            client.closed = Close(1006, "")
        self.engines[shard], self.brokers[shard] = self._engine(shard)
        self.stopped.discard(shard)
        self._start(shard)

    # Clients

    def connect(
        self,
        shard: int,
        user: str,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        peer: str = "127.0.0.1",
    ) -> Client:
        """A client upgraded on ``shard``, its welcome (and query joins) taken."""
        client = self.upgrade(shard, user, query, headers, peer)
        assert not isinstance(client, Refusal), client
        return client

    def upgrade(
        self,
        shard: int,
        user: str,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        peer: str = "127.0.0.1",
    ) -> Client | Refusal:
        engine = self.engines[shard]
        engine.advance(self.now, self.wall)
        client = Client(user, shard)
        q = f"user={user}" + (f"&{query}" if query else "") if user else query
        upgrade = Upgrade(next(self._ids), peer, f"/ws?{q}", q, dict(headers or {}))
        connections = sum(s[2] for s in self.stats) + 1  # the gauges, this handshake
        refusal = engine.admit(client, upgrade, connections)
        self.settle(shard)
        if refusal is not None:
            return refusal
        engine.open(client)
        self.settle(shard)
        self.turn()
        assert client.take("welcome")
        return client

    def send(self, client: Client, **obj: object) -> None:
        self.send_raw(client, orjson.dumps(obj))

    def publish(self, client: Client, room: str, count: int, prefix: str = "") -> None:
        """``count`` messages from ``client`` to ``room``, ``prefix`` then 0, 1, ...
        as their content (the turn not ended)."""
        for i in range(count):
            self.send(client, type="message", room=room, content=f"{prefix}{i}")

    def lap(self, shard: int, client: Client, room: str, count: int) -> None:
        """``count`` messages of ~600 bytes from ``client`` to ``room``, a turn each,
        while ``shard`` does not read: its reader is lapped (300 are about three
        rings). ``shard`` is stopped only meanwhile."""
        self.stopped.add(shard)
        for i in range(count):
            self.send(client, type="message", room=room, content=f"{i}:" + "y" * 500)
            self.turn()
        self.stopped.discard(shard)

    def send_raw(self, client: Client, data: bytes) -> None:
        engine = self.engines[client.shard]
        engine.advance(self.now, self.wall)
        engine.receive(client, data)
        self.settle(client.shard)

    def close(self, client: Client, code: int = 1000) -> None:
        engine = self.engines[client.shard]
        engine.advance(self.now, self.wall)
        engine.closed(client, code, "")
        self.settle(client.shard)

    def join(self, client: Client, room: str, **fields: object) -> dict[str, Any]:
        self.send(client, type="join", room=room, **fields)
        self.turn()
        (joined,) = client.take("joined")
        return joined

    # Turns and time

    def commit(self, shard: int) -> None:
        """Only the first step of a turn's end: the broker commits (and acks)."""
        self.brokers[shard].commit()
        self.settle(shard)

    def turn(self) -> None:
        """Loop turns on every running shard until nothing moves: the turn's end
        (the shard's own, ``end_turn``), then read the rings."""
        for _ in range(1000):
            moved = False
            for shard, (engine, broker) in enumerate(zip(self.engines, self.brokers, strict=True)):
                if shard in self.stopped:
                    continue
                engine.advance(self.now, self.wall)
                if engine.turn_due or broker.commit_due:
                    moved = True
                    replies, rooms = end_turn(engine, broker)
                    self._collect(replies)
                    self._collect(rooms)
            for shard, (engine, broker) in enumerate(zip(self.engines, self.brokers, strict=True)):
                if shard in self.stopped:
                    continue
                engine.advance(self.now, self.wall)
                read = broker.stats[15]
                more = broker.read_peers(self.now)
                out = after_input(engine, broker)
                self._collect(out)
                moved = moved or more or broker.stats[15] != read or bool(out) or engine.turn_due
            if not moved:
                return
        raise AssertionError("the box never settled")

    def settle(self, shard: int) -> None:
        """What follows an input: the engine's commands run, the answers applied,
        the outputs collected (``after_input``, as the shard does)."""
        self._collect(after_input(self.engines[shard], self.brokers[shard]))

    def advance(self, seconds: float) -> None:
        """Move the clock, tick every running engine and broker, settle."""
        self.now += seconds
        self.wall += seconds
        for shard, (engine, broker) in enumerate(zip(self.engines, self.brokers, strict=True)):
            if shard in self.stopped:
                continue
            engine.advance(self.now, self.wall)
            engine.tick()
            broker.tick(self.now)
            self.settle(shard)
        self.turn()

    def _collect(self, out: list[Output[Client]]) -> None:
        for clients, item in out:
            if clients == ():
                self.unaddressed.append(item)  # for no connection (a server call's result)
            for client in clients:
                if client.closed is not None:
                    continue
                if isinstance(item, Close):
                    client.closed = item
                    engine = self.engines[client.shard]
                    if client in engine.conns:
                        # The adapter's close completes: the engine hears of it.
                        engine.closed(client, item.code, item.reason)
                elif isinstance(item, Paced):
                    client.frames += [orjson.loads(payload) for payload in item.payloads]
                else:
                    client.frames += frames_of(item)


def covered(client: Client, room: str) -> list[int]:
    """The seqs of ``room`` that ``client``'s messages and ``gap`` frames account
    for, in the order received."""
    seqs: list[int] = []
    for f in client.frames:
        if f.get("room") != room:
            continue
        if f["type"] == "message":
            seqs.append(f["seq"])
        elif f["type"] == "gap":
            seqs += range(f["first"], f["last"] + 1)
    return seqs


class Fills:
    """A broker that only records the ranges asked for (for the parts that fill)."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int]] = []

    def fill(self, room: str, first: int, last: int) -> None:
        self.asked.append((first, last))

    def latest_seq(self, room: str) -> int | None:
        return None

    def epoch_of(self, room: str) -> str | None:
        return None


def published_room(box: Box, count: int, user: str = "c") -> tuple[str, Client]:
    """A room owned by shard 0 and ``user``, its member on shard 1, who published
    ``count`` messages to it (content 0, 1, ...); the turn ended."""
    room = room_owned_by(0, box.workers)
    client = box.connect(1, user)
    box.join(client, room)
    box.publish(client, room, count)
    box.turn()
    return room, client


def owner_and_peer(box: Box, on_owner: str | None = "watcher") -> tuple[str, Client, Client]:
    """A room owned by shard 0, a member there (``on_owner``, unless None) and
    ``bob``, a member on shard 1."""
    room = room_owned_by(0, box.workers)
    first = box.connect(0, on_owner) if on_owner is not None else Client("none", 0)
    if on_owner is not None:
        box.join(first, room)
    bob = box.connect(1, "bob")
    box.join(bob, room)
    return room, first, bob
