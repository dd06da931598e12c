"""Decoding client frames (PROTOCOL.md) and framing server frames."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Opcode

from shardchat.core import wire
from shardchat.core.errors import ProtocolError
from shardchat.core.messages import Ack, HistoryQuery, Join, Leave, Ping, PresenceQuery, Publish
from tests.support.wsframe import parse_frame

MAX = 4096


def decode(obj: Any) -> Any:
    return wire.decode(json.dumps(obj).encode(), MAX)


def code_of(data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        wire.decode(data, MAX)
    return info.value.code


def test_each_request_type() -> None:
    assert decode({"type": "join", "room": "r"}) == Join(room="r")
    assert decode({"type": "join", "room": "r", "since": 4, "epoch": "e"}) == Join(
        room="r", since=4, epoch="e"
    )
    assert decode({"type": "leave", "room": "r"}) == Leave(room="r")
    assert decode({"type": "message", "room": "r", "content": "hé", "id": "7"}) == Publish(
        room="r", content="hé", id="7"
    )
    assert decode({"type": "message", "room": "r", "content": "x", "key": "k-1"}) == Publish(
        room="r", content="x", key="k-1"
    )
    assert decode({"type": "ack", "room": "r", "seq": 3}) == Ack(room="r", seq=3)
    assert decode({"type": "ping", "id": 5, "x": [1]}) == Ping(echo={"id": 5, "x": [1]})
    assert decode({"type": "presence", "room": "r"}) == PresenceQuery(room="r")
    assert decode({"type": "history", "room": "r", "since": 2, "limit": 10}) == HistoryQuery(
        room="r", since=2, limit=10
    )
    assert decode({"type": "history", "room": "r", "limit": 5, "before": 9}) == HistoryQuery(
        room="r", limit=5, before=9
    )


def test_unknown_fields_are_ignored() -> None:
    assert decode({"type": "leave", "room": "r", "whatever": {"a": 1}}) == Leave(room="r")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{", "bad_json"),
        (b"", "bad_json"),
        (b"[1, 2]", "bad_request"),
        (b'"join"', "bad_request"),
        (b"{}", "bad_request"),
        (b'{"type": 3}', "bad_request"),
        (b'{"type": "shout"}', "unknown_type"),
        (b'{"type": "join"}', "bad_request"),
        (b'{"type": "join", "room": ""}', "bad_request"),
        (b'{"type": "join", "room": "a b"}', "bad_request"),
        (b'{"type": "join", "room": "' + b"x" * 65 + b'"}', "bad_request"),
        (b'{"type": "join", "room": "r", "since": -1}', "bad_request"),
        (b'{"type": "join", "room": "r", "since": true}', "bad_request"),
        (b'{"type": "message", "room": "r"}', "bad_request"),
        (b'{"type": "message", "room": "r", "content": 5}', "bad_request"),
        (b'{"type": "message", "room": "r", "content": "x", "id": ""}', "bad_request"),
        (b'{"type": "message", "room": "r", "content": "x", "id": 12}', "bad_request"),
        (b'{"type": "message", "room": "r", "content": "x", "key": ""}', "bad_request"),
        (b'{"type": "message", "room": "r", "content": "x", "key": 7}', "bad_request"),
        (
            b'{"type": "message", "room": "r", "content": "x", "key": "' + b"k" * 65 + b'"}',
            "bad_request",
        ),
        (b'{"type": "ack", "room": "r"}', "bad_request"),
        (b'{"type": "ack", "room": "r", "seq": 1.5}', "bad_request"),
    ],
)
def test_errors_carry_the_protocol_code(data: bytes, code: str) -> None:
    assert code_of(data) == code


def test_content_limit_counts_utf8_bytes() -> None:
    ok = "é" * (MAX // 2)  # 2 bytes each: exactly MAX bytes
    assert decode({"type": "message", "room": "r", "content": ok}).content == ok
    with pytest.raises(ProtocolError) as info:
        decode({"type": "message", "room": "r", "content": ok + "x", "id": "big"})
    assert info.value.code == "too_large" and info.value.request_id == "big"


def test_error_echoes_a_usable_id() -> None:
    with pytest.raises(ProtocolError) as info:
        decode({"type": "message", "room": "no room!", "content": "x", "id": "q1"})
    assert info.value.request_id == "q1"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
type_names = st.sampled_from(["join", "leave", "message", "ack", "ping", "presence", "history"])
requests = st.fixed_dictionaries(
    {"type": type_names | json_values},
    optional={
        "room": st.text(max_size=70) | json_values,
        "content": st.text(max_size=50) | json_values,
        "id": st.text(max_size=70) | json_values,
        "seq": st.integers() | json_values,
        "since": st.integers() | json_values,
        "limit": st.integers() | json_values,
        "epoch": json_values,
    },
)


@given(requests)
def test_any_json_request_decodes_or_raises_protocol_error(obj: dict[str, Any]) -> None:
    try:
        wire.decode(json.dumps(obj).encode(), MAX)
    except ProtocolError as exc:
        assert exc.code in {"bad_json", "bad_request", "unknown_type", "too_large"}


@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        wire.decode(data, MAX)
    except ProtocolError:
        pass


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 100_000])
def test_text_frame_parses_as_one_unmasked_text_frame(size: int) -> None:
    payload = b"a" * size
    frame = parse_frame(wire.text_frame(payload))
    assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == payload


def test_held_message_json_is_right_sized() -> None:
    """History holds message_json's bytes for long: each must cost about its length,
    not orjson's 4 KB output buffer."""
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        held = [wire.message_json("lobby", "ada", "x" * 100, i, 1, f"m{i}") for i in range(2000)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_message = grown / len(held)
    assert per_message < 2 * len(held[0]), per_message
    assert orjson.loads(held[7]) == {
        "type": "message",
        "room": "lobby",
        "sender": "ada",
        "content": "x" * 100,
        "seq": 7,
        "timestamp": 1,
        "id": "m7",
    }
