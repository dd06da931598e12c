"""``shardchat chat``: a terminal client for people, on :class:`~shardchat.client.ChatClient`.

Prints the room's messages as they arrive (``HH:MM:SS [seq] sender: content``),
join and leave lines, and a line when the connection drops and comes back;
sends each line typed. ``/quit``, end of input or Ctrl-C leave at once (exit
0); a refusal prints the server's reason and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
import threading
import time

from shardchat.client.chatclient import ChatClient, ChatError, ClientError, ClientEvent

__all__ = ["run_chat"]


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _event_line(event: ClientEvent) -> str | None:
    if event.kind in ("join", "leave"):
        return f"* {event.user} {'joined' if event.kind == 'join' else 'left'} {event.room}"
    if event.kind == "disconnected":
        return f"* reconnecting… ({event.detail}; next try in {event.delay:.1f} s)"
    if event.kind == "reconnected":
        if event.recovered:
            return "* back (recovered)"
        return "* back (some messages could not be recovered)"
    return None


def _on_event(event: ClientEvent) -> None:
    line = _event_line(event)
    if line is not None:
        _print(line)


async def _chat(
    url: str, user: str, room: str, token: str | None, timeout: float, cafile: str | None
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Ctrl-C and SIGTERM leave at once: the loop is never stuck in a blocking read.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read_lines() -> None:
        # A daemon thread: it never holds up the exit, blocked in a read or not (the
        # default executor would: asyncio.run waits for its threads).
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    context = ssl.create_default_context(cafile=cafile) if cafile else None
    client = ChatClient(url, user=user, rooms=[room], token=token, timeout=timeout, ssl=context)
    client.on_event = _on_event
    starting = asyncio.ensure_future(client.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, ClientError):
            await starting
        await client.close()
        return 0
    try:
        starting.result()
    except ClientError as exc:
        sys.stderr.write(f"shardchat chat: {exc}\n")
        return 1
    _print(f"* {client.name} in {room} (shard {client.shard}); /quit or Ctrl-C to leave")
    threading.Thread(target=read_lines, name="stdin", daemon=True).start()

    async def show() -> None:
        async for message in client.messages():
            stamp = time.strftime("%H:%M:%S", time.localtime(message.timestamp / 1000))
            _print(f"{stamp} [{message.seq}] {message.sender}: {message.content}")

    async def typed() -> None:
        while (line := await lines.get()) is not None:
            text = line.rstrip("\n")
            if text.strip() == "/quit":
                return
            if not text:
                continue
            try:
                await client.send(room, text)
            except ChatError as exc:
                _print(f"* refused: {exc}")
        # End of input: let the last messages show before leaving.
        await asyncio.sleep(0.2)

    tasks = [asyncio.ensure_future(t) for t in (show(), typed())]
    try:
        await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
        failed = tasks[0].done() and tasks[0].exception() is not None
        if failed:
            sys.stderr.write(f"shardchat chat: {tasks[0].exception()}\n")
        return 1 if failed else 0
    finally:
        for task in [*tasks, stopping]:
            task.cancel()
        await client.close()


def run_chat(
    url: str,
    user: str,
    room: str,
    token: str | None = None,
    timeout: float = 10,
    cafile: str | None = None,
) -> int:
    """Run the terminal chat; the exit code (0, or 1 for a refusal or an outage).
    A wss:// URL connects over TLS, verified against ``cafile`` (a PEM CA bundle)
    or the system's CAs."""
    return asyncio.run(_chat(url, user, room, token, timeout, cafile))
