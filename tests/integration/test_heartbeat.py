"""Heartbeats and idle timeouts: 4408 for a client that does not answer or stays silent."""

from __future__ import annotations

import asyncio
import json
import time

from shardchat.testing.rawws import OP_CLOSE, close_code
from tests.support.helpers import RawClient, closing, connect_client, running_server, scaled


async def test_unanswered_pings_close_4408_while_a_normal_client_stays() -> None:
    """interval=0.3, timeout=1: a raw client that ignores pings is closed with 4408
    within 3 s; a normal client (websockets answers pings) stays connected for 10
    intervals (3 s)."""
    interval = 0.3
    settings = [f"heartbeat.interval={interval}", "heartbeat.timeout=1"]
    with running_server(workers=2, settings=settings) as srv:
        normal = await connect_client(srv.url, user="normal")
        async with closing([normal]):
            raw = await asyncio.to_thread(RawClient, srv.port, "/ws?user=deaf")
            started = time.monotonic()
            code = None
            while code is None:
                opcode, payload = await asyncio.to_thread(raw.recv_frame)
                if opcode == OP_CLOSE:
                    code = close_code(payload) or 1005  # 1005: a close without a code
                    reason = payload[2:].decode()
            raw.close()
            assert code == 4408 and reason == "heartbeat timeout"
            assert time.monotonic() - started < scaled(3)
            await asyncio.sleep(10 * interval - (time.monotonic() - started))
            pong = await normal.request("ping", "pong", id="still")
            assert pong["id"] == "still"


async def test_idle_client_closed_4408_and_app_ping_counts_as_activity() -> None:
    """idle_timeout=2: a client that sends nothing is closed with 4408; one that sends
    application pings is not."""
    settings = ["heartbeat.idle_timeout=2", "heartbeat.interval=30"]
    with running_server(workers=1, settings=settings) as srv:
        idle = await asyncio.to_thread(RawClient, srv.port, "/ws?user=idle")
        busy = await asyncio.to_thread(RawClient, srv.port, "/ws?user=busy")
        try:
            started = time.monotonic()
            while time.monotonic() - started < 3.5:
                busy.send_json({"type": "ping"})
                await asyncio.sleep(0.5)
            assert await asyncio.to_thread(idle.close_code) == 4408
            busy.send_json({"type": "ping", "id": "alive"})
            while True:
                opcode, payload = await asyncio.to_thread(busy.recv_frame)
                if opcode == 0x1 and json.loads(payload).get("id") == "alive":
                    break
        finally:
            idle.close()
            busy.close()
