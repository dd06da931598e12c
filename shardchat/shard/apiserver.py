"""The server API's calls on one shard: checked, run on the engine, answered.

A call enters the room engine as inputs (:mod:`shardchat.core.apiinputs`)
and its effects leave as the engine's output, written by the shard; what
must reach the other shards and boxes goes through
:mod:`shardchat.shard.apicontrol`. Each call is counted by method and
outcome, timed, and a refused one is logged in one line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from shardchat import stats
from shardchat.core import apicalls as calls
from shardchat.core import apiinputs as inputs
from shardchat.core import apishares as shares
from shardchat.core.apicalls import Call, Limits
from shardchat.core.broker import PresenceAnswer
from shardchat.core.errors import (
    API_ERRORS,
    ApiError,
    ApiOverloaded,
    ApiRoomFull,
    ApiUnavailable,
)
from shardchat.core.messages import AppCloseCode
from shardchat.logs import log_event
from shardchat.shard.apicontrol import ApiControl, Done, Result

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)


_METHOD_INDEX = {name: i for i, name in enumerate(stats.API_METHODS)}
_CODE_INDEX = {code: i for i, code in enumerate(stats.API_ERROR_CODES)}


class ApiServer:
    """One shard's server API: calls in, the engine's inputs, answers out."""

    def __init__(self, control: ApiControl) -> None:
        """``control``: this engine's part across engines, whose engine, broker and
        counters the calls use too."""
        self.control = control
        self.config = config = control.config
        self.engine = control.engine
        self.counters = control.counters
        self.limits = Limits(config.limits.max_content, config.delivery.history, config.api.sender)
        self._act = control.act
        self._gather = control.gather

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
                    shares.presence(call.room, self.config.presence.list_limit),
                    done,
                )
            elif type(call) is calls.PresenceStats:
                self._gather(
                    {"what": "presence", "room": call.room}, shares.presence_stats(call.room), done
                )
            elif type(call) is calls.History:
                self._history(call, done)
            elif type(call) is calls.Rooms:
                self._gather({"what": "rooms"}, shares.rooms(call), done)
            elif type(call) is calls.Info:
                self._gather({"what": "info"}, self.control.info, done)
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

    def tick(self, now: float) -> None:
        """The sweep's pass: gathers past their deadline are answered ``unavailable``."""
        self.control.tick(now)

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


assert set(API_ERRORS) == set(stats.API_ERROR_CODES)
