"""The load worker's connection: a raw WebSocket client that parses only what a figure needs.

Frames from the server are unmasked, so counting them is reading a 2-10 byte
header; only sampled connections decode JSON (for latency, seq order and
duplicates). Client frames use a zero masking key: RFC 6455 requires a key,
not a random-looking one, and XOR with zero leaves the payload as it is.
Every connection answers WebSocket pings with pongs, as a browser does.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson

from shardchat.testing.rawws import OP_PONG, encode_frame, frame_at, take_head, upgrade_request

__all__ = ["LoadConn"]

_SEQ = re.compile(rb"\d+")
_MESSAGE = b'{"type":"message"'  # how shardchat's message frames begin


class LoadConn(asyncio.Protocol):
    """One load connection. ``stats`` is shared by every connection of the worker."""

    def __init__(
        self,
        path: str,
        sampled: bool,
        stats: dict[str, Any],
        opened: asyncio.Future[None],
        sender: bool = False,
        reliable: bool = False,
        ack_every_read: bool = False,
    ) -> None:
        self.path = path
        query = path.partition("?")[2]
        self.room = next(
            (v for k, _, v in (p.partition("=") for p in query.split("&")) if k == "room"), ""
        )
        self.sampled = sampled  # decode every frame (latency, order, duplicates)
        self.sender = sender  # count the acks it gets (a prefix check, no JSON)
        # Reliable mode: ack the last message seen, on every read or (as
        # shardchat.client does) when the worker's ack tick calls ack_due().
        self.reliable = reliable
        self.ack_every_read = ack_every_read
        self.unacked: bytes | None = None  # the start of the last message not acked
        self.stats = stats
        self.opened = opened
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.closed = False
        self.close_code: int | None = None
        self.last_seq: dict[str, int] = {}
        self.started = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) or hasattr(transport, "write")
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(upgrade_request(self.path))  # type: ignore[union-attr]

    def send(self, obj: dict[str, Any]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(encode_frame(orjson.dumps(obj)))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            status = take_head(buf)
            if status is None:
                return
            if status != 101:
                self.stats[f"failed_{status}"] += 1
                self._fail()
                return
            self.upgraded = True
            if not self.opened.done():
                self.opened.set_result(None)
        stats = self.stats
        pos = 0
        end = len(buf)
        frames = 0
        last_text = -1
        while (at := frame_at(buf, pos, end)) is not None:
            head, n = at
            opcode = buf[pos] & 0x0F
            if opcode == 0x1:
                frames += 1
                if self.reliable and buf[pos + head : pos + head + 17] == _MESSAGE:
                    last_text = pos + head
                if self.sampled:
                    self._sample(bytes(buf[pos + head : pos + head + n]))
                elif self.sender and b'"ack"' in buf[pos + head : pos + head + 16]:
                    stats["acks"] += 1
            elif opcode == 0x9:
                if self.transport is not None:
                    self.transport.write(
                        encode_frame(bytes(buf[pos + head : pos + head + n]), OP_PONG)
                    )
            elif opcode == 0x8:
                self.close_code = (buf[pos + head] << 8 | buf[pos + head + 1]) if n >= 2 else 1005
                stats["closed_by_server"] += 1
                stats["close_" + str(self.close_code)] += 1
                self._fail()
                return
            pos += head + n
        if self.reliable and last_text >= 0:
            if self.ack_every_read:
                self._ack(bytes(buf[last_text : last_text + 400]))
            else:
                self.unacked = bytes(buf[last_text : last_text + 400])
        if pos:
            del buf[:pos]
        stats["frames"] += frames

    def ack_due(self) -> None:
        """Ack the last message received since the last ack, if any (cumulative)."""
        if self.unacked is not None:
            self._ack(self.unacked)
            self.unacked = None

    def _ack(self, head: bytes) -> None:
        """Ack the seq of a message frame, found without decoding the JSON."""
        at = head.find(b'"seq":')
        if at < 0:
            return
        digits = _SEQ.match(head, at + 6)
        room_at = head.find(b'"room":"')
        if digits is None or room_at < 0:
            return
        room_end = head.find(b'"', room_at + 8)
        room = head[room_at + 8 : room_end].decode()
        self.send({"type": "ack", "room": room, "seq": int(digits.group())})

    def _sample(self, payload: bytes) -> None:
        frame = orjson.loads(payload)
        kind = frame.get("type")
        stats = self.stats
        if kind == "message":
            room = frame["room"]
            seq = frame["seq"]
            last = self.last_seq.get(room, 0)
            if seq <= last:
                stats["duplicates"] += 1
            elif last and seq != last + 1:
                stats["out_of_order_or_gap"] += 1
            self.last_seq[room] = max(seq, last)
            content = frame.get("content", "")
            if content[:1] == "t":
                sent_ns = int(content[1:].split(":", 1)[0])
                stats["latencies"].append((time.monotonic_ns() - sent_ns) / 1e6)
            stats["sampled_messages"] += 1
        elif kind == "pong" and "t" in frame:
            stats["rtts"].append((time.monotonic_ns() - int(frame["t"])) / 1e6)
        elif kind == "ack" and self.sender:
            stats["acks"] += 1
        elif kind == "error":
            stats["error_" + str(frame.get("code"))] += 1

    def _fail(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.stats["dropped"] += 1
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before the upgrade"))
