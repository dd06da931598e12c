"""``shardchat chat``: a terminal client for people, on :class:`~shardchat.client.ChatClient`.

Prints the room's messages as they arrive (``[seq] sender: content``) and
sends each line typed; ``/quit`` or end of input leaves.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time

from .client import ChatClient, ChatError

__all__ = ["run_chat"]


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _chat(url: str, user: str, room: str, token: str | None, cafile: str | None) -> None:
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    async with ChatClient(url, user=user, rooms=[room], token=token, ssl=context) as client:
        _print(f"* {user} in {room} (shard {client.shard}); /quit to leave")

        async def show() -> None:
            async for message in client.messages():
                stamp = time.strftime("%H:%M:%S", time.localtime(message.timestamp / 1000))
                _print(f"{stamp} [{message.seq}] {message.sender}: {message.content}")

        shower = asyncio.create_task(show())
        loop = asyncio.get_running_loop()
        try:
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line or line.strip() == "/quit":
                    break
                text = line.rstrip("\n")
                if not text:
                    continue
                try:
                    await client.send(room, text)
                except ChatError as exc:
                    _print(f"* refused: {exc}")
            # Let the last messages show before leaving.
            await asyncio.sleep(0.2)
        finally:
            shower.cancel()


def run_chat(
    url: str, user: str, room: str, token: str | None = None, cafile: str | None = None
) -> None:
    try:
        asyncio.run(_chat(url, user, room, token, cafile))
    except KeyboardInterrupt:
        pass
