"""The connect proxy's part of an upgrade: the backend asked first, its answer
taken in a later turn, then the engine's checks.

:meth:`Shard.refuse_upgrade <shardchat.shard.handler.Shard.refuse_upgrade>`
asks :func:`proxied` whether the backend must be asked; if so the handshake
gets a :class:`~shardchat.shard.handshake.Later` and waits, and the answer
comes back through :meth:`Shard.admit <shardchat.shard.handler.Shard.admit>`
(an engine input) or as the backend's own refusal.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from shardchat import stats
from shardchat.backend.proxy import ConnectProxy
from shardchat.core.admission import Refusal, Upgrade, token_of
from shardchat.logs import log_event
from shardchat.shard.connection import Connection
from shardchat.shard.handshake import Later

if TYPE_CHECKING:
    from shardchat.shard.handler import Shard

__all__ = ["ask_connect_proxy", "proxied"]

log = logging.getLogger(__name__)

_S_CONNECTIONS = int(stats.Slot.CONNECTIONS)
_S_REFUSED = int(stats.Slot.HTTP_REFUSED)


def proxied(shard: Shard, upgrade: Upgrade) -> ConnectProxy | None:
    """The connect proxy to ask about ``upgrade``; None: the engine decides at once."""
    proxy = shard.connect_proxy
    engine = shard.engine
    if proxy is None or engine.draining:
        return None
    # A server that is full refuses at once, without asking.
    if shard.counters.total(_S_CONNECTIONS) >= shard.config.server.max_connections:
        return None
    # A token, when auth is on and the client sent one, wins: no call.
    if engine.verify is not None and token_of(parse_qsl(upgrade.query), upgrade.headers):
        return None
    return proxy


def ask_connect_proxy(
    shard: Shard, proxy: ConnectProxy, conn: Connection, upgrade: Upgrade
) -> Later:
    """Ask ``proxy`` about ``upgrade``: the handshake answers when :class:`Later` is called."""
    later = Later()
    shard.loop.create_task(_asked(shard, proxy, conn, upgrade, later))
    return later


async def _asked(
    shard: Shard, proxy: ConnectProxy, conn: Connection, upgrade: Upgrade, later: Later
) -> None:
    """The connect proxy's answer, then the engine's checks: the upgrade's answer."""
    try:
        await _answer(shard, proxy, conn, upgrade, later)
    except Exception as exc:  # a bug: one line and a 500, never a task's traceback
        log_event(
            log, logging.ERROR, "connect_proxy_error", conn=conn.conn_id, error=repr(exc)[:200]
        )
        if later.then is not None and conn.transport is not None:
            conn.abort()


async def _answer(
    shard: Shard, proxy: ConnectProxy, conn: Connection, upgrade: Upgrade, later: Later
) -> None:
    answer = await proxy.ask(upgrade)
    if later.then is None or conn.transport is None or conn.close_deadline:
        return  # gone meanwhile (the handshake deadline, or the client left)
    if type(answer) is Refusal:
        mine = shard.counters.mine
        if mine is not None:
            mine[_S_REFUSED] += 1
        later.then((answer.status, answer.text))
        return
    assert not isinstance(answer, Refusal)
    later.then(shard.admit(conn, upgrade, answer))
