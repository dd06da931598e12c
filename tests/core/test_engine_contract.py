"""The engine's contract: inputs in, outputs and commands out through getters, the
broker's calls queued in the inbox (never run inside an engine input), a join's
stages explicit, and the server's own calls."""

from __future__ import annotations

import orjson

from shardchat.core import wire
from shardchat.core.engine import JoinStage, run_commands
from shardchat.core.outputs import ApiResult, Close
from shardchat.core.roomlog import HeldMessage
from tests.core.box import Box, published_room, room_owned_by


def test_a_publish_leaves_as_a_command_and_its_delivery_waits_in_the_inbox() -> None:
    box = Box(2)
    room = room_owned_by(0, 2)
    ada = box.connect(0, "ada")
    box.join(ada, room)
    engine, broker = box.engines[0], box.brokers[0]
    engine.advance(box.now, box.wall)
    engine.receive(ada, wire.encode({"type": "message", "room": room, "content": "hi"}))
    commands = engine.take_commands()
    assert [c.name for c in commands] == ["publish"]
    assert not engine.inbox and engine.logs[room].seq == 0  # nothing ran yet
    run_commands(broker, commands)  # the owner sequences at once...
    assert engine.inbox and engine.logs[room].seq == 0  # ...but only queues for the engine
    engine.deliver()
    assert engine.logs[room].seq == 1 and not engine.inbox
    box.turn()
    assert [a["seq"] for a in ada.take("ack")] == [1]


def test_a_join_waits_at_an_explicit_stage_and_requests_wait_behind_it() -> None:
    box = Box(3)
    room = room_owned_by(0, 3)  # its presence is held by shards 0 and 1
    cat = box.connect(2, "cat")
    box.send(cat, type="join", room=room)
    state = box.engines[2].conns[cat]
    (pending,) = state.joins
    assert pending.stage is JoinStage.ASKING  # the holder on another shard is asked
    box.send(cat, type="message", room=room, content="right after")
    assert state.deferred is not None and len(state.deferred) == 1
    box.turn()
    assert pending.stage is JoinStage.DONE and state.joins == ()
    assert [f["type"] for f in cat.take() if f["type"] in ("joined", "ack")] == ["joined", "ack"]


def test_a_join_of_a_closed_connection_is_dropped_at_its_stage() -> None:
    box = Box(3)
    room = room_owned_by(0, 3)
    cat = box.connect(2, "cat")
    box.send(cat, type="join", room=room)
    (pending,) = box.engines[2].conns[cat].joins
    box.close(cat)
    assert pending.stage is JoinStage.DONE
    box.turn()
    assert cat.take("joined") == [] and room not in box.engines[2].members


def test_publish_as_answers_its_token_through_the_outputs() -> None:
    box = Box(2)
    room = room_owned_by(1, 2)  # forwarded to the owner
    bob = box.connect(0, "bob")
    box.join(bob, room)
    engine = box.engines[0]
    engine.advance(box.now, box.wall)
    engine.publish_as("call-1", room, "server", "from the API", key="k1")
    engine.publish_as("call-2", "not a room!", "server", "x")
    box.settle(0)
    box.turn()
    by_token = {r.token: r for r in box.unaddressed if isinstance(r, ApiResult)}
    assert by_token["call-1"].ok and by_token["call-1"].seq == 1
    assert not by_token["call-2"].ok and by_token["call-2"].code == "bad_request"
    assert [(m["sender"], m["content"]) for m in bob.take("message")] == [
        ("server", "from the API")
    ]


def test_the_server_joins_leaves_and_closes_a_users_connections() -> None:
    box = Box(2)
    ada1, ada2 = box.connect(0, "ada"), box.connect(0, "ada")
    bob = box.connect(0, "bob")
    engine = box.engines[0]
    engine.advance(box.now, box.wall)
    assert engine.join_user("ada", "lobby") == 2
    box.settle(0)
    box.turn()
    assert [len(c.take("joined")) for c in (ada1, ada2, bob)] == [1, 1, 0]
    assert engine.room_members("lobby") == ["ada"]
    assert engine.join_user("ada", "lobby") == 2  # members already: no second joined
    box.settle(0)
    assert ada1.take("joined") == []
    assert engine.leave_user("ada", "lobby") == 2
    box.settle(0)
    assert [len(c.take("left")) for c in (ada1, ada2)] == [1, 1]
    assert engine.close_user("ada", 4403, "banned") == 2
    box.settle(0)
    assert ada1.closed == Close(4403, "banned") and ada2.closed == Close(4403, "banned")
    assert bob.closed is None


def test_read_history_answers_from_the_log() -> None:
    box = Box(2)
    room, ada = published_room(box, 5, "ada")
    got: list[tuple[list[HeldMessage], str, int]] = []
    engine = box.engines[1]
    engine.advance(box.now, box.wall)
    engine.read_history(room, None, None, 2, lambda *answer: got.append(answer))
    box.settle(1)
    ((held, epoch, seq),) = got
    assert [orjson.loads(m.payload)["content"] for m in held] == ["3", "4"]
    assert seq == 5 and epoch == "epoch-1"
