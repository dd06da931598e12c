"""The Redis broker's nodes: this node's heartbeat, and the other nodes' liveness.

Every node stamps itself in a sorted set of live nodes (the ``nodes`` script)
every ``min(1, presence.ttl / 3)`` seconds; a node missing from it for
``presence.ttl`` is gone: its users leave every room, here and in Redis, and
the engine hears a peer reset. Other nodes are engine peers numbered from
``PEER_BASE`` (our box's shards are below it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING, Any

from shardchat.brokers.redis import hooks as rh
from shardchat.brokers.redis.client import FAILURES
from shardchat.logs import log_event

if TYPE_CHECKING:
    from shardchat.brokers.redis.broker import RedisBroker
    from shardchat.brokers.redis.rooms import Room

__all__ = ["PEER_BASE", "node_name"]

log = logging.getLogger("shardchat.brokers.redis")

BEAT_EVERY = 1.0  # seconds between two beats of a node (presence.ttl / 3 if shorter)
PEER_BASE = 1 << 16  # engine peer ids of other nodes start here (our shards are < 256)


def node_name(shard_id: int) -> str:
    """A name no other node of the service has, now or later: host, pid, shard, nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{shard_id}:{secrets.token_hex(3)}"


def heartbeat(self: RedisBroker, now_ns: int) -> None:
    """The shard's sweep, every few ms: stamp the ring header for the supervisor,
    take the shard's clock, and beat when a beat is due (every ``BEAT_EVERY``,
    at most ``presence.ttl / 3``), one at a time. The shard's loop schedules
    the beats; the broker keeps no timer of its own."""
    self.stamp(now_ns)
    self.now = now = now_ns / 1e9
    if now < self._next_beat or self.closed:
        return
    self._next_beat = now + min(BEAT_EVERY, self.ttl / 3)
    if self.up and not self._beating:
        self._beating = True
        self._spawn(self._heartbeat())


async def _heartbeat(self: RedisBroker) -> None:
    """One beat; a node taken for dead announces its users again."""
    try:
        try:
            new = await self._beat()
        except FAILURES as exc:
            self.failed("heartbeat", exc)
            return
        if new and self._local:
            # Taken for dead (a pause longer than the TTL): others dropped our users.
            log_event(log, logging.WARNING, "presence_reannounced", rooms=len(self._local))
            await self._resync()
    finally:
        self._beating = False


async def _beat(self: RedisBroker) -> bool:
    """Stamp this node in the live set; drop the nodes gone from it. True when
    this node was not in it (its first beat, or others took it for dead)."""
    self._count_trip()
    new, live = await self._script(
        self.client, "nodes", [self._nodes_key], [self.node, int(self.ttl * 1000)]
    )
    self._saw_live(live)
    return bool(new)


def _saw_live(self: RedisBroker, live: list[Any]) -> None:
    live_nodes = {n.decode() if isinstance(n, bytes) else n for n in live}
    self._live = live_nodes
    # A node announces its users only after its first beat, so a node we heard
    # from that is not in the set now stopped beating for presence.ttl.
    if self.now < self._judge_after:
        return
    gone = [n for n in self._peers if n not in live_nodes]
    if gone:
        self.deliver(lambda: self._drop_nodes(gone))


def _drop_nodes(self: RedisBroker, gone: list[str]) -> None:
    """Nodes that stopped beating: their users leave, here and in Redis."""
    listener = self.listener
    assert listener is not None
    for node in gone:
        log_event(log, logging.WARNING, "node_gone", node=node)
        for room, state in self.rooms.items():
            users = state.remote.pop(node, None)
            if users:
                for user in users:
                    self._presence_remove(room, state, node, user)
        peer = self._peer(node)
        for room, user in self.view.drop_shard(peer):
            infos = self.infos.get(room)
            if infos is not None and infos.pop(user, None) is not None and not infos:
                del self.infos[room]
            listener.on_presence_event(room, user, False, self.view.count(room))
        listener.on_peer_reset(peer)
        del self._peers[node]  # back from a pause, it comes as a new peer


def _presence_remove(self: RedisBroker, room: str, state: Room, node: str, user: str) -> None:
    """Remove a dead node's entry from the room's presence in Redis (whoever
    sees it first; HDEL is idempotent)."""
    if self.dead_user is None and self.occupancy is None:
        self._spawn(self._hdel(state.keys.presence, f"{node}\n{user}"))
    else:
        self._spawn(self._remove(room, state.keys.presence, node, user))


async def _hdel(self: RedisBroker, key: str, fieldname: str) -> None:
    with contextlib.suppress(*FAILURES):
        self._count_trip()
        await self.client.hdel(key, fieldname)


async def _remove(self: RedisBroker, room: str, key: str, node: str, user: str) -> None:
    """The same, reporting what this node removed (webhooks): the user's leave,
    the room left empty, and the user's disconnect if no survivor claimed it."""
    with contextlib.suppress(*FAILURES):
        self._count_trip()
        removed = await self._script(self.client, "remove", [key], [f"{node}\n{user}"])
        if not removed:
            return  # another survivor removed it, and reports it
        if self.dead_user is not None:
            self.dead_user(node, user, room)
        if removed == 2 and self.occupancy is not None:
            self.occupancy(room, user, False)
        if self.dead_user is not None:
            self._count_trip()
            claim = rh.gone_key(self.prefix, node, user)
            if await self.client.set(claim, "1", nx=True, ex=rh.GONE_TTL):
                self.dead_user(node, user, None)


def _peer(self: RedisBroker, node: str) -> int:
    peer = self._peers.get(node)
    if peer is None:
        peer = self._peers[node] = PEER_BASE + len(self._peers)
    return peer
