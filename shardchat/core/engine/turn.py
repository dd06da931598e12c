"""One loop turn around an engine: what follows each input, and the turn's end.

The shard (``shardchat.shard``) and the unit tests' box of engines
(tests/core/box.py) both drive an engine through these two functions, so
that there is one order, tested by the engine's tests:

- after every input, :func:`after_input`: the engine's commands run on the
  broker, what the broker answered is applied (its inbox), until both are
  quiet; then the outputs are taken, in order;
- at the end of the turn (the caller schedules it when
  ``engine.turn_due or broker.commit_due``), :func:`end_turn`: the requests
  that waited for their joins are taken, the broker commits the turn's
  records (so that no ack or frame leaves before its record is kept), the
  acks the commit released are applied, and each room's queued frames are
  joined once for its members (the fan-out).
"""

from __future__ import annotations

from typing import Protocol

from shardchat.core.broker import Broker
from shardchat.core.engine.facade import RoomEngine
from shardchat.core.outputs import C, Output

__all__ = ["SETTLE_ROUNDS", "TurnBroker", "after_input", "end_turn", "settle"]

SETTLE_ROUNDS = 1000  # commands and answers that keep answering each other: a bug


class TurnBroker(Broker, Protocol):
    """A broker as the loop sees it: it also commits the turn's records."""

    @property
    def commit_due(self) -> bool:
        """Records were written this turn and wait for :meth:`commit`."""

    def commit(self) -> None:
        """Make the turn's records visible to their readers (acks follow)."""


def settle(engine: RoomEngine[C], broker: Broker) -> None:
    """Run the engine's commands on ``broker`` and apply what it answered, until
    neither has anything more."""
    queued = engine.broker  # the engine's command queue
    queue = engine.inbox.queue
    rounds = 0  # counted without a range(): settle runs a few times per message
    while queued.commands or queue:
        if rounds == SETTLE_ROUNDS:
            raise AssertionError("the engine and its broker never settled")
        rounds += 1
        commands = queued.commands
        if commands:
            # take() and run_commands, inline: once per input
            queued.commands = []
            for name, args in commands:
                getattr(broker, name)(*args)
        if queue:
            engine._apply_inbox()  # deliver(), its check done: the queue is empty after


def after_input(engine: RoomEngine[C], broker: Broker) -> list[Output[C]]:
    """What follows every input: the broker's part, then the outputs, in order."""
    settle(engine, broker)
    return engine.take_outputs()


def end_turn(engine: RoomEngine[C], broker: TurnBroker) -> tuple[list[Output[C]], list[Output[C]]]:
    """The end of the loop turn: returns the replies (acks above all, in order)
    and each room's frames of the turn, to write in that order."""
    queue = engine.inbox.queue
    if engine._ready:  # take_deferred()'s check, inline: once per turn
        engine.take_deferred()
    if engine.broker.commands or queue:
        settle(engine, broker)  # their publishes go out with this turn's commit
    broker.commit()  # every turn: a broker may have work beside records (a store's acks)
    if queue and not engine.broker.commands:
        engine._apply_inbox()  # what the commit answered (the acks): settle()'s first round
    if engine.broker.commands or queue:
        settle(engine, broker)
    replies = engine.take_outputs()
    return replies, engine.flush()
