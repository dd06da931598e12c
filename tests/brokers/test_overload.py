"""The shm broker's bounded queues, through engines over one box's rings (no I/O).

Forwards in flight to a room's owner and the owner's unread backlog: past
their bound a publish is refused ``overloaded`` at once, and every publish
accepted before is acked and delivered once the owner reads again.
"""

from __future__ import annotations

from pathlib import Path

from shardchat.brokers.forwarding import Forwarder
from shardchat.core.overload import Queue
from shardchat.stats import overload_slot
from shardchat.storage.durable import Durable, Turn
from shardchat.storage.store import RoomStore
from shardchat.testing.wait import wait_until
from tests.core.box import Box, Client, config, room_owned_by


def test_forwarder_counts_what_each_owner_has_not_answered() -> None:
    forwarder = Forwarder(give_up=5.0)
    forwarder.add("a", "r", 1, b"", 0.0)
    forwarder.add("b", "r", 1, b"", 0.0)
    forwarder.add("c", "s", 2, b"", 3.0)
    assert (forwarder.in_flight(1), forwarder.in_flight(2), forwarder.in_flight(0)) == (2, 1, 0)
    assert forwarder.answered("a") and not forwarder.answered("a")
    assert forwarder.in_flight(1) == 1
    _, failed = forwarder.due(5.0)  # "b" is given up, "c" not yet
    assert [p.msg_id for p in failed] == ["b"]
    assert (forwarder.in_flight(1), forwarder.in_flight(2)) == (0, 1)


def owner_stopped(**settings: object) -> tuple[Box, str, Client, Client]:
    """Two shards, a member of a room on its owner (0) and one on shard 1; the owner
    stopped (it reads nothing)."""
    box = Box(2, config(limits__rate=1000, limits__burst=1000, **settings))
    room = room_owned_by(0, 2, "over")
    on_owner = box.connect(0, "owner-side")
    on_peer = box.connect(1, "peer-side")
    box.join(on_owner, room)
    box.join(on_peer, room)
    box.stopped.add(0)
    return box, room, on_owner, on_peer


def test_forwards_past_the_bound_are_refused_until_the_owner_answers() -> None:
    box, room, member, sender = owner_stopped(overload__forwards=3)
    for i in range(5):
        box.send(sender, type="message", room=room, content=f"m{i}", id=f"m{i}")
    box.turn()
    errors = sender.take("error")
    assert [(e["id"], e["code"]) for e in errors] == [("m3", "overloaded"), ("m4", "overloaded")]
    assert all(e["retry_after"] == box.config.overload.retry_after for e in errors)
    assert not sender.take("ack")
    assert box.stats[1][overload_slot(Queue.FORWARDS)] == 2
    box.stopped.discard(0)
    box.turn()
    assert [a["id"] for a in sender.take("ack")] == ["m0", "m1", "m2"]
    assert [m["content"] for m in member.take("message")] == ["m0", "m1", "m2"]
    # Answered: the next publish goes through.
    box.send(sender, type="message", room=room, content="m5", id="m5")
    box.turn()
    assert [a["id"] for a in sender.take("ack")] == ["m5"]


def test_an_owner_behind_on_its_peers_rings_refuses_its_own_publishes() -> None:
    """The owner was stopped while a peer forwarded about 10 KB to it: at its next
    read it finds more than ``overload.backlog`` (4 KiB) waiting, so a publish on
    its own connections is refused; the forwards are sequenced, and once a read
    finds the rings caught up, publishing works again."""
    box, room, local, remote = owner_stopped(overload__backlog=4096)
    for i in range(40):
        box.send(remote, type="message", room=room, content="x" * 200, id=f"r{i}")
    box.turn()
    box.stopped.discard(0)
    box.brokers[0].read_peers(box.now)  # finds the forwards waiting, reads them
    box.send(local, type="message", room=room, content="mine", id="l0")
    (error,) = local.take("error")
    assert (error["id"], error["code"]) == ("l0", "overloaded")
    box.turn()  # the reads after find nothing waiting
    assert len(remote.take("ack")) == 40
    box.send(local, type="message", room=room, content="mine", id="l1")
    box.turn()
    assert [a["id"] for a in local.take("ack")] == ["l1"]
    assert [m["content"] for m in remote.take("message")][-1] == "mine"
    assert box.stats[0][overload_slot(Queue.BACKLOG)] == 1


def acks_until(box: Box, client: Client, count: int) -> None:
    """Loop turns until ``client`` holds ``count`` acks (the store's writer is a thread)."""

    def acked() -> bool:
        box.turn()
        return sum(f["type"] == "ack" for f in client.frames) >= count

    wait_until(acked, 10, "the store's acks")


def stored_box(
    tmp_path: Path, fsync: str, count: int, **settings: object
) -> tuple[Box, RoomStore[Turn], Durable, Client]:
    """Two shards; shard 0 has a room store whose writer is not started yet, and a
    client of its room "st..." sent ``count`` messages, one a turn."""
    box = Box(2, config(limits__rate=1000, limits__burst=1000, **settings))
    store: RoomStore[Turn] = RoomStore(
        tmp_path / "store.db", fsync=fsync, max_bytes=0, history=100, history_ttl=0.0,
        wake=lambda: None,
    )  # fmt: skip
    box.brokers[0].durable = durable = Durable(store, acks_wait=fsync == "always")
    room = room_owned_by(0, 2, "st")
    client = box.connect(0, "writer")
    box.join(client, room)
    for i in range(count):
        box.send(client, type="message", room=room, content=f"s{i}", id=f"s{i}")
        box.turn()
    return box, store, durable, client


def test_an_owner_whose_store_is_behind_refuses_its_own_publishes(tmp_path: Path) -> None:
    """The owner's room store writes nothing yet (its writer thread not started):
    with fsync "off" too the publishes are not acked until stored, ``overload.store``
    (3) of them wait for the store, the next publish is refused ``overloaded``;
    once the store writes, the acks come in their order and publishing works again."""
    box, store, durable, client = stored_box(tmp_path, "off", 4, overload__store=3)
    try:
        (error,) = client.take("error")
        assert (error["id"], error["code"]) == ("s3", "overloaded")
        assert not client.take("ack")
        assert durable.waiting == 3
        assert box.stats[0][overload_slot(Queue.STORE)] == 1
        store.start()
        acks_until(box, client, 3)
        assert [a["id"] for a in client.take("ack")] == ["s0", "s1", "s2"]
        box.send(client, type="message", room=room_owned_by(0, 2, "st"), content="s4", id="s4")
        acks_until(box, client, 1)
        assert [a["id"] for a in client.take("ack")] == ["s4"]
    finally:
        box.brokers[0].durable = None
        durable.close()


def test_with_fsync_always_an_ack_waits_for_the_store(tmp_path: Path) -> None:
    """storage.fsync = "always": nothing is acked while the store writes nothing;
    once it writes, the acks come in their order."""
    box, store, durable, client = stored_box(tmp_path, "always", 3)
    try:
        assert not client.take("ack") and durable.waiting == 3
        store.start()
        acks_until(box, client, 3)  # a drain takes what the store wrote
        assert [a["id"] for a in client.take("ack")] == ["s0", "s1", "s2"]
    finally:
        box.brokers[0].durable = None
        durable.close()
