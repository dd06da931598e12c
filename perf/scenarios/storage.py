"""The room store's costs, each against storage.kind = "memory" in the same run.

    python -m perf.scenarios.storage start [--messages 1000000 --rooms 10000 --workers 2]
    python -m perf.scenarios.storage ack [--count 400 --rounds 1 --pause 0 --against PROGRAM]
    python -m perf.scenarios.storage compare [--receivers 2000 --clients 1000 --rounds 2
                                              --against PROGRAM]
    python -m perf.scenarios.storage memory [--rooms 100 --history 1000 --against PROGRAM]
    python -m perf.scenarios.storage history [--messages 100000 --pages 200 --against PROGRAM]

- ``start``: a storage.dir holding ``--messages`` in ``--rooms`` (written
  straight into the shards' files), then ``shardchat start``: seconds until a
  client is welcomed, and until a rejoin with ``since`` is answered
  ``recovered`` with the room's messages.
- ``ack``: publish-to-ack latency of one client publishing one message at a
  time, for memory and each ``storage.fsync``.
- ``compare``: the fan-out's best rate and CPU per delivery, and the rooms
  scenario's CPU per delivery and p99, memory against sqlite (fsync batch),
  pinned as perf.scenarios.run pins them.
- ``memory``: RSS of the shards before and after a client (on one shard)
  joined ``--rooms`` rooms of ``--history`` messages each: bytes per held
  message and per room, at 1 and 6 shards, memory against sqlite; VmRSS
  (the rings' shared pages counted once per shard that reads them) and
  RssAnon (the private heap, where the rooms' logs are).
- ``history``: ms per `history` page of 50 in a room of ``--messages`` in the
  store, from the room's owner and from another shard.

``--against`` names another checkout's ``shardchat``, run alternately with
this one's on each configuration.

A benchmark, not a test: short and bounded; the figures go to perf/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import websockets

from perf.lib import procs
from perf.scenarios.run import (
    CLIENT_CPU,
    FAST,
    SERVER_CPU,
    best_rate,
    cost_ratio,
    fanout_against,
    load,
    pin_self,
)
from shardchat.procstat import rss_anon
from shardchat.storage.boxdir import StorageDir, store_path
from shardchat.storage.store import RoomStore
from shardchat.storage.transactions import connect, span_messages, store_rows

CONTENT = "x" * 100


def _json(room: str, seq: int) -> bytes:
    return json.dumps(
        {
            "type": "message", "room": room, "sender": "bench", "content": CONTENT,
            "seq": seq, "timestamp": 1_700_000_000_000, "id": f"b-{room}-{seq}",
        },
        separators=(",", ":"),
    ).encode()  # fmt: skip


def fill_store(directory: Path, workers: int, rooms: int, per_room: int) -> str:
    """A storage.dir as a server of ``workers`` shards would leave it; its epoch."""
    directory.mkdir(parents=True, exist_ok=True)
    epoch = "bench-epoch"
    (directory / "meta.json").write_text(json.dumps({"epoch": epoch, "workers": workers}))
    dbs = [connect(store_path(directory, shard, workers), "OFF") for shard in range(workers)]
    now = time.time()
    for db in dbs:
        db.execute("BEGIN")
    for r in range(rooms):
        room = f"room-{r}"
        db = dbs[zlib.crc32(room.encode()) % workers]
        store_rows(db, ((room, seq, now, "", _json(room, seq)) for seq in range(1, per_room + 1)))
    for db in dbs:
        db.execute("COMMIT")
        db.close()
    return epoch


async def _welcome(port: int, deadline: float) -> Any:
    while True:
        try:
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?user=probe", max_size=None)
            await ws.recv()
            return ws
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)


def _welcome_time(args: list[str], port: int, cwd: Path) -> float:
    """Seconds from ``shardchat start`` to a welcome (the same server, no store)."""
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=cwd)

    async def welcome() -> float:
        ws = await _welcome(port, start + 30)
        took = time.monotonic() - start
        await ws.close()
        return took

    try:
        return asyncio.run(welcome())
    finally:
        procs._stop(proc, 30)


def run_start(messages: int, rooms: int, workers: int) -> dict[str, Any]:
    per_room = messages // rooms
    tmp = Path(tempfile.mkdtemp(prefix="shardchat-bench-start-"))
    try:
        t = time.perf_counter()
        epoch = fill_store(tmp / "store", workers, rooms, per_room)
        fill_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in (tmp / "store").iterdir())
        # The store's own share of a start: the supervisor's mending and seeding
        # reads, and each shard's restore (seqs and keys).
        t = time.perf_counter()
        held = StorageDir.open(tmp / "store", workers)
        seqs = sum(len(held.seqs(shard)) for shard in range(workers))
        paths = [held.path(shard) for shard in range(workers)]
        held.close(clean=True)  # as a run that stopped cleanly leaves it
        open_s = time.perf_counter() - t
        t = time.perf_counter()
        for path in paths:
            store: RoomStore[None] = RoomStore(
                path, fsync="batch", max_bytes=0, history=per_room, history_ttl=0,
                wake=lambda: None,
            )  # fmt: skip
            store.restore()
            store.close()
        restore_s = time.perf_counter() - t
        assert seqs == rooms
        port, admin = procs.free_port(), procs.free_port()
        args = [procs.SHARDCHAT, "start", "--workers", str(workers), "--port", str(port)]
        for s in (
            f"server.admin_port={admin}",
            "log.level=warning",
            f"storage.dir={tmp / 'store'}",
        ):
            args += ["--set", s]
        empty = _welcome_time([*args[:-2], "--set", "storage.kind=memory"], port, tmp)
        start = time.monotonic()
        proc = subprocess.Popen(args, cwd=tmp)
        try:

            async def probe() -> tuple[float, float, int]:
                ws = await _welcome(port, start + 30)
                welcomed = time.monotonic() - start
                room = f"room-{rooms // 2}"
                await ws.send(
                    json.dumps({"type": "join", "room": room, "since": 0, "epoch": epoch})
                )
                got = 0
                while True:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "joined":
                        assert frame["recovered"] is True and frame["seq"] == per_room, frame
                    elif frame["type"] == "message":
                        got += 1
                        if got == per_room:
                            break
                await ws.close()
                return welcomed, time.monotonic() - start, got

            welcomed, recovered, got = asyncio.run(probe())
        finally:
            procs._stop(proc, 30)
        return {
            "messages": per_room * rooms, "rooms": rooms, "workers": workers,
            "store_bytes": size, "fill_s": round(fill_s, 2),
            "welcome_s": round(welcomed, 3), "recovered_join_s": round(recovered, 3),
            "memory_welcome_s": round(empty, 3),
            "store_open_s": round(open_s, 3), "shards_restore_s": round(restore_s, 3),
            "replayed": got,
        }  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _acks(port: int, count: int, pause: float = 0.0) -> list[float]:
    """ms from each publish to its ack, one message at a time, ``pause`` seconds
    between an ack and the next publish."""
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?user=acker")
    await ws.recv()
    await ws.send(json.dumps({"type": "join", "room": "acks"}))
    while json.loads(await ws.recv())["type"] != "joined":
        pass
    times = []
    for i in range(count):
        t = time.perf_counter()
        await ws.send(
            json.dumps({"type": "message", "room": "acks", "content": CONTENT, "id": f"a{i}"})
        )
        while json.loads(await ws.recv())["type"] != "ack":
            pass
        times.append((time.perf_counter() - t) * 1e3)
        if pause:
            await asyncio.sleep(pause)
    await ws.close()
    return sorted(times)


def run_ack(
    count: int, rounds: int = 1, against: str | None = None, pause: float = 0.0
) -> dict[str, Any]:
    """Memory and each fsync policy (and ``against``'s, alternated), ``rounds`` times."""
    out: dict[str, Any] = {"rounds": []}
    for _ in range(rounds):
        row: dict[str, Any] = {}
        for name, settings in (
            ("memory", ["storage.kind=memory"]),
            ("off", ["storage.fsync=off"]),
            ("batch", ["storage.fsync=batch"]),
            ("always", ["storage.fsync=always"]),
        ):
            for label, program in _programs(None if name == "memory" else against):
                store = tempfile.mkdtemp(prefix="shardchat-bench-ack-")
                cfg = [*FAST, *settings, f"storage.dir={store}"]
                try:
                    with procs.shardchat(1, settings=cfg, program=program) as server:
                        times = asyncio.run(_acks(server.port, count, pause))
                finally:
                    shutil.rmtree(store, ignore_errors=True)
                row[name + label] = {
                    "p50_ms": round(statistics.median(times), 3),
                    "p99_ms": round(times[int(len(times) * 0.99) - 1], 3),
                    "mean_ms": round(statistics.fmean(times), 3),
                }
        out["rounds"].append(row)
    return out


def run_compare(
    receivers: int, clients: int, rounds: int = 2, against: str | None = None
) -> dict[str, Any]:
    """Memory and sqlite (and ``against``'s sqlite) alternately, ``rounds`` times
    each (the machine is shared: the spread of one kind's rounds is the noise)."""
    pin_self(CLIENT_CPU)
    out: dict[str, Any] = {"rounds": []}
    runs: dict[str, dict[str, Any]] = {}
    sides = [("memory", ["storage.kind=memory"], procs.SHARDCHAT)]
    sides += [(f"sqlite{label}", [], program) for label, program in _programs(against)]
    for round_ in range(rounds):
        row: dict[str, Any] = {}
        for name, settings, program in sides:
            store = tempfile.mkdtemp(prefix="shardchat-bench-compare-")
            cfg = [*FAST, *settings, f"storage.dir={store}"]
            try:
                with procs.shardchat(1, settings=cfg, cpus=SERVER_CPU, program=program) as server:
                    fanout = runs[f"fanout-{name}-{round_}"] = fanout_against(
                        server, f"store-{name}", receivers, [], "5,10,20,40"
                    )
                with procs.shardchat(1, settings=cfg, cpus=SERVER_CPU, program=program) as server:
                    args = ["rooms", "--port", str(server.port), "--target", f"store-rooms-{name}"]
                    args += ["--clients", str(clients), "--room-size", "10"]
                    args += ["--interval-ms", "1000", "--seconds", "10"]
                    args += ["--admin", f"http://127.0.0.1:{server.admin_port}"]
                    rooms = runs[f"rooms-{name}-{round_}"] = load(args)
            finally:
                shutil.rmtree(store, ignore_errors=True)
            cores = rooms["server_cpu_cores"]
            row[name] = {
                "fanout_best": best_rate(fanout),
                "fanout_us_per_delivery": {
                    s["offered_rate"]: s["server_us_per_delivery"] for s in fanout["steps"]
                },
                "rooms_cores": cores,
                "rooms_us_per_delivery": round(cores / rooms["deliveries_per_s"] * 1e6, 3),
                "rooms_p99_ms": rooms["run"]["latency_ms"]["p99"],
            }
        row.update(
            cost_ratio(
                runs[f"fanout-memory-{round_}"], runs[f"fanout-sqlite-{round_}"], "fanout_cost"
            )
        )
        out["rounds"].append(row)
    out["raw"] = runs
    return out


def _rss(pids: list[int]) -> int:
    return sum(procs.rss_bytes(pid) for pid in pids)


def _anon(pids: list[int]) -> int:
    """The processes' private memory (RssAnon): the heap that holds the rooms'
    logs, without the rings' shared pages that VmRSS counts once per reader."""
    return sum(rss_anon(pid) for pid in pids)


def _programs(against: str | None) -> list[tuple[str, str]]:
    """This checkout's server, and ``against`` (another checkout's ``shardchat``)."""
    return [("", procs.SHARDCHAT)] + ([("-against", against)] if against else [])


def run_memory(rooms: int, history: int, against: str | None = None) -> dict[str, Any]:
    """With ``against``, that checkout's server too, alternated with this one's on
    each configuration: a before and after of the same run."""
    out: dict[str, Any] = {}
    for workers in (1, 6):
        for name, settings in (("memory", ["storage.kind=memory"]), ("sqlite", [])):
            for label, program in _programs(against):
                store = tempfile.mkdtemp(prefix="shardchat-bench-memory-")
                cfg = [*FAST, f"delivery.history={history}", *settings, f"storage.dir={store}"]
                try:
                    with procs.shardchat(workers, settings=cfg, program=program) as server:
                        row = _held_rss(server, rooms, history)
                finally:
                    shutil.rmtree(store, ignore_errors=True)
                out[f"{name}-w{workers}{label}"] = row
                print(f"{name}-w{workers}{label}", row, file=sys.stderr)
    return out


def _held_rss(server: procs.Running, rooms: int, history: int) -> dict[str, Any]:
    pids = server.server_pids()

    async def fill(port: int = server.port) -> None:
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?user=filler", max_size=None)
        await ws.recv()
        for r in range(rooms):
            await ws.send(json.dumps({"type": "join", "room": f"m{r}"}))
        joined = 0
        while joined < rooms:
            got = json.loads(await ws.recv())
            assert got["type"] != "error", got
            joined += got["type"] == "joined"
        body = [
            json.dumps({"type": "message", "room": f"m{r}", "content": CONTENT})
            for r in range(rooms)
        ]
        answered = 0
        for i in range(history):
            for frame in body:
                await ws.send(frame)
            # A round at a time: overload.forwards bounds what is in flight.
            while answered < (i + 1) * rooms:
                got = json.loads(await ws.recv())
                assert got["type"] != "error", got
                answered += got["type"] == "ack"
        await ws.close()

    before, anon_before = _rss(pids), _anon(pids)
    asyncio.run(fill())
    time.sleep(1.0)
    after, anon_after = _rss(pids), _anon(pids)
    held = rooms * history
    return {
        "rss_before": before, "rss_after": after,
        "bytes_per_message": round((after - before) / held, 1),
        "bytes_per_room": round((after - before) / rooms),
        "anon_before": anon_before, "anon_after": anon_after,
        "anon_bytes_per_message": round((anon_after - anon_before) / held, 1),
        "anon_bytes_per_room": round((anon_after - anon_before) / rooms),
    }  # fmt: skip


async def _on_shard(port: int, shard: int) -> Any:
    """A connection that the kernel gave to ``shard`` (connect until one is)."""
    for i in range(200):
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?user=p{shard}x{i}", max_size=None)
        if json.loads(await ws.recv())["shard"] == shard:
            return ws
        await ws.close()
    raise RuntimeError(f"no connection landed on shard {shard}")


async def _page_ms(ws: Any, query: dict[str, Any]) -> tuple[float, int]:
    """One `history` request: ms until its `history_end`, and the messages sent."""
    t = time.perf_counter()
    await ws.send(json.dumps({"type": "history", "room": "room-0", **query}))
    got = 0
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "history_end":
            return (time.perf_counter() - t) * 1e3, got
        got += frame["type"] == "message"


def _direct_reads(store: Path, workers: int, owner: int, befores: list[int]) -> dict[str, Any]:
    """The other design's own cost: a page of 50 read from the owner's file by
    another process through a read-only connection (what a shard would do
    instead of asking the owner through the rings), without the answer's trip."""
    uri = f"file:{store_path(store, owner, workers)}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        times = []
        for before in befores:
            t = time.perf_counter()
            spans = db.execute(
                "SELECT first, rows FROM spans WHERE room = ? AND last >= ? ORDER BY last",
                ("room-0", before - 50),
            )
            rows = []
            for begins, blob in spans:
                if begins >= before:
                    break
                rows += [m for m in span_messages(blob) if before - 50 <= m[0] < before]
            spans.close()
            times.append((time.perf_counter() - t) * 1e3)
            assert len(rows) == 50
    finally:
        db.close()
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[int(len(times) * 0.99) - 1], 3),
    }


def run_history(messages: int, pages: int, against: str | None = None) -> dict[str, Any]:
    """A room of ``messages`` in the store (delivery.history as many), 3 shards:
    ms per `history` page of 50 (``limit`` and ``before``, older than any
    shard keeps in memory, and the latest 50) from the room's owner and from
    another shard, each page after a first one that warms the room up."""
    workers = 3
    owner = zlib.crc32(b"room-0") % workers
    other = (owner + 1) % workers
    rng = random.Random(7)
    befores = [rng.randrange(51, messages - 5000) for _ in range(pages)]
    out: dict[str, Any] = {}
    for label, program in _programs(against):
        tmp = Path(tempfile.mkdtemp(prefix="shardchat-bench-history-"))
        try:
            fill_store(tmp / "store", workers, 1, messages)
            cfg = [*FAST, f"delivery.history={messages}", f"storage.dir={tmp / 'store'}"]
            with procs.shardchat(workers, settings=cfg, program=program) as server:

                async def measure(port: int = server.port) -> dict[str, Any]:
                    row: dict[str, Any] = {}
                    for where, shard in (("owner", owner), ("other", other)):
                        ws = await _on_shard(port, shard)
                        await _page_ms(ws, {"limit": 50})  # the room's first use here
                        older, latest = [], []
                        for before in befores:
                            ms, got = await _page_ms(ws, {"limit": 50, "before": before})
                            assert got == 50, got
                            older.append(ms)
                            latest.append((await _page_ms(ws, {"limit": 50}))[0])
                        await ws.close()
                        for kind, times in (("older", older), ("latest", latest)):
                            times.sort()
                            row[f"{where}_{kind}"] = {
                                "p50_ms": round(statistics.median(times), 3),
                                "p99_ms": round(times[int(len(times) * 0.99) - 1], 3),
                            }
                    return row

                row = asyncio.run(measure())
                row["shard_rss"] = _rss(server.server_pids())
            if not label:
                out["direct_read"] = _direct_reads(tmp / "store", workers, owner, befores)
            out[f"history{label}"] = row
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    start = sub.add_parser("start")
    start.add_argument("--messages", type=int, default=1_000_000)
    start.add_argument("--rooms", type=int, default=10_000)
    start.add_argument("--workers", type=int, default=2)
    ack = sub.add_parser("ack")
    ack.add_argument("--count", type=int, default=400)
    ack.add_argument("--rounds", type=int, default=1)
    ack.add_argument("--pause", type=float, default=0.0, help="seconds between an ack and the next")
    compare = sub.add_parser("compare")
    compare.add_argument("--receivers", type=int, default=2000)
    compare.add_argument("--clients", type=int, default=1000)
    compare.add_argument("--rounds", type=int, default=2)
    memory = sub.add_parser("memory")
    memory.add_argument("--rooms", type=int, default=100)
    memory.add_argument("--history", type=int, default=1000)
    history = sub.add_parser("history")
    history.add_argument("--messages", type=int, default=100_000)
    history.add_argument("--pages", type=int, default=200)
    for with_other in (memory, history, ack, compare):
        with_other.add_argument("--against", help="another checkout's shardchat, alternated")
    args = parser.parse_args()
    if args.what == "start":
        result = run_start(args.messages, args.rooms, args.workers)
    elif args.what == "ack":
        result = run_ack(args.count, args.rounds, args.against, args.pause)
    elif args.what == "compare":
        result = run_compare(args.receivers, args.clients, args.rounds, args.against)
    elif args.what == "history":
        result = run_history(args.messages, args.pages, args.against)
    else:
        result = run_memory(args.rooms, args.history, args.against)
    path = procs.write_result(f"storage-{args.what}", result)
    shown = {k: v for k, v in result.items() if k != "raw"}
    print(json.dumps(shown, indent=2))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
