"""A ping prober fine enough for sub-millisecond tails: one process, plain sockets, epoll.

perf.lib.load pings from uvloop timers, which tick in milliseconds, so a ping due
between two ticks goes out up to a millisecond late and its RTT (counted from
when it was due) says 0.66 ms on an idle server. This prober holds its own
connections (the WebSocket handshake by hand, shardchat.testing.rawws) on
non-blocking sockets and sends each ping at its exact due time: an
``epoll.poll`` woken by a timerfd armed ``SPIN_NS`` before it (epoll's own
timeout counts in milliseconds), then a spin that keeps reading
(``poll(0)``) until it is due. Ping ``k`` goes to
connection ``k mod n`` at ``start + k * interval`` (each connection once per
``--period``, at its own offset: independent clients), carries that due time,
and its RTT counts from it (open-loop: a stall of the server, or of the
prober, is in the figure, not hidden by sending later). The prober reports
its own send lag and CPU share, and says when it is the limit: a send lag
p99 over ``LAGGING_MS`` or a CPU share near a core means its own lateness is a
visible part of the RTTs.

    python -m perf.lib.prober --port 8080 --connections 1000 --seconds 30 --cpu 1
    python -m perf.lib.prober --floor --connections 100 --seconds 10   # its floor

Its connections are opened the same way, each connect (non-blocking, in the
same loop) at its exact due time at ``--connect-rate``, and timed from then
to the handshake's 101. Prints one JSON object (``rtt_ms``, ``send_lag_ms``,
``client_limited``, the slowest pings with their times, and ``connect`` with
the same for the connects) on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import json
import os
import re
import resource
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from shardchat.testing.rawws import (
    OP_PING,
    OP_PONG,
    OP_TEXT,
    encode_frame,
    parse_frames,
    take_head,
    upgrade_request,
)

__all__ = ["Schedule", "percentile", "ping_frame", "probe", "summarise"]

SPIN_NS = 100_000  # spin (reading) for the last 100 us before a ping is due
LAGGING_MS = 0.05  # a send lag p99 over this (ms) is a visible part of 0.1 ms RTTs
SATURATED = 0.9  # a CPU share at which the prober itself may be the limit
DRAIN_S = 1.0  # after the last ping, wait this long for the last pongs
WORST = 20  # the slowest pings reported with their times
# Either spacing: shardchat's orjson writes "t":1, the baseline's json.dumps "t": 1.
_T = re.compile(rb'"t": ?(\d+)')
_C = re.compile(rb'"c": ?(\d+)')
clock = time.monotonic_ns  # the timerfd's clock (CLOCK_MONOTONIC)
_PONG = re.compile(rb'^\{"type": ?"pong"')


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (``p`` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def ping_frame(due_ns: int, conn: int) -> bytes:
    """A masked text frame ``{"type":"ping","t":due_ns,"c":conn}``: the server's
    pong echoes both, so the RTT needs no table of what was sent."""
    return encode_frame(b'{"type":"ping","t":%d,"c":%d}' % (due_ns, conn))


@dataclass(frozen=True)
class Schedule:
    """Ping ``k`` is due at ``start_ns + k * interval_ns`` on connection ``k % conns``:
    each connection once per ``period_s``, the connections evenly spread over it."""

    start_ns: int
    conns: int
    period_s: float = 1.0

    @property
    def interval_ns(self) -> float:
        return self.period_s * 1e9 / self.conns

    def due(self, k: int) -> int:
        return self.start_ns + round(k * self.interval_ns)

    def conn(self, k: int) -> int:
        return k % self.conns

    def total(self, seconds: float) -> int:
        """How many pings fall due in ``seconds`` from the start."""
        return int(seconds * 1e9 / self.interval_ns)


def pong_stamp(payload: bytes) -> tuple[int, int] | None:
    """(due_ns, connection) of a pong that echoes one of our pings, else None."""
    if _PONG.match(payload) is None:
        return None
    t, c = _T.search(payload), _C.search(payload)
    if t is None or c is None:
        return None
    return int(t.group(1)), int(c.group(1))


@dataclass
class Samples:
    rtts_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)
    worst: list[tuple[float, float, int]] = field(default_factory=list)  # (rtt, at_s, conn)
    sent: int = 0
    closed: int = 0


def pcts(values: list[float]) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max; empty for no values."""
    qs = (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100))
    return {name: round(percentile(values, q), 4) for name, q in qs} if values else {}


def summarise(s: Samples, cpu_share: float, seconds: float) -> dict[str, Any]:
    lag_p99 = percentile(s.lags_ms, 99) if s.lags_ms else 0.0
    return {
        "pings": s.sent,
        "pongs": len(s.rtts_ms),
        "missing": s.sent - len(s.rtts_ms),
        "closed_by_server": s.closed,
        "seconds": seconds,
        "rtt_ms": pcts(s.rtts_ms),
        "send_lag_ms": pcts(s.lags_ms),
        "cpu_share": round(cpu_share, 3),
        # The prober is the limit when its own lateness is a visible part of the RTTs.
        "client_limited": lag_p99 > LAGGING_MS or cpu_share >= SATURATED,
        "worst": [
            {"rtt_ms": round(r, 3), "at_s": round(at, 4), "conn": c}
            for r, at, c in sorted(s.worst, reverse=True)[:WORST]
        ],
    }


class _Timer(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Spec(ctypes.Structure):
    _fields_ = [("interval", _Timer), ("value", _Timer)]


class Alarm:
    """A timerfd on CLOCK_MONOTONIC (time.monotonic_ns's clock) armed at absolute
    nanoseconds: epoll's own timeout counts in whole milliseconds (rounded up),
    too coarse to wake 100 us before a ping is due."""

    _CLOCK_MONOTONIC, _ABSTIME, _NONBLOCK, _CLOEXEC = 1, 1, 0o4000, 0o2000000

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(self._CLOCK_MONOTONIC, self._NONBLOCK | self._CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")

    def at(self, ns: int) -> None:
        spec = _Spec(_Timer(0, 0), _Timer(ns // 1_000_000_000, ns % 1_000_000_000))
        if self._libc.timerfd_settime(self.fd, self._ABSTIME, ctypes.byref(spec), None) < 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class Prober:
    """The prober's connections and its one epoll loop: timed connects, then timed pings."""

    def __init__(self, host: str, port: int, source: str, path: str) -> None:
        self.addr = (host, port)
        self.source = source
        self.request = upgrade_request(path, f"{host}:{port}")
        self.poller = select.epoll()
        self.alarm = Alarm()
        self.poller.register(self.alarm.fd, select.EPOLLIN)
        self.socks: list[socket.socket] = []
        self.bufs: list[bytearray] = []
        self.due: list[int] = []  # when each connection's connect was due
        self.upgraded: list[bool] = []
        self.by_fd: dict[int, int] = {}
        self.samples = Samples()
        self.connect_ms: list[float] = []
        self.connect_lag_ms: list[float] = []
        self.failures: dict[str, int] = {}
        self.ping_start = 0
        self.go_fd = -1  # see wait_for
        self.go_seen = False

    def wait_for(self, fd: int) -> None:
        """Until ``fd`` is readable, reading meanwhile: a prober that stopped reading
        would not answer the server's heartbeat pings, and be closed (4408)."""
        self.go_fd = fd
        self.poller.register(fd, select.EPOLLIN)
        while not self.go_seen:
            self.read(-1)

    def wait_until(self, due: int) -> None:
        """Read until ``due``: epoll woken by the alarm ``SPIN_NS`` before, then a spin."""
        if due - clock() > SPIN_NS:
            self.alarm.at(due - SPIN_NS)
            while due - clock() > SPIN_NS:
                self.read(-1)
        while clock() < due:
            self.read(0)

    def open(self, due: int) -> None:
        """Start a non-blocking connect; the handshake goes on in ``read``."""
        self.connect_lag_ms.append((clock() - due) / 1e6)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.source, 0))
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self._fail(sock, os.strerror(err))
            return
        i = len(self.socks)
        self.socks.append(sock)
        self.bufs.append(bytearray())
        self.due.append(due)
        self.upgraded.append(False)
        self.by_fd[sock.fileno()] = i
        self.poller.register(sock.fileno(), select.EPOLLOUT)

    def connect(self, count: int, rate: float, timeout: float = 30.0) -> None:
        """Open ``count`` connections, connect ``k`` due at ``k / rate`` s from now."""
        start = clock()
        for k in range(count):
            due = start + round(k * 1e9 / rate)
            self.wait_until(due)
            self.open(due)
        deadline = clock() + int(timeout * 1e9)
        while self.pending() and clock() < deadline:
            self.read(0.1)
        for i, sock in enumerate(self.socks):
            if not self.upgraded[i] and sock.fileno() >= 0:
                self.poller.unregister(sock.fileno())
                self._fail(sock, "timeout")

    def pending(self) -> int:
        return sum(1 for i, s in enumerate(self.socks) if not self.upgraded[i] and s.fileno() >= 0)

    def _fail(self, sock: socket.socket, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1
        sock.close()

    def read(self, timeout: float) -> None:
        events = self.poller.poll(timeout)
        if not events:
            return
        now = clock()  # the arrivals: before the reads, not after them
        for fd, mask in events:
            if fd == self.alarm.fd:
                self.alarm.clear()
                continue
            if fd == self.go_fd:
                self.go_seen = True
                self.poller.unregister(fd)
                continue
            i = self.by_fd[fd]
            sock = self.socks[i]
            if mask & select.EPOLLOUT:  # the TCP connect is done (or failed)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self.poller.unregister(fd)
                if err:
                    self._fail(sock, os.strerror(err))
                    continue
                sock.send(self.request)
                self.poller.register(fd, select.EPOLLIN)
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                data, why = b"", type(exc).__name__
            else:
                why = "closed"
            if not data:
                self.poller.unregister(fd)
                if self.upgraded[i]:
                    self.samples.closed += 1
                    sock.close()
                else:
                    self._fail(sock, why)
                continue
            buf = self.bufs[i]
            buf += data
            if not self.upgraded[i]:
                status = take_head(buf)
                if status is None:
                    continue
                if status != 101:
                    self.poller.unregister(fd)
                    self._fail(sock, f"HTTP {status}")
                    continue
                self.upgraded[i] = True
                self.connect_ms.append((now - self.due[i]) / 1e6)
            frames, used = parse_frames(buf)
            del buf[:used]
            for opcode, payload in frames:
                if opcode == OP_PING:  # the server's heartbeat: answer as a browser does
                    sock.send(encode_frame(payload, OP_PONG))
                elif opcode == OP_TEXT and (stamp := pong_stamp(payload)) is not None:
                    self._pong((now - stamp[0]) / 1e6, (stamp[0] - self.ping_start) / 1e9, stamp[1])

    def _pong(self, rtt: float, at_s: float, conn: int) -> None:
        samples = self.samples
        samples.rtts_ms.append(rtt)
        if len(samples.worst) < WORST or rtt > samples.worst[0][0]:
            samples.worst.append((rtt, at_s, conn))
            samples.worst.sort()
            del samples.worst[:-WORST]

    def ping(self, seconds: float, period: float) -> None:
        """Each open connection pings once per ``period`` for ``seconds``, open-loop."""
        live = [i for i, up in enumerate(self.upgraded) if up]
        if not live:
            return
        schedule = Schedule(clock() + 200_000_000, len(live), period)  # welcomes first
        self.ping_start = schedule.start_ns
        samples = self.samples
        for k in range(schedule.total(seconds)):
            due = schedule.due(k)
            self.wait_until(due)
            i = live[schedule.conn(k)]
            frame = ping_frame(due, i)
            # How late the send began (the send itself, loopback's TCP path into
            # the server's socket, is part of the RTT as for any client).
            samples.lags_ms.append((clock() - due) / 1e6)
            try:
                self.socks[i].send(frame)
            except OSError:
                samples.closed += 1
            samples.sent += 1
        end = clock() + int(DRAIN_S * 1e9)
        while len(samples.rtts_ms) < samples.sent and (left := end - clock()) > 0:
            self.read(left / 1e9)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.poller.close()
        self.alarm.close()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def probe(
    host: str,
    port: int,
    connections: int,
    seconds: float,
    source: str = "127.0.0.1",
    path: str = "/ws?user=probe",
    period: float = 1.0,
    connect_rate: float = 1000.0,
    go_fd: int | None = None,
) -> dict[str, Any]:
    """Open ``connections`` at ``connect_rate``/s, then (once ``go_fd`` is readable,
    if given) ping from each once per ``period`` for ``seconds``."""
    prober = Prober(host, port, source, path)
    # Nothing the prober allocates lives long; a collection mid-run would be its own stall.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        prober.connect(connections, connect_rate)
        if go_fd is not None:
            prober.wait_for(go_fd)
        cpu0, wall0 = _cpu(), time.monotonic()
        prober.ping(seconds, period)
        cpu = _cpu() - cpu0
        wall = time.monotonic() - wall0 - DRAIN_S
    finally:
        gc.enable()
        prober.close()
    out = summarise(prober.samples, cpu / max(1e-9, wall), seconds)
    # CLOCK_MONOTONIC is the box's: a server-side log of the same clock lines up.
    out["ping_start_ns"] = prober.ping_start
    lag_p99 = percentile(prober.connect_lag_ms, 99) if prober.connect_lag_ms else 0.0
    out["connect"] = {
        "connections": connections,
        "rate": connect_rate,
        "up": len(prober.connect_ms),
        "failures": prober.failures,
        "connect_ms": pcts(prober.connect_ms),
        "send_lag_ms": pcts(prober.connect_lag_ms),
        "client_limited": lag_p99 > LAGGING_MS,
    }
    return out


def realtime() -> None:
    """SCHED_FIFO at the lowest priority: the prober sleeps between pings and spins
    ``SPIN_NS`` before each, so it takes little of its core, and the kernel's
    real-time throttling (5% left to others by default) bounds the rest."""
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))


def floor(connections: int = 100, seconds: float = 10) -> dict[str, Any]:
    """The prober's floor: its RTTs against an idle shardchat ``--workers 1`` and the
    single-process baseline, each server on CPU 0 and the prober on CPU 1."""
    from perf import procs, run

    run.pin_self(run.CLIENT_CPU)
    out: dict[str, Any] = {}
    with procs.shardchat(1, settings=run.FAST, cpus=run.SERVER_CPU) as server:
        out["shardchat_w1"] = probe("127.0.0.1", server.port, connections, seconds)
    with procs.baseline(cpus=run.SERVER_CPU) as server:
        out["baseline"] = probe("127.0.0.1", server.port, connections, seconds)
    procs.write_result("prober-floor", out)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--period", type=float, default=1.0, help="seconds between a connection's pings")
    p.add_argument("--source", default="127.0.0.1", help="the source address to bind")
    p.add_argument(
        "--connect-rate", type=float, default=1000, help="connects/s, each at its exact time"
    )
    p.add_argument("--wait-go", action="store_true", help="ping only once a line comes on stdin")
    p.add_argument("--path", default="/ws?user=probe")
    p.add_argument("--cpu", type=int, help="pin the prober to this CPU")
    p.add_argument(
        "--rt",
        action="store_true",
        help="SCHED_FIFO (root): on a shared machine, other processes do not preempt it",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="start an idle shardchat --workers 1, then the baseline, and probe each",
    )
    a = p.parse_args(argv)
    if a.rt:
        realtime()
    if a.floor:
        out = floor(a.connections, a.seconds)
        print(json.dumps(out, indent=1))
        return out
    if a.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {a.cpu})
    go_fd = sys.stdin.fileno() if a.wait_go else None
    result = probe(
        a.host, a.port, a.connections, a.seconds, a.source, a.path, a.period, a.connect_rate, go_fd
    )
    print(json.dumps(result))
    lag = result["send_lag_ms"].get("p99", 0.0)
    c = result["connect"]
    print(
        f"prober: {c['up']} up, connect p50 {c['connect_ms'].get('p50')} "
        f"p99 {c['connect_ms'].get('p99')} ms (send lag p99 {c['send_lag_ms'].get('p99')} ms); "
        f"rtt p50 {result['rtt_ms'].get('p50')} p99 {result['rtt_ms'].get('p99')} ms, "
        f"send lag p99 {lag} ms, cpu {result['cpu_share']}"
        + ("  PROBER IS THE LIMIT" if result["client_limited"] else ""),
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    main()
