"""A light WebSocket client for load: raw sockets, the handshake by hand.

A ``websockets`` client costs a task, buffers and a protocol per connection
and saturates the load process long before the server; for idle connections
the handshake bytes are all that is needed.
"""

from __future__ import annotations

import asyncio
import base64
import os

__all__ = ["open_idle"]


def upgrade_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def open_idle(
    host: str, port: int, path: str, local_addr: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect from ``local_addr``, upgrade, and return the open stream."""
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(local_addr, 0), limit=4096
    )
    writer.write(upgrade_request(host, port, path))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        writer.close()
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    return reader, writer
