"""The connect and publish proxies: the backend asked over HTTP, its answers read.

docs/WEBHOOKS.md, "Connect proxy" and "Publish proxy". :class:`ConnectProxy`
asks ``proxy.connect_url`` who an upgrading client is (200 admits as the
user it names, a 4xx refuses with that status and the backend's reason, a
timeout or anything else refuses with 503); :class:`PublishProxy` sends one
loop turn's client publishes to ``proxy.publish_url`` in one request and
hands back a :class:`~shardchat.core.hookevents.Verdict` for each, in the
order the batches were sent. Failures are counted and logged once per burst
(the first, then ``*_recovered`` with the count), never with a traceback.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import orjson

from shardchat import stats
from shardchat.auth import Identity
from shardchat.backend.http import HttpClient, Response
from shardchat.core import wire
from shardchat.core.admission import Refusal, Upgrade, header
from shardchat.core.config import ProxyConfig
from shardchat.core.errors import BackendError
from shardchat.core.hookevents import ProxiedPublish, Verdict
from shardchat.logs import log_event

__all__ = ["Bursts", "ConnectProxy", "PublishProxy", "connect_answer", "publish_verdicts"]

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Hashable)
_S_CALLS = int(stats.Slot.PROXY_CALLS)
_S_FAILURES = int(stats.Slot.PROXY_FAILURES)
_KNOWN = frozenset(int(s) for s in http.HTTPStatus)
# Request headers the connect proxy passes on (the backend's own session).
_PASSED = ("Cookie", "Authorization", "Origin", "User-Agent", "X-Forwarded-For")
INFO_LIMIT = 1024  # bytes of a connect answer's ``info``, encoded (it travels in records)


class Bursts:
    """Failures counted, and logged at the start and the end of each burst."""

    def __init__(self, name: str, counters: stats.Counters) -> None:
        self.name = name
        self.counters = counters
        self.failing = 0  # failures in the current burst

    def failed(self, reason: str) -> None:
        self.counters[_S_FAILURES] += 1
        if not self.failing:
            log_event(log, logging.WARNING, f"{self.name}_failing", error=reason)
        self.failing += 1

    def succeeded(self) -> None:
        if self.failing:
            log_event(log, logging.WARNING, f"{self.name}_recovered", failures=self.failing)
            self.failing = 0


def _reason(body: bytes) -> str:
    """The backend's reason: ``{"reason": ...}``, else the body's text."""
    text = ""
    try:
        data = orjson.loads(body)
        if isinstance(data, dict) and isinstance(data.get("reason"), str):
            text = data["reason"]
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace")
    return " ".join(text.split())[:200] or "refused by the application"


def connect_answer(response: Response) -> Identity | Refusal:
    """The backend's answer to a connect: who the client is, or the refusal."""
    status = response.status
    if 400 <= status < 500:
        if status not in _KNOWN:
            status = 403  # a status HTTP has no name for (499...): refused all the same
        return Refusal(status, _reason(response.body) + "\n")
    if status != 200:
        return Refusal(503, f"the application's backend answered {status}\n")
    try:
        data: Any = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        data = None
    user = data.get("user") if isinstance(data, dict) else None
    rooms = data.get("rooms") if isinstance(data, dict) else None
    if not isinstance(user, str) or not wire.is_valid_name(user):
        return Refusal(503, "the application's backend named no valid user\n")
    if rooms is not None and not (
        isinstance(rooms, list) and all(isinstance(r, str) and wire.is_valid_name(r) for r in rooms)
    ):
        return Refusal(503, "the application's backend answered rooms that are not names\n")
    info = data.get("info")
    encoded: str | None = None
    if info is not None:
        if not isinstance(info, dict):
            return Refusal(
                503, "the application's backend answered an info that is not an object\n"
            )
        encoded = orjson.dumps(info).decode()
        if len(encoded.encode()) > INFO_LIMIT:
            return Refusal(
                503, f"the application's backend answered an info over {INFO_LIMIT} bytes\n"
            )
    return Identity(user, None if rooms is None else frozenset(rooms), info=encoded)


def publish_verdicts(response: Response, count: int) -> list[Verdict] | str:
    """The verdicts on a batch of ``count`` publishes, or why there are none."""
    if response.status != 200:
        return f"the application's backend answered {response.status}"
    try:
        data: Any = orjson.loads(response.body)
        results = data["results"]
        verdicts = [Verdict()] * count  # not named: kept as it is
        for result in results:
            i = int(result["id"])
            if not 0 <= i < count:
                continue
            reject = result.get("reject")
            content = result.get("content")
            if reject is not None:
                verdicts[i] = Verdict(reject=str(reject)[:200] or "rejected")
            elif isinstance(content, str):
                verdicts[i] = Verdict(content=content)
        return verdicts
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 'the application\'s backend answered something else than {"results": [...]}'


class ConnectProxy:
    """Asks ``proxy.connect_url`` at each upgrade (one task per upgrade asking)."""

    def __init__(self, config: ProxyConfig, shard: int, box: str, counters: stats.Counters) -> None:
        self.client = HttpClient(
            config.connect_url, connections=config.connections, timeout=config.timeout
        )
        self.shard = shard
        self.box = box
        self.counters = counters
        self.bursts = Bursts("connect_proxy", counters)

    async def ask(self, upgrade: Upgrade) -> Identity | Refusal:
        passed = {}
        for name in _PASSED:
            value = header(upgrade.headers, name)
            if value is not None:
                passed[name.lower()] = value
        body = orjson.dumps(
            {
                "headers": passed,
                "path": upgrade.path,
                "query": upgrade.query,
                "peer": upgrade.peer,
                "shard": self.shard,
                "box": self.box,
            }
        )
        self.counters[_S_CALLS] += 1
        try:
            response = await self.client.post(body)
        except BackendError as exc:
            self.bursts.failed(str(exc))
            return Refusal(503, f"the application's backend did not answer ({exc})\n")
        answer = connect_answer(response)
        if type(answer) is Refusal and answer.status == 503:
            self.bursts.failed(answer.text.strip())
        else:
            self.bursts.succeeded()
        return answer

    def close(self) -> None:
        self.client.close()


class PublishProxy(Generic[C]):
    """Sends each turn's publishes as one batch; verdicts are handed back in the
    batches' order, so that a client's messages keep their order."""

    def __init__(
        self,
        config: ProxyConfig,
        shard: int,
        box: str,
        counters: stats.Counters,
        answered: Callable[[list[ProxiedPublish[C]], list[Verdict] | None, str], None],
    ) -> None:
        self.client = HttpClient(
            config.publish_url, connections=config.connections, timeout=config.timeout
        )
        self.shard = shard
        self.box = box
        self.counters = counters
        self.answered = answered  # an engine input (the shard's wrapper)
        self.bursts = Bursts("publish_proxy", counters)
        # Batches in flight, oldest first: their verdicts, once here.
        self._flight: deque[tuple[list[ProxiedPublish[C]], list[Verdict] | str | None]] = deque()

    def send(self, items: list[ProxiedPublish[C]]) -> None:
        self._flight.append((items, None))
        asyncio.get_running_loop().create_task(self._guarded(items))

    async def _guarded(self, items: list[ProxiedPublish[C]]) -> None:
        try:
            await self._ask(items)
        except Exception as exc:  # a bug: one line, never a task's traceback
            log_event(log, logging.ERROR, "publish_proxy_error", error=repr(exc)[:200])
            # Answered all the same: a batch left without a verdict would hold
            # every later batch's verdicts behind it for good.
            self._settle(items, "the application's backend could not be asked; not sent")

    async def _ask(self, items: list[ProxiedPublish[C]]) -> None:
        body = orjson.dumps(
            {
                "messages": [
                    {
                        "id": str(i),
                        "user": item.user,
                        "room": item.room,
                        "content": item.content,
                        "shard": self.shard,
                        "box": self.box,
                    }
                    for i, item in enumerate(items)
                ]
            }
        )
        self.counters[_S_CALLS] += 1
        result: list[Verdict] | str
        try:
            result = publish_verdicts(await self.client.post(body), len(items))
        except BackendError as exc:
            result = f"the application's backend did not answer ({exc}); not sent"
        if isinstance(result, str):
            self.bursts.failed(result)
        else:
            self.bursts.succeeded()
        self._settle(items, result)

    def _settle(self, items: list[ProxiedPublish[C]], result: list[Verdict] | str) -> None:
        """``items``' verdicts (or why there are none) are here: hand back every
        batch whose turn has come, in the batches' order."""
        flight = self._flight
        for i, (batch, _) in enumerate(flight):
            if batch is items:
                flight[i] = (batch, result)
                break
        while flight and flight[0][1] is not None:
            batch, done = flight.popleft()
            if isinstance(done, str):
                self.answered(batch, None, done)
            else:
                assert done is not None
                self.answered(batch, done, "")

    def close(self) -> None:
        self.client.close()
