"""shardchat.testing.rawws against websockets, a well-kept implementation: the
frames it encodes parse there, the frames websockets' server sends parse here,
and its upgrade request is accepted by websockets' server protocol."""

from __future__ import annotations

import os

import pytest
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from shardchat.testing.rawws import (
    OP_PING,
    OP_TEXT,
    ZERO_MASK,
    close_code,
    close_frame,
    encode_frame,
    parse_frames,
    response_head,
    take_head,
    upgrade_request,
    upgrade_status,
)
from tests.support.wsframe import parse_frame

SIZES = [0, 1, 125, 126, 65535, 65536, 70000]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mask", [ZERO_MASK, b"\x01\x02\x03\x04", None])
def test_an_encoded_frame_parses_in_websockets(size: int, mask: bytes | None) -> None:
    payload = os.urandom(size)
    frame = parse_frame(encode_frame(payload, mask=mask), mask=mask is not None)
    assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == payload


def test_fin_and_rsv_bits_are_set_as_asked() -> None:
    # websockets refuses RSV bits without an extension, so the first byte is read here.
    assert encode_frame(b"x", OP_PING, fin=False, rsv=0x40)[0] == 0x49
    assert encode_frame(b"x", OP_PING)[0] == 0x89


def test_a_close_frame_carries_its_code() -> None:
    (frame,), _ = parse_frames(close_frame(4403, b"bye", mask=None))
    assert close_code(frame[1]) == 4403 and frame[1][2:] == b"bye"
    assert close_code(b"") is None


@pytest.mark.parametrize("size", SIZES)
def test_websockets_server_frames_parse_whole_and_wait_for_the_rest(size: int) -> None:
    payload = b"y" * size
    data = Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert parse_frames(data) == ([(OP_TEXT, payload)], len(data))
    for cut in {1, 2, 3, 5, 9, len(data) - 1}:
        if 0 < cut < len(data):
            assert parse_frames(data[:cut]) == ([], 0)


def test_frames_in_a_row_and_a_partial_one_after_them() -> None:
    data = b"".join(encode_frame(p, op, mask=None) for p, op in [(b"a", 1), (b"b" * 300, 1)])
    data += encode_frame(b"hb", OP_PING, mask=None)
    frames, used = parse_frames(data + encode_frame(b"more to come", mask=None)[:5])
    assert frames == [(1, b"a"), (1, b"b" * 300), (OP_PING, b"hb")] and used == len(data)


def test_the_upgrade_request_is_accepted_by_a_websocket_server() -> None:
    server = ServerProtocol()
    server.receive_data(upgrade_request("/ws?user=a", headers="Origin: http://x\r\n"))
    (request,) = server.events_received()
    assert request.path == "/ws?user=a" and request.headers["Origin"] == "http://x"
    response = server.accept(request)
    assert response.status_code == 101
    assert upgrade_status(b"HTTP/1.1 101 Switching Protocols\r\n") == 101


def test_each_upgrade_request_has_a_fresh_key_and_host_may_be_left_out() -> None:
    assert upgrade_request("/ws") != upgrade_request("/ws")
    assert b"Host:" not in upgrade_request("/ws", None)


def test_a_response_head_is_taken_once_whole_and_the_frames_after_it_stay() -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    frame = encode_frame(b"hi", mask=None)
    buf = bytearray(head[:-1])
    assert take_head(buf) is None and buf == head[:-1]
    buf += head[-1:] + frame
    assert take_head(buf) == 101 and buf == frame
    assert take_head(bytearray(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")) == 503


def test_a_response_heads_status_and_headers() -> None:
    head = b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nX-Two:  a: b \r\nbare"
    status, headers = response_head(head)
    assert status == 405
    assert headers == {"allow": "GET", "x-two": "a: b", "bare": ""}
