"""A stopped shard does not swallow new clients: after
``server.shard_unlisten`` without a heartbeat the supervisor takes its socket out
of the port's SO_REUSEPORT group, and the shard listens again once it runs."""

from __future__ import annotations

import asyncio
import os
import signal

from tests.support.helpers import clients_on_shards, closing, connect_client, running_server


async def test_stopped_shard_leaves_the_accept_group_and_comes_back() -> None:
    settings = ["server.shard_unlisten=1", "server.shard_timeout=120"]
    with running_server(workers=3, settings=settings) as srv:
        (before,) = await clients_on_shards(srv.url, [1], prefix="before")
        pids = srv.shard_pids()
        os.kill(pids[1], signal.SIGSTOP)
        try:
            srv.wait_for_log(lambda ev: any(e.get("event") == "shard_unlisten" for e in ev))
            # Every new client is served by a running shard; none waits in the stopped
            # shard's accept queue (connect_client's handshake deadline would fail it).
            clients = await asyncio.gather(*(connect_client(srv.url, f"n{i}") for i in range(30)))
            async with closing(clients):
                assert {c.shard for c in clients} <= {0, 2}
        finally:
            os.kill(pids[1], signal.SIGCONT)
        srv.wait_for_log(lambda ev: any(e.get("event") == "shard_relisten" for e in ev))
        # It was not restarted: its connection survived, and it takes new ones again.
        assert srv.shard_pids() == pids
        (after,) = await clients_on_shards(srv.url, [1], prefix="after")
        async with closing([before, after]):
            for client in (before, after):
                assert (await client.request("ping", "pong", id="on"))["id"] == "on"
