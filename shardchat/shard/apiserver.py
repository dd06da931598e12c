"""The server API's calls on one shard: checked, run on the engine, answered.

A call enters the room engine as inputs (:mod:`shardchat.core.apiinputs`)
and its effects leave as the engine's output, written by the shard. What
must reach the other shards (a user's connections to close, to join or to
leave a room) and what must be asked of them (their share of a room's
presence, of the rooms, of ``info``) travels as a control message through
the broker: a CONTROL ring record with ``broker.kind = "shm"``, a message on
the ``<prefix>api`` channel with ``"redis"``. Every engine acts on its own
connections; the one that took the call gathers the others' shares and
answers when all have come, or ``unavailable`` after ``GATHER_TIMEOUT``.
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
from shardchat.core import apicalls as calls
from shardchat.core import apiinputs as inputs
from shardchat.core.apicalls import Call, Limits
from shardchat.core.broker import PresenceAnswer
from shardchat.core.config import Config
from shardchat.core.engine import RoomEngine
from shardchat.core.errors import (
    API_ERRORS,
    ApiError,
    ApiOverloaded,
    ApiRoomFull,
    ApiUnavailable,
)
from shardchat.core.messages import AppCloseCode
from shardchat.logs import log_event

__all__ = ["GATHER_TIMEOUT", "ApiServer", "ControlBroker"]

log = logging.getLogger(__name__)

GATHER_TIMEOUT = 2.0  # seconds the shards' shares of a call may take to come

Result = dict[str, Any]
Done = Callable[[Result | ApiError], None]

_METHOD_INDEX = {name: i for i, name in enumerate(stats.API_METHODS)}
_CODE_INDEX = {code: i for i, code in enumerate(stats.API_ERROR_CODES)}


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


class ApiServer:
    """One shard's server API: calls in, the engine's inputs, answers out."""

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
        self.limits = Limits(config.limits.max_content, config.delivery.history, config.api.sender)
        self.node = broker.node
        self.started = time.time()
        # A box is one supervisor's shards: its host and the supervisor's pid.
        self.box = f"{socket.gethostname()}:{os.getppid()}"
        self._gathers: dict[int, _Gather] = {}
        self._next_qid = 0
        broker.on_control = self.control_received

    # Calls

    def call(
        self, method: str, body: bytes, peer: str, answer: Callable[[int, bytes], None]
    ) -> None:
        """Run the call; ``answer(status, body)`` once it is done (maybe at once)."""
        started = time.monotonic()

        def done(outcome: Result | ApiError) -> None:
            if isinstance(outcome, ApiError):
                self.refused(method, outcome, peer)
                answer(outcome.status, calls.error_body(outcome))
            else:
                self._count(method, None)
                answer(200, calls.result_body(outcome))
            self._latency(time.monotonic() - started)

        try:
            call = calls.parse(method, body, self.limits)
        except ApiError as exc:
            done(exc)
            return
        self.run(call, done)

    def refused(self, method: str, exc: ApiError, peer: str) -> None:
        """Count a refusal and log it, one line."""
        self._count(method, exc)
        log_event(
            log, logging.INFO, "api_refused", method=method[:64], code=exc.code,
            status=exc.status, peer=peer, reason=exc.message,
        )  # fmt: skip

    def run(self, call: Call, done: Done) -> None:
        engine = self.engine
        engine.advance(time.monotonic(), time.time())
        try:
            if type(call) is calls.Publish:
                self._publish(call.room, call.content, call.sender, call.key, done)
            elif type(call) is calls.Broadcast:
                self._broadcast(call, done)
            elif type(call) is calls.Disconnect:
                code = (
                    AppCloseCode.DISCONNECTED_RECONNECT
                    if call.reconnect
                    else AppCloseCode.DISCONNECTED
                )
                self._act(
                    {
                        "op": "disconnect",
                        "user": call.user,
                        "code": int(code),
                        "reason": call.reason,
                    }
                )
                done({})
            elif type(call) is calls.Subscribe:
                self._subscribe(call, done)
            elif type(call) is calls.Unsubscribe:
                self._act({"op": "unsubscribe", "user": call.user, "room": call.room})
                done({})
            elif type(call) is calls.Presence:
                self._gather(
                    {"what": "presence", "room": call.room},
                    _presence(call.room, self.config.presence.list_limit),
                    done,
                )
            elif type(call) is calls.PresenceStats:
                self._gather(
                    {"what": "presence", "room": call.room}, _presence_stats(call.room), done
                )
            elif type(call) is calls.History:
                self._history(call, done)
            elif type(call) is calls.Rooms:
                self._gather({"what": "rooms"}, _rooms(call), done)
            elif type(call) is calls.Info:
                self._gather({"what": "info"}, self._info, done)
            else:
                assert type(call) is calls.Batch
                self._batch(call, done)
        except ApiError as exc:
            done(exc)

    def _publish(self, room: str, content: str, sender: str, key: str | None, done: Done) -> None:
        engine = self.engine

        def then(seq: int | None) -> None:
            if seq is None:
                done(ApiUnavailable(
                    f"room {room}: the message is not known to be published (its broker did"
                    " not confirm it); retrying with the same key is safe"
                ))  # fmt: skip
            else:
                done({"seq": seq, "epoch": engine.broker.epoch_of(room) or engine.epoch})

        refusal = inputs.publish(engine, room, sender, content, key, then)
        if refusal is not None:
            raise ApiOverloaded(refusal.reason, refusal.retry_after)

    def _broadcast(self, call: calls.Broadcast, done: Done) -> None:
        replies: list[dict[str, Any] | None] = [None] * len(call.rooms)
        left = len(call.rooms)

        def one(i: int, room: str) -> Done:
            def then(outcome: Result | ApiError) -> None:
                nonlocal left
                if isinstance(outcome, ApiError):
                    replies[i] = {"room": room, "error": _error(outcome)}
                else:
                    replies[i] = {"room": room, "result": outcome}
                left -= 1
                if not left:
                    done({"replies": replies})

            return then

        for i, room in enumerate(call.rooms):
            then = one(i, room)
            try:
                self._publish(room, call.content, call.sender, call.key, then)
            except ApiError as exc:  # this room's refusal (overloaded); the others go on
                then(exc)

    def _subscribe(self, call: calls.Subscribe, done: Done) -> None:
        room_size = self.config.limits.room_size
        if not room_size:
            self._act({"op": "subscribe", "user": call.user, "room": call.room})
            done({})
            return

        def answered(answer: PresenceAnswer | None) -> None:
            if answer is None:
                done(ApiUnavailable(f"room {call.room}: its presence did not answer; try again"))
            elif not answer.has and answer.total >= room_size:
                done(ApiRoomFull(f"room {call.room} has {room_size} users"))
            else:
                self._act({"op": "subscribe", "user": call.user, "room": call.room})
                done({})

        broker = self.engine.broker
        broker.catch_up()
        answer = broker.presence(call.room, call.user, 1, answered)
        if answer is not None:
            answered(answer)

    def _history(self, call: calls.History, done: Done) -> None:
        def then(held: list[Any], epoch: str, seq: int) -> None:
            done(
                {
                    "room": call.room,
                    "epoch": epoch,
                    "seq": seq,
                    "messages": [orjson.loads(message.payload) for message in held],
                }
            )

        inputs.history(self.engine, call.room, call.since, call.before, call.limit, then)

    def _batch(self, call: calls.Batch, done: Done) -> None:
        replies: list[dict[str, Any]] = []
        commands = call.commands
        running = [False]  # inside step(): an answer given at once must not recurse

        def then(outcome: Result | ApiError) -> None:
            if isinstance(outcome, ApiError):
                replies.append({"error": _error(outcome)})
            else:
                replies.append({"result": outcome})
            if not running[0]:
                step()

        def step() -> None:
            # One after another, in order: a command starts when the previous is done.
            running[0] = True
            while len(replies) < len(commands):
                _, command = commands[len(replies)]
                if isinstance(command, ApiError):
                    replies.append({"error": _error(command)})
                    continue
                asked = len(replies)
                self.run(command, then)
                if len(replies) == asked:
                    running[0] = False
                    return  # answered later: its answer goes on with the next one
            running[0] = False
            done({"replies": replies})

        step()

    # Across shards

    def _act(self, action: dict[str, Any]) -> None:
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

    def _gather(
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

    def control_received(self, payload: bytes) -> None:
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
            missing = gather.expected + 1 - len(gather.parts)
            gather.done(
                ApiUnavailable(f"{missing} of the server's shards did not answer; try again")
            )

    def _info(self, parts: list[Any]) -> Result:
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

    # Metrics

    def _count(self, method: str, exc: ApiError | None) -> None:
        index = _METHOD_INDEX.get(method, len(stats.API_METHODS) - 1)
        counters = self.counters
        counters[stats.API_CALLS_BASE + 2 * index + (exc is not None)] += 1
        if exc is not None:
            counters[stats.API_ERRORS_BASE + _CODE_INDEX.get(exc.code, 0)] += 1

    def _latency(self, seconds: float) -> None:
        counters = self.counters
        ms = seconds * 1000
        counters[stats.API_LATENCY_BASE + stats.latency_slot(ms) - stats.LATENCY_BASE] += 1
        counters[stats.API_LATENCY_COUNT] += 1
        counters[stats.API_LATENCY_SUM_US] += int(seconds * 1e6)


def _error(exc: ApiError) -> dict[str, object]:
    return calls.error_object(exc)


def _presence(room: str, limit: int) -> Callable[[list[Any]], Result]:
    def finish(parts: list[Any]) -> Result:
        users = _merge_users(parts)
        listed = sorted(users.items())[:limit]
        result: Result = {
            "room": room,
            "count": len(users),
            "connections": sum(users.values()),
            "users": [{"user": user, "connections": n} for user, n in listed],
        }
        if len(users) > limit:
            result["truncated"] = True
        return result

    return finish


def _presence_stats(room: str) -> Callable[[list[Any]], Result]:
    def finish(parts: list[Any]) -> Result:
        users = _merge_users(parts)
        return {"room": room, "users": len(users), "connections": sum(users.values())}

    return finish


def _merge_users(parts: list[dict[str, int]]) -> dict[str, int]:
    users: dict[str, int] = {}
    for part in parts:
        for user, n in part.items():
            users[user] = users.get(user, 0) + n
    return users


def _rooms(call: calls.Rooms) -> Callable[[list[Any]], Result]:
    def finish(parts: list[Any]) -> Result:
        rooms: dict[str, dict[str, int]] = {}
        for part in parts:
            for room, users in part.items():
                if calls.matches(call.pattern, room) and (
                    call.cursor is None or room > call.cursor
                ):
                    merged = rooms.setdefault(room, {})
                    for user, n in users.items():
                        merged[user] = merged.get(user, 0) + n
        names = sorted(rooms)
        page = names[: call.limit]
        return {
            "rooms": [
                {"room": r, "users": len(rooms[r]), "connections": sum(rooms[r].values())}
                for r in page
            ],
            "cursor": page[-1] if len(names) > len(page) else None,
        }

    return finish


assert set(API_ERRORS) == set(stats.API_ERROR_CODES)
