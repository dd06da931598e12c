"""Ring record payloads: the idempotency key travels in FORWARD and ROOM_MSG."""

from __future__ import annotations

from shardchat.core.broker import Publication, idempotency_key
from shardchat.ring import records


def test_room_message_carries_its_idempotency_key() -> None:
    key = idempotency_key("alice", "lobby", "id-é-1")
    payload = records.encode_room_message("lobby", 7, 123, "0-ab-1", b'{"x":1}', key)
    msg = records.decode_room_message(payload)
    assert (msg.room, msg.seq, msg.publish_ns, msg.msg_id, msg.json, msg.key) == (
        "lobby",
        7,
        123,
        "0-ab-1",
        b'{"x":1}',
        "alice\nlobby\nid-é-1",
    )
    plain = records.decode_room_message(records.encode_room_message("r", 1, 0, "m", b"{}"))
    assert plain.key == "" and plain.json == b"{}"


def test_forward_carries_its_idempotency_key() -> None:
    forward = Publication("m", "r", "bob", "hi", 1, 2, idempotency_key("bob", "r", "x"))
    assert records.decode_forward(records.encode_forward(forward)) == forward
    assert idempotency_key("bob", "r", None) == ""
