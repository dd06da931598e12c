"""Hypothesis-generated client frames for fuzzing the whole server path, and the
runner that sends one example over a raw connection and reads how it ended.

Used by tests/integration/test_fuzz.py (bounded, in the suite) and tests/support/longfuzz.py (a long
seeded run). An example is a list of actions: text messages (valid requests,
junk, bad UTF-8, deep nesting) sent whole or in fragments with control frames
between them, binary frames, oversized frames, stray continuations, reserved
opcodes and bits, unmasked frames, oversized control frames, close frames.
The connection must end only with a protocol close code, or stay open and
answer a final ping.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from shardchat.testing.rawws import OP_CLOSE, close_code, encode_frame
from tests.support.helpers import RawClient

# What the server may close a fuzzed connection with (PROTOCOL.md, RFC 6455 7.4.1):
# protocol error, binary, bad UTF-8, too many errors, too big, and the echo of a
# client's own close (1000/1001, or 1005 "no status" for an empty one; 1002 for a
# close frame with an invalid code).
CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1007, 1008, 1009})
MAX_FRAME = 16384  # the fuzzed server's limits.max_frame
FUZZ_SETTINGS = [
    f"limits.max_frame={MAX_FRAME}",
    "limits.max_content=1024",
    "limits.max_errors=5",
    "limits.rate=1000",
    "limits.burst=1000",
]

ROOMS = ["fz", "fz2", "calm"]
_names = st.sampled_from(ROOMS + ["", "bad room", "x" * 70])


def _nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


_requests = st.one_of(
    st.fixed_dictionaries({"type": st.just("join"), "room": _names}),
    st.fixed_dictionaries({"type": st.just("leave"), "room": _names}),
    st.fixed_dictionaries(
        {"type": st.just("message"), "room": _names, "content": st.text(max_size=40)}
    ),
    st.fixed_dictionaries({"type": st.just("ack"), "room": _names, "seq": st.integers(-1, 2**64)}),
    st.fixed_dictionaries({"type": st.just("presence"), "room": _names}),
    st.fixed_dictionaries({"type": st.just("history"), "room": _names, "limit": st.integers(0, 5)}),
    st.builds(
        lambda depth, rid: {"type": "ping", "id": rid, "x": _nested(depth)},
        st.integers(0, 600),
        st.text(max_size=5),
    ),
    st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=6), max_size=3),
)
_payloads = st.one_of(
    _requests.map(lambda obj: json.dumps(obj, ensure_ascii=False).encode()),
    st.binary(max_size=60),  # junk, often bad UTF-8
    st.text(max_size=30).map(lambda t: t.encode()),
    st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(0, 1100)),
)


class Frame:
    """One client frame (a plain class: hypothesis prints it with this short repr,
    where a dataclass would be printed field by field, 64 KiB payloads included)."""

    __slots__ = ("fin", "masked", "opcode", "payload", "rsv")

    def __init__(
        self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, masked: bool = True
    ) -> None:
        self.opcode = opcode
        self.payload = payload
        self.fin = fin
        self.rsv = rsv  # the three RSV bits, shifted into place
        self.masked = masked

    def __repr__(self) -> str:
        payload = self.payload if len(self.payload) <= 80 else self.payload[:40] + b"..."
        return (
            f"Frame(0x{self.opcode:x}, {payload!r} ({len(self.payload)} B), fin={self.fin}, "
            f"rsv={self.rsv >> 4}, masked={self.masked})"
        )


def _fragmented(payload: bytes, cuts: list[int], controls: list[int]) -> list[Frame]:
    points = sorted({c % (len(payload) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(payload[last:point])
        last = point
    pieces.append(payload[last:])
    frames = []
    for i, piece in enumerate(pieces):
        frames.append(Frame(0x1 if i == 0 else 0x0, piece, fin=i == len(pieces) - 1))
        if i < len(pieces) - 1 and i < len(controls) and controls[i]:
            frames.append(Frame(0x9 if controls[i] == 1 else 0xA, b"mid"))
    return frames


_message = st.builds(
    _fragmented,
    _payloads,
    st.lists(st.integers(0, 10_000), max_size=4),
    st.lists(st.integers(0, 2), max_size=4),
)
_others = st.one_of(
    st.builds(lambda p: [Frame(0x2, p)], st.binary(max_size=20)),
    st.builds(lambda n: [Frame(0x1, b" " * n)], st.integers(MAX_FRAME + 1, 4 * MAX_FRAME)),
    st.builds(lambda p: [Frame(0x9, p)], st.binary(max_size=125)),
    st.builds(lambda p: [Frame(0xA, p)], st.binary(max_size=125)),
    st.builds(lambda n: [Frame(0x9, b"p" * n)], st.integers(126, 300)),
    st.builds(lambda p: [Frame(0x0, p)], st.binary(max_size=10)),
    st.builds(lambda r: [Frame(0x1, b"{}", rsv=r << 4)], st.integers(1, 7)),
    st.builds(lambda p: [Frame(0x1, p, masked=False)], st.binary(max_size=10)),
    st.builds(lambda op: [Frame(op, b"")], st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xF])),
    st.builds(lambda p: [Frame(0x9, p, fin=False)], st.binary(max_size=5)),
    st.builds(
        lambda code: [Frame(0x8, b"" if code is None else struct.pack("!H", code))],
        st.sampled_from([None, 1000, 1001, 999, 1005, 1006, 5000]),
    ),
)
examples = st.lists(st.one_of(_message, _message, _others), min_size=1, max_size=10).map(
    lambda actions: [frame for action in actions for frame in action]
)


def encode(frame: Frame) -> bytes:
    mask = os.urandom(4) if frame.masked else None
    return encode_frame(frame.payload, frame.opcode, fin=frame.fin, rsv=frame.rsv, mask=mask)


@dataclass(frozen=True)
class Outcome:
    code: int | None  # the server's close code; None: still open (answered the probe)
    frames_sent: int


def run_example(port: int, frames: list[Frame], timeout: float) -> Outcome:
    """Send ``frames`` on a fresh connection, then a probe ping; return how it ended.

    Raises:
        AssertionError: the connection ended without a close frame (1006), or with
            a code that is not a protocol close code.
    """
    raw = RawClient(port, "/ws?user=fuzz", timeout=timeout)
    try:
        assert raw.status == 101, raw.status
        sent = 0
        try:
            for frame in frames:
                raw.sock.sendall(encode(frame))
                sent += 1
            raw.sock.sendall(encode(Frame(0x9, b"probe")))
        except OSError:
            pass  # the server stopped reading after closing; its close frame is below
        while True:
            try:
                opcode, payload = raw.recv_frame()
            except ConnectionError as exc:  # an end or a reset before a close frame
                raise AssertionError("connection ended without a close frame (1006)") from exc
            if opcode == OP_CLOSE:
                code = close_code(payload) or 1005
                assert code in CLOSE_CODES, (code, payload)
                return Outcome(code, sent)
            if opcode == 0xA and payload == b"probe":
                return Outcome(None, sent)
    finally:
        raw.close()
