"""The longest silences of each shard's loop heartbeat, sampled from outside.

    python -m perf.scenarios.heartbeat_gaps SUPERVISOR_PID SECONDS

Reads the heartbeat every shard stamps in its ring header (once per sweep call,
about every 20 ms) every 5 ms for SECONDS, and prints, per shard, the longest
gap and how many gaps exceeded 0.5, 1 and 2 s. A gap across a restart (the
writer pid changed) is not counted, nor a restart's recovery before its first
beat. Used to choose server.shard_unlisten.
"""

from __future__ import annotations

import json
import sys
import time

from shardchat.brokers import segments as shm
from shardchat.ring.layout import OFF_WRITER_PID, U64
from shardchat.ring.ring import ring_heartbeat_ns


def main() -> None:
    sup, seconds = int(sys.argv[1]), float(sys.argv[2])
    segments = []
    shard = 0
    while True:
        try:
            segments.append(shm.Segment.attach(shm.ring_name(sup, shard)))
        except Exception:
            break
        shard += 1
    views = [memoryview(s.buf) for s in segments]
    last = [ring_heartbeat_ns(v) for v in views]
    pids = [U64.unpack_from(v, OFF_WRITER_PID)[0] for v in views]
    fresh = [False] * len(views)
    longest = [0] * len(views)
    over = [{0.5: 0, 1.0: 0, 2.0: 0} for _ in views]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for i, view in enumerate(views):
            beat = ring_heartbeat_ns(view)
            pid = U64.unpack_from(view, OFF_WRITER_PID)[0]  # after: a restart shows
            if pid != pids[i] or not last[i] or not beat:
                # A restart: count from the new incarnation's first beat.
                pids[i], last[i], fresh[i] = pid, beat, True
                continue
            if fresh[i]:
                if beat != last[i]:
                    last[i], fresh[i] = beat, False
                continue
            if beat != last[i]:
                longest[i] = max(longest[i], beat - last[i])
                for limit in over[i]:
                    if (beat - last[i]) / 1e9 > limit:
                        over[i][limit] += 1
                last[i] = beat
        time.sleep(0.005)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "longest_s": [round(x / 1e9, 3) for x in longest],
                "gaps_over": [{str(k): v for k, v in o.items()} for o in over],
            }
        )
    )
    views.clear()
    for s in segments:
        s.close()


if __name__ == "__main__":
    main()
