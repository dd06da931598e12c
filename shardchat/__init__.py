"""shardchat: a real-time WebSocket chat server, one uvloop shard per core."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
