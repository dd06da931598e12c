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


def test_the_small_records_keep_their_one_letter_keys_and_round_trip() -> None:
    seen = records.ForwardSeen("m1", "room", 7)
    wire = b'{"m":"m1","r":"room","q":7}'
    assert records.encode_forward_seen(seen) == wire
    assert records.decode_forward_seen(wire) == seen
    asked = records.HistoryRequest("room", 3, 9)
    wire = b'{"r":"room","f":3,"l":9}'
    assert records.encode_history_request(asked) == wire
    assert records.decode_history_request(wire) == asked
    event = records.PresenceEvent("room", "ann", True, 2)
    wire = b'{"r":"room","u":"ann","j":true,"c":2}'
    assert records.encode_presence_event(event) == wire
    assert records.decode_presence_event(wire) == event
    query = records.PresenceQuery(5, "room", "ann", 100)
    wire = b'{"q":5,"r":"room","u":"ann","l":100}'
    assert records.encode_presence_query(query) == wire
    assert records.decode_presence_query(wire) == query
