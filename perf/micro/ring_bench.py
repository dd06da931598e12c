"""Records per second from one process to its peers: the ring against the usual IPC.

shardchat broadcasts every record from one shard to each of the others, so
this sends the same messages (default 200 bytes, 300,000 of them) from one
writer process to R reader processes (R = 1 and R = 2, i.e. 2 and 3 shards)
through (1) shardchat's shared-memory ring, written once and read by all,
with one doorbell semaphore per reader posted once per batch of 64, (2) one
``multiprocessing.Queue`` per reader and (3) one Unix socket pair per reader
with length-prefixed frames sent in batches of 64, all in the same run.
Every reader checks every message's content; the time is until the last
reader has the last message. Each case runs ``--repeat`` times, interleaved,
and the median is reported (all runs are in the JSON file).

    python -m perf.micro.ring_bench --messages 300000 --size 200 --repeat 5
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import socket
import struct
import time
from multiprocessing.connection import Connection
from typing import Any

import posix_ipc

from perf.lib import procs
from shardchat.ring.layout import HEADER_SIZE
from shardchat.ring.ring import RingReader, RingWriter, init_ring

CAPACITY = 1 << 24
BATCH = 64  # records between two doorbell posts or socket sends

# Built once before the processes fork, so that making and checking messages
# costs the same small amount for every transport.
MESSAGES: list[bytes] = []
CTX = multiprocessing.get_context("fork")


def check(data: bytes, i: int) -> None:
    if data != MESSAGES[i]:
        raise AssertionError(f"message {i} is corrupt")


def _ring_reader(view: memoryview, bell_name: str, count: int, done: Connection) -> None:
    reader = RingReader(view)
    bell = posix_ipc.Semaphore(bell_name)
    done.send("ready")
    got = 0
    while got < count:
        batch = reader.poll(4096)
        if not batch:
            if reader.lapped:
                break
            try:
                bell.acquire(2.0)
            except posix_ipc.BusyError:
                break
            continue
        for _, _, _, data in batch:
            check(data, struct.unpack_from("<Q", data)[0])
            got += 1
    done.send((got, reader.lost))
    os._exit(0)


def run_ring(count: int, readers: int) -> dict[str, Any]:
    shared = mmap.mmap(-1, HEADER_SIZE + CAPACITY)
    view = memoryview(shared)
    init_ring(view, CAPACITY)
    names = [f"/shardchat.{os.getpid()}.benchbell.{i}" for i in range(readers)]
    bells = [posix_ipc.Semaphore(n, posix_ipc.O_CREX, initial_value=0) for n in names]
    pipes, procs_ = [], []
    for name in names:
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=_ring_reader, args=(view, name, count, child))
        proc.start()
        parent.recv()
        pipes.append(parent)
        procs_.append(proc)
    writer = RingWriter(view)
    started = time.perf_counter()
    for i in range(count):
        writer.append(1, 0, MESSAGES[i])
        if i % BATCH == BATCH - 1:
            writer.commit()
            for bell in bells:
                bell.release()
    writer.commit()
    for bell in bells:
        bell.release()
    results = [p.recv() for p in pipes]
    elapsed = time.perf_counter() - started
    for proc in procs_:
        proc.join()
    for bell in bells:
        bell.unlink()
        bell.close()
    del writer
    view.release()
    shared.close()
    return _row("shardchat ring", readers, results, elapsed)


def _queue_reader(queue: Any, count: int, done: Connection) -> None:
    done.send("ready")
    for i in range(count):
        check(queue.get(), i)
    done.send((count, 0))
    os._exit(0)


def run_queue(count: int, readers: int) -> dict[str, Any]:
    queues = [CTX.Queue(maxsize=10000) for _ in range(readers)]
    pipes, procs_ = [], []
    for queue in queues:
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=_queue_reader, args=(queue, count, child))
        proc.start()
        parent.recv()
        pipes.append(parent)
        procs_.append(proc)
    started = time.perf_counter()
    for i in range(count):
        for queue in queues:
            queue.put(MESSAGES[i])
    results = [p.recv() for p in pipes]
    elapsed = time.perf_counter() - started
    for proc in procs_:
        proc.join()
    return _row("multiprocessing.Queue", readers, results, elapsed)


def _socket_reader(sock: socket.socket, count: int, done: Connection) -> None:
    done.send("ready")
    buf = bytearray()
    got = 0
    while got < count:
        data = sock.recv(1 << 20)
        if not data:
            break
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = struct.unpack_from("<I", buf, pos)
            if len(buf) - pos - 4 < n:
                break
            check(bytes(buf[pos + 4 : pos + 4 + n]), got)
            got += 1
            pos += 4 + n
        del buf[:pos]
    done.send((got, 0))
    os._exit(0)


def run_socketpair(count: int, readers: int) -> dict[str, Any]:
    pairs = [socket.socketpair() for _ in range(readers)]
    pipes, procs_ = [], []
    for _, right in pairs:
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=_socket_reader, args=(right, count, child))
        proc.start()
        right.close()
        parent.recv()
        pipes.append(parent)
        procs_.append(proc)
    header = struct.Struct("<I")
    started = time.perf_counter()
    chunk = []
    for i in range(count):
        data = MESSAGES[i]
        chunk.append(header.pack(len(data)) + data)
        if len(chunk) == BATCH or i == count - 1:
            joined = b"".join(chunk)
            for left, _ in pairs:
                left.sendall(joined)
            chunk = []
    results = [p.recv() for p in pipes]
    elapsed = time.perf_counter() - started
    for proc in procs_:
        proc.join()
    for left, _ in pairs:
        left.close()
    return _row("Unix socketpair (batched)", readers, results, elapsed)


def _row(name: str, readers: int, results: list[tuple[int, int]], elapsed: float) -> dict[str, Any]:
    received = sum(r[0] for r in results)
    return {
        "ipc": name,
        "readers": readers,
        "received": received,
        "lost": sum(r[1] for r in results),
        "seconds": round(elapsed, 3),
        "deliveries_per_second": round(received / elapsed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the median")
    args = parser.parse_args()
    MESSAGES[:] = [
        struct.pack("<Q", i) + bytes([i & 0xFF]) * (args.size - 8) for i in range(args.messages)
    ]
    rows = []
    for readers in (1, 2):
        runs: dict[str, list[dict[str, Any]]] = {}
        # Interleaved repeats, the median reported: this box is shared and noisy.
        for _ in range(args.repeat):
            for run in (run_ring, run_queue, run_socketpair):
                row = run(args.messages, readers)
                runs.setdefault(row["ipc"], []).append(row)
        for series in runs.values():
            series.sort(key=lambda r: r["deliveries_per_second"])
            median = dict(series[len(series) // 2])
            median["all_runs"] = [r["deliveries_per_second"] for r in series]
            rows.append(median)
    head = f"{'ipc':<28} {'readers':>7} {'received':>9} {'lost':>5}"
    print(head + f" {'deliveries/s':>13} {'ring is':>8}")
    for row in rows:
        ring = next(r for r in rows if r["readers"] == row["readers"])
        ratio = ring["deliveries_per_second"] / row["deliveries_per_second"]
        print(
            f"{row['ipc']:<28} {row['readers']:>7} {row['received']:>9} {row['lost']:>5} "
            f"{row['deliveries_per_second']:>13} {ratio:>7.2f}x"
        )
    print(f"wrote {procs.write_result('ring_bench', {'size': args.size, 'rows': rows})}")


if __name__ == "__main__":
    main()
