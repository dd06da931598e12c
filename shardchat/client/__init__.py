"""The client side: ChatClient and the terminal chat.

The public names live here, so that ``from shardchat.client import ChatClient``
(the README's import) does not depend on the module layout behind it.
"""

from shardchat.client.chatclient import (
    ACK_DELAY,
    ChatClient,
    ChatError,
    ClientError,
    ClientEvent,
    Closed,
    Message,
    Refused,
    Unavailable,
)

__all__ = [
    "ACK_DELAY",
    "ChatClient",
    "ChatError",
    "ClientError",
    "ClientEvent",
    "Closed",
    "Message",
    "Refused",
    "Unavailable",
]
