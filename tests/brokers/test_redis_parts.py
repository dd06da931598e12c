"""The Redis broker's parts that need no Redis: names, channels, the client it
builds (redis-py connects lazily), the pipeline bound, and what a channel brings.

The broker is built but never started: nothing here opens a connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from shardchat.brokers.redis import wire as rw
from shardchat.brokers.redis.broker import RedisBroker
from shardchat.brokers.redis.client import _host_port, connect_client
from shardchat.brokers.redis.nodes import PEER_BASE, node_name
from shardchat.brokers.redis.rooms import Room, new_epoch
from shardchat.brokers.redis.subscriber import _room_of
from shardchat.core.broker import Publication
from shardchat.core.overload import Queue
from shardchat.stats import BLOCK_SLOTS
from tests.core.box import config


class Heard:
    """A listener that keeps what the broker tells it."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, int, str, bytes]] = []
        self.states: list[tuple[str, str, int]] = []
        self.events: list[tuple[str, str, bool, int]] = []

    def on_message(self, room: str, seq: int, msg_id: str, json: bytes, publish_ns: int) -> None:
        self.messages.append((room, seq, msg_id, json))

    def on_room_state(self, room: str, epoch: str, seq: int) -> None:
        self.states.append((room, epoch, seq))

    def on_presence_event(self, room: str, user: str, joined: bool, count: int) -> None:
        self.events.append((room, user, joined, count))


def broker(**settings: object) -> tuple[RedisBroker, Heard]:
    def deliver(step: Callable[[], None]) -> None:
        step()

    made = RedisBroker(
        config(broker__kind="redis", **settings), 0, [0] * BLOCK_SLOTS, deliver, node="me"
    )
    heard = Heard()
    made.listener = heard  # type: ignore[assignment]
    return made, heard


def test_a_channel_names_its_room_back() -> None:
    for prefix in ("shardchat:", "", "a.b-c:"):
        for room in ("lobby", "r{1}", "x:y"):
            keys = rw.Keys.of(prefix, room, 0.0)
            assert _room_of(keys.channel, prefix) == room


def test_names_and_epochs_are_fresh_and_seeds_parse() -> None:
    assert node_name(3) != node_name(3) and node_name(3).split(":")[2] == "3"
    assert new_epoch() != new_epoch() and len(new_epoch()) == 8
    assert _host_port("10.0.0.5:7000") == ("10.0.0.5", 7000)
    assert _host_port("[::1]:7001") == ("[::1]", 7001)


def test_the_client_points_where_the_config_says_with_no_password_shown() -> None:
    cfg = config(broker__kind="redis", redis__url="redis://:hunter2@10.0.0.9:6380/1")
    _, cluster, where = connect_client(cfg.redis)
    assert not cluster and "hunter2" not in where and "10.0.0.9:6380" in where
    cfg = config(broker__kind="redis", redis__cluster=["10.0.0.5:7000", "10.0.0.6:7000"])
    _, cluster, where = connect_client(cfg.redis)
    assert cluster and where == "cluster 10.0.0.5:7000,10.0.0.6:7000"


def test_the_pipeline_bound_counts_what_waits_and_what_is_in_flight() -> None:
    made, _ = broker(overload__pipeline=3)
    p = Publication("m1", "room", "ada", "hi", 0, 0)
    assert made.full("room") is None
    made._batch = [p, p]
    assert made.full("room") is None
    made._sending = 1
    assert made.full("room") is Queue.PIPELINE
    made._batch = []
    assert made.full("room") is None


def test_a_batch_from_the_channel_is_delivered_in_seq_order_with_its_epoch() -> None:
    made, heard = broker()
    state = made.rooms["room"] = Room(rw.Keys.of(made.prefix, "room", 0.0), epoch="e1", seq=4)
    state.ready = state.opened = True
    parts = [("m5", 1, b'{"a":5}'), ("m6", 2, b'{"a":6}')]
    batch = b"\n".join([b"m", b"e1", b"5", *(b for m in parts for b in rw_parts(m))])
    assert rw.decode(batch) == rw.Batch("e1", 5, parts)
    made.received(state.keys.channel, batch)
    assert [(s, i) for _, s, i, _ in heard.messages] == [(5, "m5"), (6, "m6")]
    assert state.seq == 6 and not heard.states
    # A batch of another epoch: Redis lost the room; the engine hears the new epoch.
    made.received(state.keys.channel, b"\n".join([b"m", b"e2", b"1", *rw_parts(parts[0])]))
    assert heard.states == [("room", "e2", 0)] and state.seq == 1


def test_what_comes_before_the_rooms_state_waits_and_other_nodes_are_peers() -> None:
    made, heard = broker()
    state = made.rooms["room"] = Room(rw.Keys.of(made.prefix, "room", 0.0), early=[])
    payload = b"p\nother\nbob\n1"
    made.received(state.keys.channel, payload)
    assert state.early == [payload] and not heard.events
    made._ready("room", state)
    assert heard.events == [("room", "bob", True, 1)]
    assert state.remote == {"other": {"bob"}} and made._peers == {"other": PEER_BASE}
    # Our own announcements, echoed by the channel, are not counted twice.
    made.received(state.keys.channel, b"p\nme\nada\n1")
    assert len(heard.events) == 1


def rw_parts(part: tuple[str, int, bytes]) -> list[bytes]:
    msg_id, published_ns, json = part
    return [msg_id.encode(), str(published_ns).encode(), json]


@pytest.mark.parametrize("room", ["lobby", "r:1"])
def test_a_channel_nobody_here_follows_is_dropped(room: str) -> None:
    made, heard = broker()
    made.received(rw.Keys.of(made.prefix, room, 0.0).channel, b"p\nother\nbob\n1")
    assert not heard.events and not made.rooms


def test_the_shards_sweep_beats_the_heartbeat_one_beat_at_a_time() -> None:
    made, _ = broker(presence__ttl=3)
    stamps: list[int] = []
    spawned: list[str] = []
    made.stamp = stamps.append

    def spawn(coro: Any) -> None:
        spawned.append(coro.__qualname__)
        coro.close()

    made._spawn = spawn  # type: ignore[method-assign]
    made.up = True
    made.heartbeat(5_000_000_000)
    assert spawned == ["_heartbeat"] and made._beating
    made.heartbeat(5_500_000_000)  # not due: one a second (ttl / 3 = 1 s)
    made.heartbeat(6_000_000_000)  # due, but the last beat has not returned
    assert spawned == ["_heartbeat"]
    made._beating = False
    made.heartbeat(7_000_000_000)
    assert spawned == ["_heartbeat", "_heartbeat"]
    made.up = False
    made._beating = False
    made.heartbeat(8_000_000_000)  # Redis is down: the reconnect loop beats first
    assert len(spawned) == 2
    assert stamps == [5_000_000_000, 5_500_000_000, 6_000_000_000, 7_000_000_000, 8_000_000_000]
    assert made.now == 8.0
