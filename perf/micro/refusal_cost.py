"""A shard's CPU per refused publish: what admission control costs when it refuses.

Two shards; the room's owner (shard 0) is stopped (SIGSTOP) and
``overload.forwards`` is 1, so that every publish a raw client sends to shard 1
after the first is refused ``overloaded`` at once. The client writes
``--count`` publishes in chunks of 500 and reads until every refusal came
back; the figure is shard 1's CPU time (``/proc``) over the refusals.
``--repeat`` runs, each its own server; the median and every run are printed.

    python -m perf.micro.refusal_cost --count 20000 --repeat 3

Past a few times a shard's capacity, refusing is most of what a shard does,
so this cost bounds how far past capacity the accepted messages' latency
stays bounded (perf/RESULTS.md, Overload).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import urllib.request

from perf.lib import procs
from shardchat.procstat import cpu_and_rss
from shardchat.testing.rawws import encode_frame, frame_at, upgrade_request
from shardchat.testing.rooms import room_owned_by

__all__ = ["main"]

CHUNK = 500  # publishes per write


async def connect_on(
    port: int, shard: int, room: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection (joined to ``room`` at open) whose welcome names ``shard``."""
    for attempt in range(200):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request(f"/ws?user=rc{attempt}&room={room}"))
        await reader.readuntil(b"\r\n\r\n")
        buf = bytearray()
        while (frame := frame_at(buf, 0, len(buf))) is None:
            buf += await reader.read(65536)
        head, n = frame
        if json.loads(bytes(buf[head : head + n]))["shard"] == shard:
            return reader, writer
        writer.close()
    raise RuntimeError(f"no connection landed on shard {shard}")


async def one_run(count: int) -> float:
    """Shard 1's CPU microseconds per refusal, in one fresh server."""
    settings = ["limits.rate=1000000", "limits.burst=1000000", "overload.forwards=1"]
    room = room_owned_by(0, 2, "rc")
    with procs.shardchat(2, settings) as server:
        url = f"http://127.0.0.1:{server.admin_port}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            pids = {s["id"]: s["pid"] for s in json.loads(response.read())["shards"]}
        reader, writer = await connect_on(server.port, 1, room)
        os.kill(pids[0], signal.SIGSTOP)
        try:
            frames = [
                encode_frame(
                    json.dumps(
                        {"type": "message", "room": room, "content": "x", "id": str(i)}
                    ).encode()
                )
                for i in range(count)
            ]
            refusals = count - 1  # the first waits for the stopped owner
            cpu0 = cpu_and_rss(pids[1])[0]

            async def read_all() -> None:
                # The code's quotes included; a carry shorter than it never holds a
                # whole one, so a code cut between two reads is counted once.
                marker = b'"overloaded"'
                seen, carry = 0, b""
                while seen < refusals:
                    data = carry + await reader.read(1 << 20)
                    seen += data.count(marker)
                    carry = data[-(len(marker) - 1) :]

            reading = asyncio.create_task(read_all())
            for i in range(0, count, CHUNK):
                writer.write(b"".join(frames[i : i + CHUNK]))
                await writer.drain()
            await asyncio.wait_for(reading, 120)
            cpu = cpu_and_rss(pids[1])[0] - cpu0
        finally:
            os.kill(pids[0], signal.SIGCONT)
        writer.close()
    return cpu / refusals * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = [asyncio.run(one_run(args.count)) for _ in range(args.repeat)]
    print(
        json.dumps(
            {
                "refusals": args.count - 1,
                "shard_cpu_us_per_refusal": round(statistics.median(runs), 1),
                "runs": [round(r, 1) for r in runs],
                "load_avg": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
