"""The engine's commands for its broker: queued in order, run by the caller.

The engine never calls its broker's fire-and-forget methods itself. It holds a
:class:`CommandQueue` in the broker's place: ``publish``, ``announce``,
``snapshot``, ``fill`` and ``close_room`` are queued as :class:`Command`
values that the caller takes (``RoomEngine.take_commands()``) and runs on the
real broker after the input (:func:`run_commands`), like websockets'
``data_to_send``. So no broker code runs inside an engine input, and what the
broker answers reaches the engine as a later input (its inbox).

What the engine must know at once passes through: the broker's state
(``full``, ``latest_seq``, ``epoch_of``, ``serves_history``), ``catch_up``
(deliveries are queued in the inbox, which the engine applies right after),
and the requests with answers (``presence``, ``open_room``, whose later
answers come back through the inbox as well). A question first hands the
broker the commands queued before it, in order, so that the broker answers
from the state they made (admission control counts the publishes of the same
input, a server call's broadcast to many rooms); what the broker says meanwhile
still waits in the inbox, so no engine code runs inside a broker call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from shardchat.core.broker import Broker, Holding, PresenceAnswer, Publication
from shardchat.core.overload import Queue

__all__ = ["Command", "CommandQueue", "run_commands"]


class Command(NamedTuple):
    """One call on the broker: ``getattr(broker, name)(*args)``."""

    name: str  # a Broker method: publish, announce, snapshot, fill, close_room
    args: tuple[object, ...]


def run_commands(broker: Broker, commands: list[Command]) -> None:
    """Run ``commands`` on ``broker``, in order."""
    for name, args in commands:
        getattr(broker, name)(*args)


_new = tuple.__new__


class CommandQueue:
    """A :class:`Broker` in the engine's hands: actions queued, questions passed on."""

    __slots__ = ("broker", "commands")

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.commands: list[Command] = []

    def take(self) -> list[Command]:
        commands, self.commands = self.commands, []
        return commands

    def _hand_over(self) -> None:
        """Run the queued commands before a question (see the module's docstring)."""
        if self.commands:
            run_commands(self.broker, self.take())

    # Queued

    def publish(self, publication: Publication, now: float) -> None:
        # Once per message: the tuple made directly (a NamedTuple's __new__ is 3x slower).
        self.commands.append(_new(Command, ("publish", (publication, now))))

    def announce(self, room: str, user: str, joined: bool, info: str | None = None) -> None:
        self.commands.append(Command("announce", (room, user, joined, info)))

    def snapshot(self, peer: int, pairs: list[tuple[str, str]]) -> None:
        self.commands.append(Command("snapshot", (peer, pairs)))

    def fill(self, room: str, first: int, last: int) -> None:
        self.commands.append(Command("fill", (room, first, last)))

    def close_room(self, room: str) -> None:
        self.commands.append(Command("close_room", (room,)))

    # Passed on

    def full(self, room: str) -> Queue | None:
        if self.commands:
            self._hand_over()
        return self.broker.full(room)

    def presence(
        self, room: str, user: str, limit: int, then: Callable[[PresenceAnswer | None], None]
    ) -> PresenceAnswer | None:
        if self.commands:
            self._hand_over()
        return self.broker.presence(room, user, limit, then)

    def latest_seq(self, room: str) -> int | None:
        if self.commands:
            self._hand_over()
        return self.broker.latest_seq(room)

    def serves_history(self, room: str) -> bool:
        if self.commands:
            self._hand_over()
        return self.broker.serves_history(room)

    def holding(self, room: str) -> Holding:
        return self.broker.holding(room)  # a question of ownership: nothing queued changes it

    def catch_up(self) -> None:
        if self.commands:
            self._hand_over()
        self.broker.catch_up()

    def open_room(self, room: str, then: Callable[[], None]) -> bool:
        if self.commands:
            self._hand_over()
        return self.broker.open_room(room, then)

    def epoch_of(self, room: str) -> str | None:
        if self.commands:
            self._hand_over()
        return self.broker.epoch_of(room)
