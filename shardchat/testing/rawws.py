"""A raw WebSocket client's wire: the upgrade request and the frame codec (RFC 6455).

Tests and benchmarks talk to the server over bare sockets with these, not with
websockets' ``Frame``: tests send frames that ``Frame.serialize`` refuses to
build (a 300-byte ping, a ping without FIN, RSV bits, an unmasked client
frame), and the load generators need a fixed masking key so that masking
costs nothing (RFC 6455 asks for a key, not a random-looking one; XOR with
zero leaves the payload as it is).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from ssl import SSLContext

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "ZERO_MASK",
    "close_code",
    "close_frame",
    "encode_frame",
    "frame_at",
    "open_upgraded",
    "parse_frames",
    "read_frame",
    "response_head",
    "take_head",
    "upgrade_request",
    "upgrade_status",
]

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
ZERO_MASK = b"\0\0\0\0"


def upgrade_request(path: str, host: str | None = "127.0.0.1", headers: str = "") -> bytes:
    """The client's opening handshake for ``path`` (with its query), a fresh key
    each time; no Host header if ``host`` is None; ``headers`` are extra header
    lines, each ending in CRLF."""
    key = base64.b64encode(os.urandom(16)).decode()
    host_line = "" if host is None else f"Host: {host}\r\n"
    return (
        f"GET {path} HTTP/1.1\r\n{host_line}Upgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
    ).encode()


def upgrade_status(head: bytes) -> int:
    """The status code of a response head (``HTTP/1.1 101 Switching Protocols...``)."""
    return int(head.split(b" ", 2)[1])


def response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """A response head's status and its headers (names lower-cased, values stripped)."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers


async def open_upgraded(
    port: int,
    path: str,
    host: str = "127.0.0.1",
    *,
    local_addr: str | None = None,
    ssl: SSLContext | None = None,
    limit: int = 1 << 16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection upgraded to a WebSocket (from ``local_addr`` if given): its
    streams, the response head read. ConnectionError names the status line of a
    refused upgrade."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl, local_addr=None if local_addr is None else (local_addr, 0), limit=limit
    )
    writer.write(upgrade_request(path, host))
    head = await reader.readuntil(b"\r\n\r\n")
    if upgrade_status(head) != 101:
        writer.close()
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    return reader, writer


def take_head(buf: bytearray) -> int | None:
    """The status of the response head at the start of ``buf``, taken out of it;
    None (``buf`` untouched) until the whole head is there."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status = upgrade_status(bytes(buf[:end]))
    del buf[: end + 4]
    return status


def encode_frame(
    payload: bytes,
    opcode: int = OP_TEXT,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = ZERO_MASK,
) -> bytes:
    """One frame. ``mask`` is the 4-byte masking key of a client frame; None sends
    it unmasked, as a server does. ``rsv`` is the three RSV bits, in place (0x70)."""
    n = len(payload)
    bit = 0 if mask is None else 0x80
    first = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if mask is None:
        return head + payload
    if mask == ZERO_MASK:
        return head + mask + payload
    whole = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")).to_bytes(n, "big")
    return head + mask + body


def close_frame(code: int, reason: bytes = b"", mask: bytes | None = ZERO_MASK) -> bytes:
    return encode_frame(struct.pack("!H", code) + reason, OP_CLOSE, mask=mask)


def close_code(payload: bytes) -> int | None:
    """The code of a close frame's payload; None when it carries none (1005)."""
    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None


def frame_at(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """(header length, payload length) of the unmasked frame at ``pos``, or None if
    ``buf[pos:end]`` does not hold all of it yet."""
    if end - pos < 2:
        return None
    n = buf[pos + 1] & 0x7F
    head = 2
    if n == 126:
        if end - pos < 4:
            return None
        n = (buf[pos + 2] << 8) | buf[pos + 3]
        head = 4
    elif n == 127:
        if end - pos < 10:
            return None
        n = struct.unpack_from("!Q", buf, pos + 2)[0]
        head = 10
    return (head, n) if end - pos >= head + n else None


def parse_frames(buf: bytes | bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """The complete unmasked frames at the start of ``buf``: a list of (opcode,
    payload) and how many bytes they took; a partial frame is left."""
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(buf)
    while (at := frame_at(buf, pos, end)) is not None:
        head, n = at
        out.append((buf[pos] & 0x0F, bytes(buf[pos + head : pos + head + n])))
        pos += head + n
    return out, pos


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next unmasked frame's (opcode, payload); IncompleteReadError at the end."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)
