"""The shm broker itself: its parts joined, the record kinds' handlers, its timers.

See :mod:`shardchat.brokers.shm` for what the broker is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from shardchat.brokers import segments
from shardchat.brokers.shm.history import History
from shardchat.brokers.shm.reading import Reading
from shardchat.brokers.shm.recovery import Recovery
from shardchat.brokers.shm.state import (
    _ANSWER,
    _CONTROL,
    _EVENT,
    _FORWARD,
    _FORWARD_SEEN,
    _HISTORY_REQ,
    _OVERLOAD_DEFAULTS,
    _PRESENCE,
    _QUERY,
    _REPLAY,
    _RESET,
    _ROOM_MSG,
    _S_RETRIED,
    _SNAPSHOT,
    _TOLD,
    Handler,
)
from shardchat.core.config import OverloadConfig
from shardchat.logs import log_event
from shardchat.stats import Counters

__all__ = ["ShmBroker"]

log = logging.getLogger(__name__)


class ShmBroker(Recovery, Reading, History):
    """Our ring, the peers' rings and seq tables, and the doorbells we ring."""

    __slots__ = ()

    def _record_handlers(self) -> dict[int, Handler]:
        return {
            _ROOM_MSG: self._on_room_message,
            _FORWARD: self._on_forward,
            _PRESENCE: self._on_presence,
            _RESET: self._on_reset,
            _FORWARD_SEEN: self._on_forward_seen,
            _HISTORY_REQ: self._on_history_request,
            _REPLAY: self._on_replay,
            _SNAPSHOT: self._on_snapshot,
            _EVENT: self._on_presence_event,
            _TOLD: self._on_told,
            _QUERY: self._on_query,
            _ANSWER: self._on_answer,
            _CONTROL: self._on_control,
        }

    @classmethod
    def attach(
        cls,
        owner_pid: int,
        shard_id: int,
        workers: int,
        ring_bytes: int,
        table_slots: int,
        counters: Counters,
        publish_timeout: float,
        overload: OverloadConfig = _OVERLOAD_DEFAULTS,
    ) -> ShmBroker:
        """The broker of shard ``shard_id`` over the supervisor's named segments."""
        attached = [
            segments.Segment.attach(segments.ring_name(owner_pid, i)) for i in range(workers)
        ]
        bells = [segments.Doorbell(segments.bell_name(owner_pid, i)) for i in range(workers)]

        def closing() -> None:
            for bell in bells:
                bell.close()
            for segment in attached:
                segment.close()

        views = [memoryview(segment.buf) for segment in attached]
        return cls(
            shard_id,
            views,
            ring_bytes,
            table_slots,
            bells,
            counters,
            publish_timeout,
            writer_pid=os.getpid(),
            closing=closing,
            overload=overload,
        )

    @property
    def node(self) -> str:
        """This engine's name among those that hear :meth:`control`."""
        return str(self.shard_id)

    def control(self, payload: bytes, heard: Callable[[int], None] | None = None) -> None:
        """Tell every other shard of the box (committed with the turn); ``heard``
        is told how many will read it."""
        self._write(_CONTROL, 0, payload)
        if heard is not None:
            heard(len(self.peers))

    def _on_control(self, peer: int, aux: int, payload: bytes) -> None:
        if self.on_control is not None:
            self.on_control(payload)

    def open_room(self, room: str, then: Callable[[], None]) -> bool:
        return True  # every shard reads every ring: every room is open

    def close_room(self, room: str) -> None:
        pass

    def epoch_of(self, room: str) -> str | None:
        return None  # the supervisor's one epoch for every room

    def catch_up(self) -> None:
        """Commit what we wrote (a join must not see a frame before its record is
        in the ring), then read every ring to its end."""
        self.commit()
        while self.read_peers():
            pass

    def tick(self, now: float) -> float | None:
        """Forward again what the owner has not sequenced yet, give up on what it
        never will; returns the next time this is needed."""
        self._now_ns = int(now * 1e9)
        presence = self._tick_presence(now)
        forwarder = self.forwarder
        if not forwarder.pending:
            return presence
        again, failed = forwarder.due(now, self._commit_every)  # an eighth of a ring
        for pending in again:
            self.stats[_S_RETRIED] += 1
            self._write(_FORWARD, pending.owner, pending.payload)
        if failed:
            listener = self.listener
            assert listener is not None
            for pending in failed:
                log_event(
                    log, logging.ERROR, "forward_failed", msg=pending.msg_id, owner=pending.owner
                )
                listener.on_publish_failed(pending.msg_id, pending.room)
        deadline = forwarder.next_deadline()
        if presence is not None and (deadline is None or presence < deadline):
            return presence
        return deadline

    def close(self) -> None:
        if self.durable is not None:
            # What was sequenced is written first; what a full disk left unstored
            # is still in our ring, which the supervisor then leaves for the
            # next start to store (storage/rescue.py).
            self.unstored = self.durable.close()
            if self.unstored:
                log_event(log, logging.ERROR, "storage_unstored_at_exit", messages=self.unstored)
            self.durable = None
        self.listener = None
        self.readers = {}
        self.tables = []
        self._ring_views = []
        self._views = []
        self._closing()
