"""The supervisor: forks the shards, restarts the ones that die, drains on SIGTERM.

Single-threaded with no event loop (a fork with a loop or a thread alive is
unsafe, python/asyncio#347): a ``selectors`` loop over the signal wakeup
socket, each shard's sentinel and the admin socket. Signal handlers do
nothing; ``signal.set_wakeup_fd`` writes the signal number to a socket that
the loop reads, so all work happens in the loop (gunicorn's arbiter, without
its polling).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import resource
import secrets
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import multiprocess
from prometheus_client.exposition import generate_latest

from shardchat.addrtable import table_capacity
from shardchat.auth import verifier_from_config
from shardchat.brokers import segments
from shardchat.core.config import Config, ServerConfig, redact_url, to_toml
from shardchat.core.errors import ShardError
from shardchat.hooks import load_app
from shardchat.logs import log_event
from shardchat.shard.process import EXIT_BOOT_ERROR, ShardSpec, run_shard
from shardchat.stats import Slot, StatsView
from shardchat.storage.boxdir import StorageDir
from shardchat.storage.rescue import rescue
from shardchat.supervisor.admin import AdminServer
from shardchat.supervisor.apiproxy import ApiProxy, ApiTarget
from shardchat.supervisor.metrics import make_registry
from shardchat.supervisor.samples import Sampler
from shardchat.tls import server_context

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

# A shard that ran at least this long before dying is restarted at once.
STABLE_AFTER = 5.0
MAX_BACKOFF = 5.0
FIRST_BACKOFF = 0.1


@dataclass(slots=True)
class ShardSlot:
    """One shard id and the process that currently serves it."""

    shard_id: int
    process: Any = None  # multiprocess.Process while running
    started_at: float = 0.0  # monotonic
    started_ns: int = 0  # monotonic ns, against the ring's heartbeat
    killed_stuck: bool = False  # SIGKILLed for a stuck loop; the exit restarts it
    unlistened: bool = False  # its listening socket was shut down for a silent loop
    incarnation: int = -1
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float | None = None  # monotonic time of a scheduled restart

    @property
    def pid(self) -> int | None:
        return None if self.process is None else int(self.process.pid)


def _noop(signum: int, frame: object) -> None:
    """Signals are read from the wakeup socket; the handler itself does nothing."""


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pid = os.getpid()
        # storage.kind = "memory": one epoch per supervisor run, room histories live
        # as long as the run. "sqlite": the storage directory's (run).
        self.epoch = f"{int(time.time()):x}-{secrets.token_hex(3)}"
        self.storage: StorageDir | None = None
        self.slots = [ShardSlot(i) for i in range(config.workers)]
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.started_wall = time.time()
        self._ctx = multiprocess.get_context("fork")
        self._selector = selectors.DefaultSelector()
        self._admin: AdminServer | None = None
        self._fabric: segments.Fabric
        self._app: object | None = None
        self._stats: StatsView | None = None
        self._child_closes: list[int] = []
        self.sampler = Sampler(config.workers)  # the dashboard's charts
        self._next_sample = 0.0  # monotonic

    # Start-up

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the process exit code."""
        self._app = load_app(self.config.server.app)
        # Fail the start (exit 2) on a key, certificate or CA file that does not load,
        # before any shard is forked; each shard builds its own after the fork.
        server_context(self.config.server)
        verifier_from_config(self.config.auth)
        self._raise_nofile()
        _check_port_free(self.config.server.host, self.config.server.port)
        if self.config.storage.kind == "sqlite" and self.config.broker.kind == "shm":
            # Locked for the run (and by the shards, which inherit the lock). With
            # broker.kind = "redis", Redis keeps the rooms: no store.
            self.storage = StorageDir.open(Path(self.config.storage.dir), len(self.slots))
            self.epoch = self.storage.epoch
            rescue(self.storage)  # before the sweep: a crashed run's rings
        segments.sweep_stale()
        server = self.config.server
        addr_capacity = table_capacity(server.max_per_ip, server.max_connections, len(self.slots))
        self._fabric = segments.Fabric(
            self.pid, len(self.slots), self.config.ring.bytes, self.config.ring.rooms, addr_capacity
        )
        if self.storage is not None:
            self._seed_tables(self.storage)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        try:
            assert self._fabric.stats is not None
            self._stats = StatsView(
                memoryview(self._fabric.stats.buf), len(self.slots), None, addr_capacity
            )
            registry = make_registry(
                self._stats, lambda: [s.restarts for s in self.slots], self._processes
            )
            if self.config.server.admin_port:
                self._admin = AdminServer(
                    self._selector,
                    self.config.server.admin_host,
                    self.config.server.admin_port,
                    self.status,
                    lambda: generate_latest(registry),
                    self.config.server.admin_token,
                    self.sampler.since,
                    ApiProxy(self._selector, *_api_target(self.config)),
                )
            # Descriptors a shard must not keep (it is forked, not exec'd, so
            # O_CLOEXEC does not apply): the admin port above all.
            self._child_closes = [wake_r.fileno(), wake_w.fileno(), self._selector_fd()]
            signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                signal.signal(sig, _noop)
            self._selector.register(wake_r, selectors.EVENT_READ, lambda: self._on_signals(wake_r))
            log_event(
                log,
                logging.INFO,
                "supervisor_start",
                pid=self.pid,
                workers=len(self.slots),
                host=self.config.server.host,
                port=self.config.server.port,
                admin_host=self.config.server.admin_host,
                admin_port=self.config.server.admin_port,
                tls=bool(self.config.server.tls_cert),
                epoch=self.epoch,
            )
            log_event(log, logging.INFO, "config", toml=to_toml(self.config))
            for slot in self.slots:
                self._spawn(slot)
            self._loop()
        finally:
            signal.set_wakeup_fd(-1)
            self._kill_all(signal.SIGKILL)
            if self._admin is not None:
                self._admin.close()
            wake_r.close()
            wake_w.close()
            if self._stats is not None:
                self._stats.release()
            self._fabric.close()
            if self.storage is not None:
                self.storage.close()
        log_event(log, logging.INFO, "supervisor_exit", code=self.exit_code)
        return self.exit_code

    def _seed_tables(self, storage: StorageDir) -> None:
        """Every stored room's seq in its owner's seq table before any shard starts:
        a shard that serves a join before the room's owner has read its store
        would take the room for a new one."""
        ring = self.config.ring
        for slot in self.slots:
            seqs = storage.seqs(slot.shard_id)
            left = self._fabric.seed_table(slot.shard_id, seqs, ring.bytes, ring.rooms)
            if left:
                log_event(log, logging.WARNING, "room_table_full", shard=slot.shard_id, rooms=left)

    def _processes(self) -> list[tuple[str, int]]:
        """The supervisor and each live shard, for the process_* metrics."""
        live = [(f"shard-{s.shard_id}", s.pid) for s in self.slots if s.pid is not None]
        return [("supervisor", self.pid), *((name, pid) for name, pid in live if pid)]

    def _selector_fd(self) -> int:
        fileno = getattr(self._selector, "fileno", None)
        return int(fileno()) if fileno is not None else -1

    def _raise_nofile(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        # Each shard keeps some descriptors for itself: its socket, rings, logs.
        capacity = len(self.slots) * max(0, hard - 64)
        wanted = self.config.server.max_connections
        if wanted > capacity:
            # The default max_connections is a ceiling, not a promise: on a default
            # setup this is only worth a debug line. A value the user chose that the
            # open-files limit cannot hold is a real warning.
            chosen = wanted != ServerConfig().max_connections
            log_event(
                log,
                logging.WARNING if chosen else logging.DEBUG,
                "nofile_limit",
                max_connections=self.config.server.max_connections,
                capacity=capacity,
                hint=f"{len(self.slots)} shards x {hard} open files cannot hold max_connections",
            )

    # The loop

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            if self.stopping:
                if not any(slot.process is not None for slot in self.slots):
                    return
                if now >= self.stop_deadline:
                    log_event(log, logging.WARNING, "drain_timeout", action="SIGKILL")
                    self._kill_all(signal.SIGKILL)
                    self.stop_deadline = now + 5.0
            else:
                for slot in self.slots:
                    if slot.restart_at is not None and now >= slot.restart_at:
                        self._spawn(slot)
                self._kill_stuck()
            if self._admin is not None:
                self._admin.expire(now)
                self._admin.proxy.expire(now)
                if now >= self._next_sample:
                    self._sample(now)
            timeout = self._next_timeout(now)
            for key, _ in self._selector.select(timeout):
                callback: Callable[[], None] = key.data
                callback()

    def _kill_stuck(self) -> None:
        """SIGKILL a shard whose loop has not beaten for ``shard_timeout`` (gunicorn's
        worker timeout): a blocked loop serves nobody, and a restart does. Long before
        that (``shard_unlisten``), take its listening socket out of the port's accept
        group, so that the kernel stops queueing new clients where nobody accepts."""
        limit = self.config.server.shard_timeout
        unlisten = self.config.server.shard_unlisten
        if not limit and not unlisten:
            return
        now_ns = time.monotonic_ns()
        for slot in self.slots:
            if slot.process is None or slot.killed_stuck:
                continue
            # A new incarnation counts from its start until its first beat.
            last = max(self._fabric.heartbeat_ns(slot.shard_id), slot.started_ns)
            silent = now_ns - last
            if unlisten and silent > unlisten * 1e9 and not slot.unlistened:
                slot.unlistened = True
                self._unlisten(slot, silent)
            elif slot.unlistened and silent < unlisten * 1e9:
                slot.unlistened = False  # it beats again (and listens again by itself)
            if limit and silent > limit * 1e9:
                log_event(
                    log,
                    logging.ERROR,
                    "shard_stuck",
                    shard_id=slot.shard_id,
                    pid=slot.pid,
                    silent_s=round((now_ns - last) / 1e9, 1),
                )
                slot.killed_stuck = True
                os.kill(slot.process.pid, signal.SIGKILL)

    def _unlisten(self, slot: ShardSlot, silent_ns: int) -> None:
        """Shut down a silent shard's listening socket (through a duplicate taken with
        pidfd_getfd): Linux then drops it from the SO_REUSEPORT group, resets the
        connections queued on it, and sends new ones to the other shards."""
        if self._stats is None or slot.process is None:
            return
        block = self._stats.blocks[slot.shard_id]
        fd = int(block[Slot.LISTEN_FD])
        if not fd:
            slot.unlistened = False  # not listening yet (still recovering): later
            return
        try:
            dup = _pidfd_getfd(int(slot.process.pid), fd)
        except OSError as exc:
            log_event(
                log,
                logging.WARNING,
                "shard_unlisten_failed",
                shard_id=slot.shard_id,
                error=str(exc),
            )
            return
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)  # not a socket: the shard has moved on
            return
        with sock:
            try:
                # The descriptor must still be that shard's listener on our port.
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    return
                if sock.getsockname()[1] != self.config.server.port:
                    return
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                return
        block[Slot.UNLISTENED] = 1
        log_event(
            log,
            logging.ERROR,
            "shard_unlisten",
            shard_id=slot.shard_id,
            pid=slot.pid,
            silent_s=round(silent_ns / 1e9, 1),
        )

    def _next_timeout(self, now: float) -> float | None:
        deadlines = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        server = self.config.server
        checks = [t for t in (server.shard_timeout, server.shard_unlisten) if t]
        if checks and not self.stopping:
            deadlines.append(now + min(1.0, min(checks) / 4))
        if self.stopping:
            deadlines.append(self.stop_deadline)
        if self._admin is not None:
            deadlines.append(self._next_sample)
            for deadline in (self._admin.next_deadline(), self._admin.proxy.next_deadline()):
                if deadline is not None:
                    deadlines.append(deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _on_signals(self, wake_r: socket.socket) -> None:
        try:
            data = wake_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._begin_stop(quick=self.stopping)
            elif signum == signal.SIGQUIT:
                self._begin_stop(quick=True)

    def _begin_stop(self, *, quick: bool) -> None:
        if self.stopping and not quick:
            return
        log_event(log, logging.INFO, "supervisor_stop", quick=quick)
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.config.server.graceful_timeout
        for slot in self.slots:
            slot.restart_at = None
        self._kill_all(signal.SIGQUIT if quick else signal.SIGTERM)

    def _kill_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.process is not None:
                try:
                    os.kill(slot.process.pid, sig)
                except ProcessLookupError:
                    pass
        if sig == signal.SIGKILL:
            for slot in self.slots:
                if slot.process is not None:
                    slot.process.join()
                    self._reaped(slot)

    # Shards

    def _spawn(self, slot: ShardSlot) -> None:
        slot.restart_at = None
        slot.incarnation += 1
        spec = ShardSpec(
            config=self.config,
            shard_id=slot.shard_id,
            epoch=self.epoch,
            supervisor_pid=self.pid,
            incarnation=slot.incarnation,
            app=self._app,
            store="" if self.storage is None else str(self.storage.path(slot.shard_id)),
            close_fds=tuple(
                fd
                for fd in (
                    *self._child_closes,
                    *(self._admin.fds() if self._admin else ()),
                    *(self._admin.proxy.fds() if self._admin else ()),
                )
                if fd >= 0
            ),
        )
        process = self._ctx.Process(
            target=run_shard, args=(spec,), name=f"shardchat-shard-{slot.shard_id}"
        )
        # What the shards inherit (the modules, the configuration) leaves the
        # collector's walk here, before the fork: a shard's collections would
        # otherwise write to every inherited object's header and turn every page
        # it shares with us and its siblings into a private copy, once per shard.
        gc.freeze()
        process.start()
        slot.process = process
        slot.started_at = time.monotonic()
        slot.started_ns = time.monotonic_ns()
        slot.killed_stuck = False
        slot.unlistened = False
        self._selector.register(process.sentinel, selectors.EVENT_READ, lambda: self._on_exit(slot))
        if slot.incarnation:
            slot.restarts += 1
            log_event(
                log, logging.WARNING, "shard_restart", shard_id=slot.shard_id, pid=process.pid
            )

    def _reaped(self, slot: ShardSlot) -> int:
        if self._stats is not None:
            # Its connections went with it; the restarted shard counts anew.
            self._stats.blocks[slot.shard_id][Slot.CONNECTIONS] = 0
            self._stats.blocks[slot.shard_id][Slot.ROOMS] = 0
            if self._stats.addrs is not None:
                self._stats.addrs.clear(slot.shard_id)
        process = slot.process
        self._selector.unregister(process.sentinel)
        code = int(process.exitcode)
        process.close()
        slot.process = None
        return code

    def _on_exit(self, slot: ShardSlot) -> None:
        slot.process.join()
        pid = slot.pid
        code = self._reaped(slot)
        lived = time.monotonic() - slot.started_at
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL:
            how += " (perhaps out of memory?)"
        if self.stopping:
            log_event(log, logging.INFO, "shard_exit", shard_id=slot.shard_id, pid=pid, how=how)
            return
        log_event(log, logging.ERROR, "shard_died", shard_id=slot.shard_id, pid=pid, how=how)
        if code == EXIT_BOOT_ERROR:
            log_event(log, logging.ERROR, "shard_boot_error", shard_id=slot.shard_id)
            self.exit_code = 1
            self._begin_stop(quick=True)
            return
        if lived >= STABLE_AFTER:
            slot.backoff = 0.0
        else:
            slot.backoff = min(MAX_BACKOFF, slot.backoff * 2 or FIRST_BACKOFF)
        slot.restart_at = time.monotonic() + slot.backoff

    # Status

    def _sample(self, now: float) -> None:
        """The dashboard's sample of this second (the admin port's charts)."""
        assert self._stats is not None
        alive = [slot.process is not None for slot in self.slots]
        self.sampler.sample(self._stats.blocks, alive, now, time.time())
        # On the second's grid, not from now: a late loop turn does not drift the series.
        self._next_sample = max(self._next_sample + 1.0, now + 0.5)

    def _broker_status(self) -> dict[str, object]:
        assert self._stats is not None
        alive = [slot.process is not None for slot in self.slots]
        return _broker_status_of(self.config, self._stats.blocks, alive)

    def status(self) -> dict[str, object]:
        now = time.time()
        assert self._stats is not None
        blocks = self._stats.blocks
        shards: list[dict[str, object]] = []
        connections = 0
        for slot, block in zip(self.slots, blocks, strict=True):
            alive = slot.process is not None
            # The shard writes its pid and start time into its block once it has
            # attached: until then (and after it died) the block's gauges are not
            # this process's, and it has no uptime yet.
            attached = alive and block[Slot.PID] == slot.pid
            connections += block[Slot.CONNECTIONS] if alive else 0
            delivered = block[Slot.LATENCY_COUNT]
            shards.append(
                {
                    "id": slot.shard_id,
                    "pid": slot.pid,
                    "alive": alive,
                    "uptime": round(now - block[Slot.STARTED_NS] / 1e9, 3) if attached else 0,
                    "restarts": slot.restarts,
                    "connections": block[Slot.CONNECTIONS] if alive else 0,
                    "rooms": block[Slot.ROOMS] if alive else 0,
                    # Mean publish-to-delivery time of the messages this shard id
                    # delivered since the server started (/metrics sums the shards).
                    "latency_ms": (
                        round(block[Slot.LATENCY_SUM_US] / delivered / 1000, 3) if delivered else 0
                    ),
                }
            )
        total = self._stats.total
        return {
            "pid": self.pid,
            "epoch": self.epoch,
            "uptime": round(now - self.started_wall, 3),
            "stopping": self.stopping,
            "broker": self._broker_status(),
            "shards": shards,
            "totals": {
                "connections": connections,
                "messages_published": total(Slot.MESSAGES_PUBLISHED),
                "frames_delivered": total(Slot.FRAMES_DELIVERED),
                "restarts": sum(slot.restarts for slot in self.slots),
            },
        }


def _broker_status_of(config: Config, blocks: list[Any], alive: list[bool]) -> dict[str, object]:
    """The broker and its health: for Redis, where, whether every live shard's
    connection works, and its counters over the box."""
    kind = config.broker.kind
    if kind != "redis":
        return {"kind": kind, "healthy": True}
    live = [block for block, up in zip(blocks, alive, strict=True) if up]
    up = [bool(block[Slot.REDIS_UP]) for block in live]
    redis = config.redis
    where = "cluster " + ",".join(redis.cluster) if redis.cluster else redact_url(redis.url)

    def total(slot: Slot) -> int:
        return sum(block[slot] for block in blocks)

    batches = total(Slot.REDIS_BATCHES)
    return {
        "kind": kind,
        "redis": where,
        "healthy": bool(live) and all(up),
        "shards_connected": sum(up),
        "subscribed_rooms": sum(block[Slot.REDIS_SUBSCRIBED_ROOMS] for block in live),
        "round_trips": total(Slot.REDIS_ROUND_TRIPS),
        "batch_size": round(total(Slot.REDIS_BATCHED_MESSAGES) / batches, 2) if batches else 0,
        "messages_received": total(Slot.REDIS_MESSAGES_RECEIVED),
        "stream_reads": total(Slot.REDIS_STREAM_READS),
        "errors": total(Slot.REDIS_ERRORS),
        "reconnects": total(Slot.REDIS_RECONNECTS),
    }


def _api_target(config: Config) -> tuple[ApiTarget | None, str]:
    """Where the dashboard's calls go: the server API (its own listener, api.port, or
    the main port), as a client on this box reaches it; or None and why not: the API
    is off, or behind TLS (the admin port's forward speaks plain HTTP)."""
    api = config.api
    if not api.key:
        return None, "the server API is off: set api.key"
    if config.server.tls_cert:
        return None, "the server API is behind TLS, which the admin port's forward does not speak"
    host, port = (api.host, api.port) if api.port else (config.server.host, config.server.port)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return ApiTarget(host, port, api.key), ""


_SYS_PIDFD_GETFD = 438  # the same number on x86-64 and aarch64 (Linux 5.6)


def _pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate of process ``pid``'s descriptor ``fd`` (pidfd_getfd(2); Python has
    no wrapper). Needs ptrace rights over the child, which its parent has."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dup = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
        if dup < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return dup
    finally:
        os.close(pidfd)


def _check_port_free(host: str, port: int) -> None:
    """Refuse to start on a port someone already listens on.

    The probe binds without SO_REUSEPORT: a shard of another running server,
    which binds with it, would otherwise share the port with ours silently.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ShardError(f"cannot resolve server.host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ShardError(f"port {port} on {host} is already in use") from None
        raise ShardError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    finally:
        probe.close()
