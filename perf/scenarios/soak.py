"""Soak: mixed traffic for a long time, a random shard killed with SIGKILL every
``--kill-every`` seconds, connection churn; counts acked, lost and duplicated
messages and plots each shard's anonymous memory over time.

    python -m perf.scenarios.soak --minutes 30          # writes perf/results/soak.json and soak.png

Publishers send with an ``id`` on every publish and, after ``unavailable`` or a
dropped connection, send the same publish again with the same ``id`` (the
owner deduplicates it, PROTOCOL.md Extensions). A watcher per room rejoins with
``since``/``epoch`` after every kill. At the end:

- acked: publishes answered with ``ack``;
- lost: acked (room, seq) that the room's watcher never received, or received
  with other content;
- duplicated: one publish (one content) delivered under two seqs;
- history: every shard's ``history`` of every room ends at the room's latest
  seq with no hole and agrees with the owner's on every seq both hold
  (``disagree``); ``not_from_seq_1`` counts the windows that do not reach back
  to seq 1 (a shard restarted since, and its rings no longer held the start).

Bounded in time and count, loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from perf.lib import procs
from shardchat.brokers.sequencer import owner_of
from shardchat.procstat import rss_anon

# The default history (1,000 per room): each shard's memory then levels off once
# every room's window is full, so growth over time would be a leak.
SETTINGS = ["limits.rate=100000", "limits.burst=100000"]


class Soak:
    def __init__(self, url: str, admin: str, rooms: int, workers: int) -> None:
        self.url = url
        self.admin = admin
        self.rooms = [f"soak{i}" for i in range(rooms)]
        self.workers = workers
        self.acked: dict[str, tuple[str, int]] = {}  # content -> (room, seq)
        self.seen: dict[str, dict[int, str]] = {r: {} for r in self.rooms}  # watchers' views
        self.seen_contents: dict[str, set[int]] = {}  # content -> seqs it was delivered as
        self.unavailable = 0
        self.retries = 0
        self.not_recovered = 0
        self.rejoins = 0
        self.kills: list[float] = []
        self.churned = 0
        self.memory: list[dict[str, Any]] = []
        self.stop = asyncio.Event()
        self.t0 = time.monotonic()

    async def _connect(self, query: str) -> ClientConnection:
        return (await self._connect_welcome(query))[0]

    async def _connect_welcome(self, query: str) -> tuple[ClientConnection, dict[str, Any]]:
        while True:
            try:
                ws = await connect(self.url + query, max_size=None, open_timeout=10)
                welcome: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
                return ws, welcome
            except (OSError, WebSocketException, TimeoutError):
                await asyncio.sleep(0.05)

    async def publisher(self, n: int, rate: float) -> None:
        """Publishes until told to stop; every publish is resent with its id until acked."""
        unacked: dict[str, tuple[str, str]] = {}  # id -> (room, content)
        counter = 0
        rng = random.Random(n)
        # Two rooms each: a publisher must be a member, and reading every room's
        # traffic would make the load client the bottleneck.
        mine = [self.rooms[(2 * n + i) % len(self.rooms)] for i in range(2)]
        while unacked or not self.stop.is_set():
            ws = await self._connect(f"?user=pub{n}")
            try:
                for room in mine:
                    await ws.send(json.dumps({"type": "join", "room": room}))
                for rid, (room, content) in unacked.items():
                    self.retries += 1
                    await ws.send(
                        json.dumps({"type": "message", "room": room, "content": content, "id": rid})
                    )
                reader = asyncio.create_task(self._publisher_reader(ws, unacked))
                while not self.stop.is_set() and not reader.done():
                    counter += 1
                    rid = f"p{n}-{counter}"
                    room = rng.choice(mine)
                    unacked[rid] = (room, rid)
                    await ws.send(
                        json.dumps({"type": "message", "room": room, "content": rid, "id": rid})
                    )
                    await asyncio.sleep(rng.expovariate(rate))
                if self.stop.is_set():
                    deadline = time.monotonic() + 60
                    while unacked and not reader.done() and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    if not unacked or time.monotonic() >= deadline:
                        reader.cancel()
                        return
                with contextlib.suppress(Exception):
                    await reader
            except (OSError, WebSocketException):
                pass
            finally:
                await ws.close()

    async def _publisher_reader(
        self, ws: ClientConnection, unacked: dict[str, tuple[str, str]]
    ) -> None:
        with contextlib.suppress(OSError, WebSocketException):
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame["type"]
                if kind == "ack":
                    item = unacked.pop(frame["id"], None)
                    if item is not None:
                        self.acked[item[1]] = (frame["room"], frame["seq"])
                elif kind == "error" and frame.get("code") == "unavailable":
                    self.unavailable += 1
                    item = unacked.get(frame["id"])
                    if item is not None:
                        self.retries += 1
                        msg = {
                            "type": "message",
                            "room": item[0],
                            "content": item[1],
                            "id": frame["id"],
                        }
                        await ws.send(json.dumps(msg))

    async def watcher(self, room: str) -> None:
        last = 0
        epoch: str | None = None
        while not self.stop.is_set():
            ws = await self._connect("?user=watch")
            try:
                join: dict[str, Any] = {"type": "join", "room": room}
                if epoch is not None:
                    join |= {"since": last, "epoch": epoch}
                    self.rejoins += 1
                await ws.send(json.dumps(join))
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["type"] == "joined":
                        if epoch is not None and not frame.get("recovered", True):
                            self.not_recovered += 1
                        if frame["epoch"] != epoch and epoch is not None:
                            last = 0
                        epoch = frame["epoch"]
                    elif frame["type"] == "message" and frame["room"] == room:
                        seq = frame["seq"]
                        if seq <= last:
                            continue
                        last = seq
                        self.seen[room][seq] = frame["content"]
                        self.seen_contents.setdefault(frame["content"], set()).add(seq)
                    if self.stop.is_set() and self._watcher_done(room, last):
                        return
            except (OSError, WebSocketException):
                pass
            finally:
                await ws.close()

    def _watcher_done(self, room: str, last: int) -> bool:
        return all(seq <= last for r, seq in self.acked.values() if r == room)

    async def churn(self, per_second: float) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError, WebSocketException, TimeoutError):
                ws = await connect(self.url + "?user=churn", open_timeout=5)
                await ws.close()
                self.churned += 1
            await asyncio.sleep(1 / per_second)

    async def killer(self, every: float) -> None:
        rng = random.Random(7)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), every)
                return
            pids = await asyncio.to_thread(procs.shard_pids, self.admin)
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                self.kills.append(round(time.monotonic() - self.t0, 1))

    async def sampler(self, every: float) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                status = await asyncio.to_thread(_status, self.admin)
                for shard in status["shards"]:
                    if shard["alive"]:
                        self.memory.append(
                            {
                                "t": round(time.monotonic() - self.t0, 1),
                                "shard": shard["id"],
                                "rss_anon": rss_anon(shard["pid"]),
                            }
                        )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), every)

    async def histories(self) -> dict[str, int]:
        """Every shard's history of every room, against the owner's."""
        disagree = 0
        checked = 0
        by_shard: dict[int, ClientConnection] = {}
        tries = 0
        while len(by_shard) < self.workers and tries < 400:
            tries += 1
            ws, welcome = await self._connect_welcome("?user=check")
            if welcome["shard"] not in by_shard:
                by_shard[welcome["shard"]] = ws
            else:
                await ws.close()
        views: dict[int, dict[str, dict[int, str]]] = {}
        for shard, ws in by_shard.items():
            views[shard] = {}
            for room in self.rooms:
                await ws.send(json.dumps({"type": "history", "room": room}))
                got: dict[int, str] = {}
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["type"] == "message" and frame["room"] == room:
                        got[frame["seq"]] = frame["content"]
                    elif frame["type"] == "history_end" and frame["room"] == room:
                        break
                views[shard][room] = got
            await ws.close()
        # Each shard holds a window of each room's history: how far back depends on
        # its last restart (a restarted shard rebuilds from what the rings retain).
        # Every window must end at the room's latest seq, have no hole, and agree
        # with the owner's on every seq both hold.
        shorter = 0
        for room in self.rooms:
            owner = views.get(owner_of(room, self.workers), {}).get(room, {})
            latest = max((max(r[room], default=0) for r in views.values()), default=0)
            for rooms in views.values():
                checked += 1
                held = rooms[room]
                common = held.keys() & owner.keys()
                hole = held and sorted(held) != list(range(min(held), latest + 1))
                if hole or any(held[seq] != owner[seq] for seq in common):
                    disagree += 1
                if len(held) < latest:
                    shorter += 1
        return {"checked": checked, "disagree": disagree, "not_from_seq_1": shorter}

    def report(self) -> dict[str, Any]:
        lost = 0
        for content, (room, seq) in self.acked.items():
            if self.seen[room].get(seq) != content:
                lost += 1
        duplicated = sum(1 for seqs in self.seen_contents.values() if len(seqs) > 1)
        return {
            "acked": len(self.acked),
            "lost": lost,
            "duplicated": duplicated,
            "unavailable": self.unavailable,
            "resent_with_same_id": self.retries,
            "rejoins": self.rejoins,
            "rejoins_not_recovered": self.not_recovered,
            "kills": self.kills,
            "churned_connections": self.churned,
        }


def _status(admin: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(admin + "/status", timeout=5) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with procs.shardchat(args.workers, SETTINGS) as server:
        url = f"ws://127.0.0.1:{server.port}/ws"
        admin = f"http://127.0.0.1:{server.admin_port}"
        soak = Soak(url, admin, args.rooms, args.workers)
        watchers = [asyncio.create_task(soak.watcher(room)) for room in soak.rooms]
        await asyncio.sleep(1)  # the watchers' joins first, so that they see every seq
        publishers = [
            asyncio.create_task(soak.publisher(n, args.rate / args.publishers))
            for n in range(args.publishers)
        ]
        others = [
            asyncio.create_task(soak.churn(args.churn)),
            asyncio.create_task(soak.killer(args.kill_every)),
            asyncio.create_task(soak.sampler(5.0)),
        ]
        await asyncio.sleep(args.minutes * 60)
        soak.stop.set()
        await asyncio.wait_for(asyncio.gather(*publishers, *others), 120)
        done, pending = await asyncio.wait(watchers, timeout=60)
        for task in pending:
            task.cancel()
        histories = await asyncio.wait_for(soak.histories(), 120)
        result = soak.report()
        result |= {
            "histories": histories,
            "watchers_unfinished": len(pending),
            "minutes": args.minutes,
            "workers": args.workers,
            "rooms": args.rooms,
            "publishers": args.publishers,
            "offered_rate": args.rate,
            "churn_per_s": args.churn,
            "kill_every_s": args.kill_every,
            "memory": soak.memory,
        }
        return result


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for shard in sorted({m["shard"] for m in result["memory"]}):
        points = [m for m in result["memory"] if m["shard"] == shard]
        ax.plot(
            [p["t"] / 60 for p in points],
            [p["rss_anon"] / 2**20 for p in points],
            ".-",
            markersize=2,
            label=f"shard {shard}",
        )
    for t in result["kills"]:
        ax.axvline(t / 60, color="grey", alpha=0.2, linewidth=0.8)
    ax.set(
        xlabel="minutes (grey lines: a shard killed with SIGKILL)",
        ylabel="RssAnon (MiB)",
        title=(
            f"soak: {result['acked']} acked, {result['lost']} lost, "
            f"{result['duplicated']} duplicated, {len(result['kills'])} kills"
        ),
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--publishers", type=int, default=10)
    parser.add_argument("--rate", type=float, default=200.0, help="publishes/s in all")
    parser.add_argument("--churn", type=float, default=20.0, help="connect/close per second")
    parser.add_argument("--kill-every", type=float, default=30.0)
    parser.add_argument("--name", default="soak")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    path = procs.write_result(args.name, result)
    plot(result, path.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k != "memory"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
