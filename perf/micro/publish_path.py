"""The hot path of a published message in one process: a shard's handler, engine and shm broker.

One shard of the unit tests' box (tests/core/box.py: rings over bytearrays,
no I/O) with ``--rooms`` rooms of ``--size`` members, wrapped in the shard's
own handler (``Shard``) with a loop that only queues ``call_soon``: each
message is a client's publish handed to ``text_received``, sequenced by the
broker, queued for its room and acked, and every ``--per-turn`` messages the
turn ends (commit, ack, fan-out, the writer's per-member writes into a
stand-in transport). Senders go round the rooms as the rooms scenario's do.
The collector is frozen after the connections are made, as the shard does.

Figures per published message, after ``--warm`` messages:

- ``cpu``: CPU time (``time.process_time``), microseconds;
- ``calls``: function calls (cProfile, built-ins included);
- ``instructions``: instructions (valgrind's cachegrind, ``--messages`` and
  three times as many, the difference: start-up cancels out), when valgrind
  is installed; deterministic, the figure to compare on a shared machine.

``--other DIR`` runs the same on another checkout (with its ``.venv``; its
shard module may be ``shard/main.py``, as before the split), alternating the
side that goes first each round, and prints the new/old ratios:

    python -m perf.micro.publish_path --other /tmp/old-main --rounds 5 cpu
    python -m perf.micro.publish_path --other /tmp/old-main instructions calls
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]

HERE = Path(__file__).resolve()
FIGURES = ("cpu", "calls", "instructions")


class Loop:
    """What the handler asks of its loop: the time, and callbacks for later."""

    def __init__(self) -> None:
        self.ready: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]]
        self.ready = collections.deque()

    def time(self) -> float:
        return time.monotonic()

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        self.ready.append((callback, args))

    def run_ready(self) -> None:
        """One loop turn's callbacks (what they schedule waits for the next)."""
        ready = self.ready
        for _ in range(len(ready)):
            callback, args = ready.popleft()
            callback(*args)


class Transport:
    """A connection's ``out``: keeps the last write only."""

    __slots__ = ("last", "write")

    def __init__(self) -> None:
        self.last: collections.deque[bytes] = collections.deque(maxlen=1)
        self.write = self.last.append


def _box(rooms: int, size: int) -> tuple[Any, list[Any]]:
    """A one-shard box with ``rooms`` rooms of ``size`` members joined at open."""
    sys.path.insert(0, os.getcwd())  # this checkout's tests/ (run from its root)
    from tests.core import box as boxmod

    class Client(boxmod.Client):  # type: ignore[misc,name-defined]
        __hash__ = object.__hash__  # as the server's connections (the box's is a call)

    boxmod.Client = Client
    boxmod.TABLE = 1 << max(8, (rooms - 1).bit_length() + 1)  # a seq table slot per room
    cfg = boxmod.config(limits__rate=1e6, limits__burst=1_000_000, heartbeat__idle_timeout=0)
    box = boxmod.Box(workers=1, cfg=cfg)
    clients = []
    for r in range(rooms):
        for i in range(size):
            client = box.connect(0, f"c{r}-{i}", query=f"room=room{r}")
            client.room = f"room{r}"
            clients.append(client)
    box.turn()
    for client in clients:
        client.frames = []
        client.out = Transport()
    return box, clients


def _shard(box: Any, loop: Loop) -> Any:
    """The shard's handler around the box's engine and broker, logging as the shard's."""
    engine, broker = box.engines[0], box.brokers[0]
    try:
        from shardchat.shard.handler import Shard
    except ImportError:  # before the shard's split
        from shardchat.shard.main import Shard  # type: ignore[no-redef]
    try:
        from shardchat.logs import EventLogger

        engine.log = EventLogger("shardchat.core.engine")
    except ImportError:  # before the engine took its log: module loggers
        pass
    return Shard(box.config, 0, engine, broker, None, loop, None)


def one(a: argparse.Namespace) -> dict[str, float]:
    """The figure ``a.figure`` of this checkout, in this process."""
    box, clients = _box(a.rooms, a.size)
    loop = Loop()
    shard = _shard(box, loop)
    order = [clients[r * a.size + i] for i in range(a.size) for r in range(a.rooms)]
    items = []
    for n in range(a.warm + a.messages):
        client = order[n % len(order)]
        frame = {"type": "message", "room": client.room, "content": f"t{n}:{n}"}
        items.append((client, json.dumps(frame).encode()))
    text_received, run_ready, per_turn = shard.text_received, loop.run_ready, a.per_turn

    def run(part: list[tuple[Any, bytes]]) -> None:
        for i, (client, data) in enumerate(part, 1):
            text_received(client, data)
            if i % per_turn == 0:
                run_ready()
        run_ready()

    gc.collect()
    gc.freeze()
    run(items[: a.warm])
    measured = items[a.warm :]
    if a.figure == "calls":
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        run(measured)
        profile.disable()
        figure = pstats.Stats(profile).total_calls / len(measured)  # type: ignore[attr-defined]
    else:  # cpu, or the run that valgrind counts
        t0 = time.process_time()
        run(measured)
        figure = (time.process_time() - t0) / len(measured) * 1e6
    written = sum(1 for c in clients if c.out.last)
    assert written == len(clients) or len(measured) < len(clients), "every member was written"
    return {a.figure: round(figure, 3)}


def _side(checkout: Path, figure: str, a: argparse.Namespace) -> float:
    """``figure`` on ``checkout``, each in a process of its own."""
    python = str(checkout / ".venv" / "bin" / "python")
    args = [str(HERE), "--one", "--rooms", str(a.rooms), "--size", str(a.size)]
    args += ["--per-turn", str(a.per_turn), "--warm", str(a.warm)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def run(cmd: list[str], messages: int) -> str:
        done = subprocess.run(
            [
                *cmd,
                *args,
                "--messages",
                str(messages),
                figure if figure != "instructions" else "cpu",
            ],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout + done.stderr

    if figure != "instructions":
        return float(json.loads(run([python], a.messages).splitlines()[-1])[figure])
    counts = []
    for messages in (a.messages, 3 * a.messages):
        cg = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
        match = re.search(r"I\s+refs:\s+([\d,]+)", run([*cg, python], messages))
        assert match, "valgrind's count"
        counts.append(int(match.group(1).replace(",", "")))
    return (counts[1] - counts[0]) / (2 * a.messages)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("figures", nargs="*", choices=FIGURES, default=["cpu"])
    parser.add_argument("--other", help="another checkout (with its .venv) to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of cpu (the others: 1)")
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--size", type=int, default=10, help="members per room")
    parser.add_argument("--per-turn", type=int, default=1, help="messages per loop turn")
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--warm", type=int, default=500)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--figure", default="cpu", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        a.figure = a.figures[0]
        print(json.dumps(one(a)))
        return
    if "instructions" in a.figures and shutil.which("valgrind") is None:
        parser.error("instructions needs valgrind")
    sides = {"new": Path.cwd()}
    if a.other:
        sides["old"] = Path(a.other).resolve()
    result: dict[str, Any] = {}
    for figure in a.figures:
        rounds = a.rounds if figure == "cpu" else 1
        got: dict[str, list[float]] = {side: [] for side in sides}
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                got[side].append(_side(sides[side], figure, a))
            print(f"{figure} round {r + 1}: {json.dumps({s: v[-1] for s, v in got.items()})}")
        result[figure] = {side: [round(v, 3) for v in values] for side, values in got.items()}
        if "old" in got:
            ratios = [n / o for n, o in zip(got["new"], got["old"], strict=True)]
            result[figure]["new_over_old"] = [round(x, 3) for x in ratios]
            result[figure]["median_ratio"] = round(statistics.median(ratios), 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
