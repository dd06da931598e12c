"""The Redis broker's client: redis-py's (one Redis or a Cluster), its scripts, pipelines.

Every call fails at once (no retry of redis-py's own): the broker's reconnect
loop (:mod:`.health`) backs off and tries again. A script Redis no longer
holds (it restarted without its data) is loaded again and its calls resent.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from shardchat import stats
from shardchat.brokers.redis import hooks as rh
from shardchat.brokers.redis import wire as rw
from shardchat.core.config import RedisConfig, redact_url

if TYPE_CHECKING:
    from shardchat.brokers.redis.broker import RedisBroker

__all__ = ["FAILURES", "POOL_SIZE", "SCRIPTS", "Calls", "connect_client"]

POOL_SIZE = 8  # connections of a shard's pool (one Redis), its pub/sub connection included
FAILURES = (RedisError, OSError, asyncio.TimeoutError)  # what a failed Redis call raises
SCRIPTS = {
    "publish": rw.PUBLISH_SCRIPT,
    "state": rw.STATE_SCRIPT,
    "presence": rw.PRESENCE_SCRIPT,
    "nodes": rw.NODES_SCRIPT,
    "vacate": rh.VACATE_SCRIPT,
    "remove": rh.REMOVE_SCRIPT,
}
_S_TRIPS = int(stats.Slot.REDIS_ROUND_TRIPS)

Calls = list[tuple[str, list[str], list[Any]]]  # (script name, keys, args) of a pipeline


def connect_client(config: RedisConfig) -> tuple[Any, bool, str]:
    """(the redis-py client, whether it is a Cluster's, where it points for the logs)."""
    common: dict[str, Any] = {
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.connect_timeout,
        # Our own loop retries with backoff and jitter; a command fails at once.
        "retry": Retry(NoBackoff(), 0),
    }
    if config.cluster:
        seeds = [ClusterNode(*_host_port(seed)) for seed in config.cluster]
        return (
            RedisCluster(startup_nodes=seeds, **common),
            True,
            "cluster " + ",".join(config.cluster),
        )
    # A bounded pool: a storm of room opens waits for a connection instead
    # of opening hundreds (measured: 1,000 rooms opened at once took 33
    # connections per shard with an unbounded pool).
    pool = aioredis.BlockingConnectionPool.from_url(
        config.url, max_connections=POOL_SIZE, timeout=config.timeout, **common
    )
    return aioredis.Redis(connection_pool=pool), False, redact_url(config.url)


async def _load_scripts(self: RedisBroker) -> None:
    # On a Cluster, redis-py sends SCRIPT LOAD to every master.
    for name, source in SCRIPTS.items():
        self._count_trip()
        self._scripts[name] = await self.client.script_load(source)


async def _pipeline(self: RedisBroker, calls: Calls) -> list[Any]:
    """The calls as one pipeline (per master on a Cluster); a script Redis does
    not hold (it restarted without its data) is loaded and its calls sent again."""
    results = await self._send(calls)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        await self._load_scripts()
        again = await self._send([calls[i] for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    return results


async def _send(self: RedisBroker, calls: Calls) -> list[Any]:
    self._count_trip()
    pipe = self.client.pipeline(transaction=False)
    for name, keys, args in calls:
        pipe.execute_command("EVALSHA", self._scripts[name], len(keys), *keys, *args)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    return results


async def _script(
    self: RedisBroker, client: Any, name: str, keys: list[str], args: list[Any]
) -> Any:
    try:
        return await client.evalsha(self._scripts[name], len(keys), *keys, *args)
    except NoScriptError:
        await self._load_scripts()
        return await client.evalsha(self._scripts[name], len(keys), *keys, *args)


def _count_trip(self: RedisBroker) -> None:
    self.stats[_S_TRIPS] += 1


def _host_port(seed: str) -> tuple[str, int]:
    host, _, port = seed.rpartition(":")
    return host, int(port)
