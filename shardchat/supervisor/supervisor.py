"""The supervisor: forks the shards, restarts the ones that die, drains on SIGTERM.

Single-threaded with no event loop (a fork with a loop or a thread alive is
unsafe, python/asyncio#347): a ``selectors`` loop over the signal wakeup
socket, each shard's sentinel and the admin socket. Signal handlers do
nothing; ``signal.set_wakeup_fd`` writes the signal number to a socket that
the loop reads, so all work happens in the loop (gunicorn's arbiter, without
its polling).
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import selectors
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import multiprocess
from prometheus_client.exposition import generate_latest

from shardchat.addrtable import table_capacity
from shardchat.auth import verifier_from_config
from shardchat.brokers import segments
from shardchat.core.config import Config, to_toml
from shardchat.hooks import load_app
from shardchat.logs import log_event
from shardchat.shard.process import EXIT_BOOT_ERROR, EXIT_UNSTORED, ShardSpec, run_shard
from shardchat.stats import Slot, StatsView
from shardchat.storage.boxdir import StorageDir
from shardchat.storage.rescue import rescue
from shardchat.supervisor.admin import AdminServer
from shardchat.supervisor.apiproxy import ApiProxy
from shardchat.supervisor.metrics import make_registry
from shardchat.supervisor.preflight import api_target, check_port_free, raise_nofile
from shardchat.supervisor.samples import Sampler
from shardchat.supervisor.slots import ShardSlot
from shardchat.supervisor.status import status_document
from shardchat.supervisor.stuck import kill_stuck
from shardchat.tls import server_context

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

# A shard that ran at least this long before dying is restarted at once.
STABLE_AFTER = 5.0
MAX_BACKOFF = 5.0
FIRST_BACKOFF = 0.1


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
        # A shard's store closed with messages it could not write (a full disk):
        # they are in its ring, left for the next start to store.
        self.keep_rings = False
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
        raise_nofile(self.config, len(self.slots))
        check_port_free(self.config.server.host, self.config.server.port)
        if self.config.storage.kind == "sqlite" and self.config.broker.kind == "shm":
            # Locked for the run (and by the shards, which inherit the lock). With
            # broker.kind = "redis", Redis keeps the rooms: no store.
            self.storage = StorageDir.open(Path(self.config.storage.dir), len(self.slots))
            rescued = rescue(self.storage)  # before the sweep: a crashed run's rings
            self.epoch = self.storage.settle(
                rings=rescued.rings, hole=rescued.hole, fsync=self.config.storage.fsync
            )
        segments.sweep_stale()
        server = self.config.server
        addr_capacity = table_capacity(server.max_per_ip, server.max_connections, len(self.slots))
        self._fabric = segments.Fabric(
            self.pid,
            len(self.slots),
            self.config.ring.bytes,
            self.config.ring.rooms,
            addr_capacity,
            stored=self.storage is not None,
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
                    ApiProxy(self._selector, *api_target(self.config)),
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
            if self._kill_all(signal.SIGKILL) and self.storage is not None:
                self.keep_rings = True  # what they saw and did not store is in the rings
            if self._admin is not None:
                self._admin.close()
            wake_r.close()
            wake_w.close()
            if self._stats is not None:
                self._stats.release()
            if self.keep_rings:
                log_event(log, logging.ERROR, "storage_rings_kept", pid=self.pid)
            self._fabric.close(keep=self.keep_rings)
            if self.storage is not None:
                self.storage.close(clean=not self.keep_rings)
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

    # The loop

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            if self.stopping:
                if not any(slot.process is not None for slot in self.slots):
                    return
                if now >= self.stop_deadline:
                    log_event(log, logging.WARNING, "drain_timeout", action="SIGKILL")
                    if self._kill_all(signal.SIGKILL) and self.storage is not None:
                        self.keep_rings = True  # killed before its store was closed
                    self.stop_deadline = now + 5.0
            else:
                for slot in self.slots:
                    if slot.restart_at is not None and now >= slot.restart_at:
                        self._spawn(slot)
                kill_stuck(self.slots, self._fabric, self._stats, self.config.server)
            if self._admin is not None:
                self._admin.expire(now)
                self._admin.proxy.expire(now)
                if now >= self._next_sample:
                    self._sample(now)
            timeout = self._next_timeout(now)
            for key, _ in self._selector.select(timeout):
                callback: Callable[[], None] = key.data
                callback()

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

    def _kill_all(self, sig: int) -> bool:
        """Signal every live shard (SIGKILL: and reap it); whether any was live."""
        live = False
        for slot in self.slots:
            if slot.process is not None:
                live = True
                try:
                    os.kill(slot.process.pid, sig)
                except ProcessLookupError:
                    pass
        if sig == signal.SIGKILL:
            for slot in self.slots:
                if slot.process is not None:
                    slot.process.join()
                    self._reaped(slot)
        return live

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
        # A shard that stopped without storing everything (exit 4), or that did
        # not finish stopping (killed at the drain deadline, or an error): the
        # rings hold what it did not store, for the next start's rescue.
        self.keep_rings |= code == EXIT_UNSTORED or (
            self.stopping and code != 0 and self.storage is not None
        )
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

    def status(self) -> dict[str, object]:
        return status_document(
            self.config,
            self.slots,
            self._stats,
            pid=self.pid,
            epoch=self.epoch,
            started_wall=self.started_wall,
            stopping=self.stopping,
        )
