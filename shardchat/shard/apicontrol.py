"""The server API between engines: control messages acted on, shares gathered.

What must reach the other shards (a user's connections to close, to join or
to leave a room) and what must be asked of them (their share of a room's
presence, of the rooms, of ``info``) travels as a control message through
the broker: a CONTROL ring record with ``broker.kind = "shm"``, a message on
the ``<prefix>api`` channel with ``"redis"``. Every engine acts on its own
connections; the one that took the call gathers the others' shares, as many
as the broker says heard the ask, and answers when all have come, or
``unavailable`` after ``GATHER_TIMEOUT``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from shardchat import __version__, stats
from shardchat.core import apiinputs as inputs
from shardchat.core.config import Config
from shardchat.core.engine import RoomEngine
from shardchat.core.errors import ApiError, ApiUnavailable
from shardchat.logs import log_event

__all__ = ["GATHER_TIMEOUT", "ApiControl", "ControlBroker", "Done", "Result"]

log = logging.getLogger(__name__)

GATHER_TIMEOUT = 2.0  # seconds the shards' shares of a call may take to come

Result = dict[str, Any]
Done = Callable[[Result | ApiError], None]


class ControlBroker(Protocol):
    """What the API asks of a broker, beside the engine's calls."""

    on_control: Callable[[bytes], None] | None

    @property
    def node(self) -> str: ...

    def control(self, payload: bytes, heard: Callable[[int], None] | None = None) -> None: ...


@dataclass(slots=True)
class _Gather:
    """A call's shares: this engine's at once, the others' as they come."""

    expected: int  # the other engines that heard the ask; -1 until the broker says
    deadline: float
    finish: Callable[[list[Any]], Result]
    done: Done
    parts: list[Any] = field(default_factory=list)


class ApiControl:
    """One engine's part of the server API's calls across engines."""

    def __init__(
        self,
        config: Config,
        engine: RoomEngine[Any],
        broker: ControlBroker,
        counters: stats.Counters,
        shard_id: int,
    ) -> None:
        self.config = config
        self.engine = engine
        self.broker = broker
        self.counters = counters
        self.shard_id = shard_id
        self.node = broker.node
        self.started = time.time()
        # A box is one supervisor's shards: its host and the supervisor's pid.
        self.box = f"{socket.gethostname()}:{os.getppid()}"
        self._gathers: dict[int, _Gather] = {}
        self._next_qid = 0
        broker.on_control = self.received

    def act(self, action: dict[str, Any]) -> None:
        """Do ``action`` on our connections, and have every other engine do it."""
        self._apply(action)
        self.broker.control(orjson.dumps({**action, "from": self.node}))

    def _apply(self, action: dict[str, Any]) -> None:
        engine, op, user = self.engine, action["op"], action["user"]
        if op == "disconnect":
            inputs.close_user(engine, user, action["code"], action["reason"])
        elif op == "subscribe":
            inputs.join_user(engine, user, action["room"])
        elif op == "unsubscribe":
            inputs.leave_user(engine, user, action["room"])

    def gather(
        self,
        ask: dict[str, Any],
        finish: Callable[[list[Any]], Result],
        done: Done,
    ) -> None:
        """Every engine's share of ``ask``: ours, then the others' through the broker,
        which says how many heard the ask (Redis: SPUBLISH's count of receivers)."""
        gather = _Gather(-1, time.monotonic() + GATHER_TIMEOUT, finish, done)
        gather.parts.append(self._share(ask))
        self._next_qid += 1
        qid = self._next_qid
        self._gathers[qid] = gather

        def heard(others: int) -> None:
            gather.expected = others
            self._answer(qid, None)

        payload = orjson.dumps({"op": "ask", "from": self.node, "qid": qid, **ask})
        self.broker.control(payload, heard)

    def _share(self, ask: dict[str, Any]) -> Any:
        """This engine's share of a gathered call."""
        engine = self.engine
        what = ask["what"]
        if what == "presence":
            return inputs.local_presence(engine, ask["room"])
        if what == "rooms":
            return inputs.local_rooms(engine)
        counters = self.counters
        return {
            "node": self.node,
            "box": self.box,
            "shard": self.shard_id,
            "pid": os.getpid(),
            "connections": engine.open_count,
            "rooms": len(engine.members),
            "uptime": round(time.time() - self.started, 3),
            "broker_up": bool(counters[stats.Slot.REDIS_UP])
            if self.config.broker.kind == "redis"
            else True,
        }

    def received(self, payload: bytes) -> None:
        """A control message from another engine (never our own: ours are skipped)."""
        try:
            message = orjson.loads(payload)
            if message.get("from") == self.node:
                return  # Redis hands a node its own messages too
            op = message["op"]
            if op == "ask":
                self.engine.advance(time.monotonic(), time.time())
                share = self._share(message)
                self.broker.control(
                    orjson.dumps(
                        {"op": "answer", "from": self.node, "to": message["from"],
                         "qid": message["qid"], "share": share}
                    )
                )  # fmt: skip
            elif op == "answer":
                if message["to"] == self.node:
                    self._answer(message["qid"], message["share"])
            else:
                self.engine.advance(time.monotonic(), time.time())
                self._apply(message)
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log_event(log, logging.ERROR, "api_control_bad", error=repr(exc)[:200])

    def _answer(self, qid: int, share: Any) -> None:
        """One more share of gather ``qid`` (None: only its count of askers came)."""
        gather = self._gathers.get(qid)
        if gather is None:
            return  # too late: answered as unavailable
        if share is not None:
            gather.parts.append(share)
        if gather.expected >= 0 and len(gather.parts) > gather.expected:
            del self._gathers[qid]
            gather.done(gather.finish(gather.parts))

    def tick(self, now: float) -> None:
        """Gathers past their deadline are answered ``unavailable``."""
        if not self._gathers:
            return
        late = [qid for qid, g in self._gathers.items() if now >= g.deadline]
        for qid in late:
            gather = self._gathers.pop(qid)
            if gather.expected < 0:
                reason = "the broker did not carry the call to the other shards; try again"
            else:
                missing = gather.expected + 1 - len(gather.parts)
                reason = f"{missing} of the server's shards did not answer; try again"
            gather.done(ApiUnavailable(reason))

    def info(self, parts: list[Any]) -> Result:
        """``info``: every shard's share, and the server in sum."""
        shards = sorted(parts, key=lambda p: (p["node"], p["shard"]))
        return {
            "version": __version__,
            "broker": self.config.broker.kind,
            "broker_up": all(p["broker_up"] for p in shards),
            "node": self.node,
            "uptime": round(time.time() - self.started, 3),
            "connections": sum(p["connections"] for p in shards),
            "boxes": len({p["box"] for p in shards}),
            "shards": shards,
        }
