"""The room engine: one shard's room logic as a Sans-I/O state machine.

``facade`` is the engine (:class:`RoomEngine`), built in parts: ``state``,
``rooms``, ``deliveries``, ``joins``, ``requests``, ``connections``,
``calls``. ``inbox`` queues what the broker tells it; ``commands`` queues what
it asks of the broker; ``turn`` is the one order of a loop turn around it,
for the shard and the tests alike.
"""

from shardchat.core.engine.commands import Command, CommandQueue, run_commands
from shardchat.core.engine.facade import RoomEngine
from shardchat.core.engine.inbox import Inbox
from shardchat.core.engine.state import (
    EVICT_EVERY,
    MAX_DEFERRED,
    PROTOCOL_VERSION,
    ConnState,
    JoinStage,
    PendingJoin,
)
from shardchat.core.engine.turn import TurnBroker, after_input, end_turn, settle

__all__ = [
    "EVICT_EVERY",
    "MAX_DEFERRED",
    "PROTOCOL_VERSION",
    "Command",
    "CommandQueue",
    "ConnState",
    "Inbox",
    "JoinStage",
    "PendingJoin",
    "RoomEngine",
    "TurnBroker",
    "after_input",
    "end_turn",
    "run_commands",
    "settle",
]
