"""The Redis broker's pure parts: keys in one hash slot, the JSON Redis completes,
channel payloads."""

from __future__ import annotations

import orjson
from redis.crc import key_slot

from shardchat.brokers.redis import wire as rw
from shardchat.core import wire
from shardchat.core.broker import Publication


def publication(content: str, key: str = "") -> Publication:
    return Publication("0-ab-1", "room:a", "alice", content, 1_700_000_000_000, 5, key)


def test_redis_completes_the_exact_json_every_member_receives() -> None:
    # Content that looks like the seq key must not fool the split.
    for content in ["hi", '"seq":0,', ',"seq":0,"x', "\n\u2603 \\"]:
        p = publication(content)
        head, tail = rw.message_parts(p)
        for seq in (1, 42, 10**12):
            joined = head + str(seq).encode() + tail
            expected = wire.message_json(p.room, p.sender, p.content, seq, p.timestamp, p.msg_id)
            assert joined == expected
            assert orjson.loads(joined)["content"] == content


def test_a_rooms_keys_and_channel_share_one_cluster_slot() -> None:
    keys = rw.Keys.of("svc:", "room:a", 1_800_000_000.0)
    slots = {key_slot(k.encode()) for k in keys}
    assert len(slots) == 1
    other = rw.Keys.of("svc:", "room:b", 1_800_000_000.0)
    assert key_slot(other.seq.encode()) != key_slot(keys.seq.encode())
    # Idempotency buckets: this window's and the one before.
    later = rw.Keys.of("svc:", "room:a", 1_800_000_000.0 + 600)
    assert later.ids_before == keys.ids_now


def test_channel_payloads_decode() -> None:
    json = wire.message_json("r", "a", "x\ny", 7, 1, "m1")
    data = b"\n".join([b"m", b"ep", b"7", b"m1", b"123", json, b"m2", b"124", json])
    batch = rw.decode(data)
    assert batch == rw.Batch("ep", 7, [("m1", 123, json), ("m2", 124, json)])
    assert rw.decode(b"p\nnode:1\nbob\n1") == ("node:1", "bob", True, None)
    assert rw.decode(b"p\nnode:1\nbob\n0") == ("node:1", "bob", False, None)
    # A join with the connect proxy's info (JSON never holds a raw newline).
    assert rw.decode(b'p\nnode:1\nbob\n1\n{"a":"x\\ny"}') == (
        "node:1",
        "bob",
        True,
        '{"a":"x\\ny"}',
    )
    assert rw.decode(b"zz\nwhat") is None
    assert rw.decode(b"m\nep") is None
