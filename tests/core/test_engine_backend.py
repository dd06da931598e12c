"""The engine's side of the application's backend, in a box of engines: the webhook
events it makes, a connect proxy's identity at admission (a token wins), the
publish proxy's verdicts, and room_occupied/room_vacated at the room's owner only."""

from __future__ import annotations

import jwt

from shardchat.auth import Identity
from shardchat.core.admission import Upgrade
from shardchat.core.hookevents import Verdict
from tests.core.box import Box, Client, config, room_owned_by

KINDS = frozenset({"connect", "disconnect", "join", "leave", "message"})


def events(box: Box, shard: int) -> list[tuple[str, str, str | None]]:
    engine = box.engines[shard]
    taken = engine.take_events()
    return [(e.kind, e.user, e.room) for e in taken]


def test_events_for_the_kinds_asked_in_order() -> None:
    box = Box(2)
    box.engines[0].hook_kinds = KINDS
    ada = box.connect(0, "ada")
    box.join(ada, "lobby")
    box.send(ada, type="message", room="lobby", content="hi", id="1")
    box.turn()
    box.send(ada, type="leave", room="lobby")
    box.join(ada, "team")
    box.close(ada, 4000)
    got = events(box, 0)
    assert got == [
        ("connect", "ada", None),
        ("join", "ada", "lobby"),
        ("message", "ada", "lobby"),
        ("leave", "ada", "lobby"),
        ("join", "ada", "team"),
        ("leave", "ada", "team"),
        ("disconnect", "ada", None),
    ]
    bob = box.connect(1, "bob")  # shard 1 asked for none: it makes none
    box.join(bob, "lobby")
    assert events(box, 1) == []


def test_a_proxied_identity_is_admitted_and_a_token_wins() -> None:
    box = Box(1, config(auth__secret="s" * 32))
    engine = box.engines[0]
    engine.advance(box.now, box.wall)
    proxied = Identity("fromcookie", frozenset({"lobby"}))
    client = Client("x", 0)
    upgrade = Upgrade(1, "127.0.0.1", "/ws?user=mallory", "user=mallory", {})
    assert engine.admit(client, upgrade, 1, proxied) is None
    assert engine.conns[client].user == "fromcookie"
    assert engine.conns[client].allowed_rooms == {"lobby"}
    token = jwt.encode({"sub": "tokenuser"}, "s" * 32, algorithm="HS256")
    other = Client("y", 0)
    with_token = Upgrade(2, "127.0.0.1", f"/ws?token={token}", f"token={token}", {})
    assert engine.admit(other, with_token, 1, proxied) is None
    assert engine.conns[other].user == "tokenuser"


def test_publish_proxy_verdicts_keep_rewrite_refuse_or_fail() -> None:
    box = Box(2)
    engine = box.engines[0]
    engine.publish_proxy = True
    ada = box.connect(0, "ada")
    bob = box.connect(1, "bob")
    box.join(ada, "r")
    box.join(bob, "r")
    for i, content in enumerate(["keep", "rewrite", "refuse", "late"]):
        box.send(ada, type="message", room="r", content=content, id=str(i))
    box.turn()
    waiting = engine.take_proxied()
    assert bob.take("message") == [] and len(waiting) == 4  # none sequenced yet
    engine.publish_answered(
        waiting[:3], [Verdict(), Verdict(content="rewritten"), Verdict(reject="no")]
    )
    engine.publish_answered(waiting[3:], None, "the backend did not answer")
    box.settle(0)
    box.turn()
    assert [m["content"] for m in bob.take("message")] == ["keep", "rewritten"]
    errors = {e["id"]: (e["code"], e["reason"]) for e in ada.take("error")}
    assert errors == {
        "2": ("rejected", "no"),
        "3": ("unavailable", "the backend did not answer"),
    }
    assert sorted(a["id"] for a in ada.take("ack")) == ["0", "1"]
    assert engine.proxy_waiting == 0


def test_occupancy_is_told_by_the_rooms_owner_only() -> None:
    box = Box(3)
    told: list[tuple[int, str, str, bool]] = []
    for shard, broker in enumerate(box.brokers):
        broker.occupancy = lambda room, user, occupied, s=shard: told.append(
            (s, room, user, occupied)
        )
    room = room_owned_by(2, 3, "occ")
    ada = box.connect(0, "ada")
    bob = box.connect(1, "bob")
    box.join(ada, room)
    box.join(bob, room)
    box.send(ada, type="leave", room=room)
    box.turn()
    box.close(bob)
    box.turn()
    assert told == [(2, room, "ada", True), (2, room, "bob", False)]
