"""The box's storage directory: its lock, its epoch, and the shards' store files.

docs/ARCHITECTURE.md, The room store. The supervisor opens the directory
before it forks (:meth:`StorageDir.open`): it takes the lock (one server
per directory), cuts a torn tail off each store's write-ahead log, sets
aside a store file SQLite cannot read, moves the rooms to their owners'
files when ``server.workers`` changed, and reads or makes the epoch, which
lives in ``meta.json`` and changes only when stored rooms were lost
(:meth:`StorageDir.settle`, after the rescue of a crashed run's rings; the
meta file's ``clean`` mark says whether the last run stopped cleanly). Each
shard then opens its own file, ``rooms-<shard>-of-<workers>.db``.

Also the operators' view (``shardchat storage``): :func:`describe`,
:func:`compact`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from shardchat.core.errors import StorageError
from shardchat.logs import log_event
from shardchat.storage.transactions import SCHEMA_VERSION, connect, group_rows
from shardchat.storage.wal import cut_damaged_tail

__all__ = [
    "StorageDir",
    "StoreFile",
    "compact",
    "describe",
    "locked",
    "set_aside",
    "store_path",
]

log = logging.getLogger(__name__)

LOCK = "lock"
META = "meta.json"


def store_path(directory: Path, shard: int, workers: int) -> Path:
    """The store file of ``shard`` of ``workers``."""
    return directory / f"rooms-{shard}-of-{workers}.db"


def _store_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("rooms-*-of-*.db"))


def new_epoch() -> str:
    return f"{int(time.time()):x}-{secrets.token_hex(3)}"


def _lock(directory: Path) -> tuple[int, int | None]:
    """Hold ``directory``'s lock file (flock, released when every holder exits);
    the descriptor and the pid of the previous holder, as the file names it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(f"storage.dir {directory} cannot be used: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StorageError(
            f"storage.dir {directory} is in use by another shardchat server (pid {holder});"
            " stop it first, or give this one another storage.dir"
        ) from None
    before = os.pread(fd, 32, 0).decode(errors="replace").strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, int(before) if before.isdigit() else None


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the directory's lock for a while (an operator's command)."""
    fd, _ = _lock(directory)
    try:
        yield
    finally:
        os.close(fd)


def _write_meta(directory: Path, meta: dict[str, object]) -> None:
    tmp = directory / (META + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / META)
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _read_meta(directory: Path) -> dict[str, object]:
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log_event(log, logging.ERROR, "storage_meta_unreadable", error=str(exc))
        return {}
    return meta if isinstance(meta, dict) else {}


class StorageDir:
    """The supervisor's hold on ``storage.dir`` for its run."""

    def __init__(
        self, directory: Path, fd: int, epoch: str, workers: int, previous: int | None = None
    ) -> None:
        self.directory = directory
        self.previous = previous  # the pid of the server that held it before
        self.epoch = epoch
        self.workers = workers
        self._fd = fd
        self.cut = False  # a store's torn log tail was cut at start
        self.unreadable = False  # a store file was set aside
        self.unclean = False  # the previous run did not stop cleanly (meta.json's mark)

    @classmethod
    def open(cls, directory: Path, workers: int) -> StorageDir:
        """Lock ``directory`` (made if missing), mend what a crash left, and
        read its epoch (a new one if none; :meth:`settle` decides after the rescue
        whether stored rooms were lost).

        Raises:
            StorageError: another server holds the directory, or it cannot be made.
        """
        directory = directory.resolve()
        fd, previous = _lock(directory)
        try:
            meta = _read_meta(directory)
            cut = unreadable = False
            for path in _store_files(directory):
                mended = _mend(path)
                cut |= mended == _Mended.CUT
                unreadable |= mended == _Mended.SET_ASIDE
            old = meta.get("workers")
            if isinstance(old, int) and old != workers:
                # Copied first; the old files go only once meta.json names the new
                # count, so that a crash at any point leaves one complete set that
                # the meta file names (a copy interrupted is made again).
                _move_rooms(directory, old, workers)
            epoch = meta.get("epoch")
            if not isinstance(epoch, str):
                epoch = new_epoch()
            # Not clean until close() says so; the epoch is settled after the rescue.
            _write_meta(directory, {"epoch": epoch, "workers": workers, "clean": False})
            _remove_other_counts(directory, workers)
        except BaseException:
            os.close(fd)
            raise
        storage = cls(directory, fd, epoch, workers, previous)
        storage.cut, storage.unreadable = cut, unreadable
        storage.unclean = meta.get("clean") is False  # a meta from before the mark: clean
        return storage

    def settle(self, *, rings: bool, hole: bool, fsync: str) -> str:
        """Keep the epoch, or take a new one when stored rooms may have lost messages
        whose seqs clients saw (so that no client takes a new message for one it
        had: recovered: false instead), once the rescue is done. ``rings``: the
        previous run's rings were there (the rescue stored what they held);
        ``hole``: some room was sequenced past what the store holds even so."""
        if rings:
            # The rings hold whatever a cut tail or an unsynced write lost, unless
            # they lapped it first (a hole).
            lost = hole or self.unreadable
        else:
            # A reboot (or the rings swept): a cut tail lost committed rows, and an
            # unclean stop with writes that were not synced each time may have lost
            # some silently (a WAL cut at a frame boundary looks whole).
            lost = self.cut or self.unreadable or (self.unclean and fsync != "always")
        if lost:
            log_event(log, logging.ERROR, "storage_new_epoch", old=self.epoch)
            self.epoch = new_epoch()
            _write_meta(self.directory, self._meta(clean=False))
        return self.epoch

    def _meta(self, *, clean: bool) -> dict[str, object]:
        return {"epoch": self.epoch, "workers": self.workers, "clean": clean}

    def seqs(self, shard: int) -> dict[str, int]:
        """Each room of ``shard``'s store with its seq."""
        path = self.path(shard)
        if not path.exists():
            return {}
        db = connect(path)
        try:
            return dict(db.execute("SELECT room, seq FROM rooms").fetchall())
        finally:
            db.close()

    def path(self, shard: int) -> Path:
        return store_path(self.directory, shard, self.workers)

    def close(self, *, clean: bool = False) -> None:
        """Let go of the lock; ``clean``: every shard stored everything and exited,
        so the store files are synced and the meta file says so (the next start
        keeps the epoch even if the rings are gone)."""
        try:
            if clean:
                for path in _store_files(self.directory):
                    for name in (path, path.with_name(path.name + "-wal")):
                        _fsync(name)
                _write_meta(self.directory, self._meta(clean=True))
        finally:
            os.close(self._fd)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Mended(IntEnum):
    INTACT = 0
    CUT = 1  # a torn tail was cut off (frames of a commit or of one cut short)
    SET_ASIDE = 2  # unreadable: set aside, its rooms start again


def _mend(path: Path) -> _Mended:
    """Cut a torn log tail; set the file aside when SQLite cannot read it."""
    wal = path.with_name(path.name + "-wal")
    mended = _Mended.INTACT
    cut = cut_damaged_tail(wal)
    if cut:
        log_event(
            log, logging.WARNING, "storage_tail_cut", file=wal.name, bytes=cut,
            remaining=wal.stat().st_size,
        )  # fmt: skip
        mended = _Mended.CUT
    try:
        db = connect(path)
        try:
            db.execute("SELECT count(*) FROM rooms").fetchone()
            db.execute("SELECT room, last FROM spans ORDER BY room DESC LIMIT 1").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            source = path.with_name(path.name + suffix)
            if source.exists():
                source.rename(aside.with_name(aside.name + suffix))
        log_event(
            log, logging.ERROR, "storage_file_unreadable", file=path.name, error=str(exc),
            moved_to=aside.name,
        )  # fmt: skip
        return _Mended.SET_ASIDE
    return mended


def _move_rooms(directory: Path, old: int, new: int) -> None:
    """``server.workers`` went from ``old`` to ``new``: each room's messages, seq and
    keys are copied to its new owner's file (``owner_of``); the caller removes the
    old files once the meta file names ``new``."""
    sources = [store_path(directory, i, old) for i in range(old)]
    moved = 0
    for source in sources:
        if not source.exists():
            continue
        db = connect(source)
        try:
            db.create_function(
                "owner", 1, lambda room: zlib.crc32(room.encode()) % new, deterministic=True
            )
            for shard in range(new):
                dest = store_path(directory, shard, new)
                connect(dest).close()  # made with the schema
                db.execute("ATTACH DATABASE ? AS dest", (str(dest),))
                db.execute("BEGIN")
                # A move done again after a crash: keys have no unique column.
                db.execute(
                    "DELETE FROM dest.recent_keys WHERE room IN"
                    " (SELECT room FROM main.rooms WHERE owner(room) = ?)",
                    (shard,),
                )
                for table in ("spans", "rooms", "recent_keys"):
                    db.execute(
                        f"INSERT OR REPLACE INTO dest.{table} SELECT * FROM main.{table}"
                        " WHERE owner(room) = ?",
                        (shard,),
                    )
                db.execute("COMMIT")
                db.execute("DETACH DATABASE dest")
            moved += db.execute("SELECT count(*) FROM rooms").fetchone()[0]
        finally:
            db.close()
    log_event(log, logging.WARNING, "storage_rooms_moved", rooms=moved, workers_from=old, to=new)


def _remove_other_counts(directory: Path, workers: int) -> None:
    """The store files of another ``workers`` count: copied already (the meta file
    names ``workers`` only once a move is complete)."""
    own = {store_path(directory, shard, workers) for shard in range(workers)}
    for path in _store_files(directory):
        if path not in own:
            for suffix in ("", "-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)


def set_aside(directory: Path) -> list[Path]:
    """The store files a start set aside as unreadable (``*.corrupt-<time>*``)."""
    return sorted(directory.glob("rooms-*.corrupt-*")) if directory.is_dir() else []


@dataclass(frozen=True, slots=True)
class StoreFile:
    """One store file, as ``shardchat storage`` shows it."""

    name: str
    bytes: int  # the file and its write-ahead log
    rooms: int
    messages: int
    oldest: float | None  # wall seconds of the oldest message held


def describe(directory: Path) -> tuple[dict[str, object], list[StoreFile]]:
    """The directory's meta (epoch, workers) and each store file's figures."""
    files: list[StoreFile] = []
    for path in _store_files(directory):
        size = sum(
            p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists()
        )
        # Not connect(): a running server may be writing it. One transaction: one
        # snapshot of its tables, so that a fold in between is counted once.
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("BEGIN")
            rooms = db.execute("SELECT count(*) FROM rooms").fetchone()[0]
            if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                spanned = db.execute("SELECT sum(count), min(oldest) FROM spans").fetchone()
                unfolded = [  # a running writer's, not folded into spans yet
                    row for (blob,) in db.execute("SELECT rows FROM groups")
                    for row in group_rows(bytes(blob))
                ]  # fmt: skip
                times = [t for t in (spanned[1], *(row[2] for row in unfolded)) if t]
                messages, oldest = (spanned[0] or 0) + len(unfolded), min(times, default=None)
            else:  # the earlier schema, until the next start moves it into spans
                messages, oldest = db.execute("SELECT count(*), min(at) FROM messages").fetchone()
        finally:
            db.close()
        files.append(StoreFile(path.name, size, rooms, messages, oldest))
    return _read_meta(directory), files


def compact(directory: Path) -> int:
    """VACUUM every store file (the server must be stopped: the lock is taken);
    the bytes freed."""
    with locked(directory):
        before = after = 0
        for path in _store_files(directory):
            before += path.stat().st_size
            db = connect(path)
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                db.execute("VACUUM")
            finally:
                db.close()
            after += path.stat().st_size
        return before - after
