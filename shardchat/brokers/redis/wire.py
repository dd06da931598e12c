"""What the Redis broker stores and sends, as bytes: keys, channel payloads, scripts.

Pure: no sockets, no clock. Every key and the
channel of a room carry the room in a hash tag (``{room}``), so that on a
Redis Cluster they share one slot: the publish script touches only them, and
the channel is a shard channel (SPUBLISH/SSUBSCRIBE) of the same slot.

Channel payloads are lines (orjson never writes a raw newline, and names and
ids hold none):

- a publish batch of one room: ``m``, epoch, first seq, then per message its
  id, the wall-clock ns of its publish and its JSON (the seqs follow on from
  the first);
- a presence change: ``p``, node, user, ``1`` (joined) or ``0`` (left).
"""

from __future__ import annotations

from typing import NamedTuple

from shardchat.core import wire
from shardchat.core.broker import KEY_WINDOW, Publication

__all__ = [
    "BATCH",
    "NODES_SCRIPT",
    "PRESENCE",
    "PRESENCE_SCRIPT",
    "PUBLISH_SCRIPT",
    "STATE_SCRIPT",
    "Batch",
    "Keys",
    "decode",
    "message_parts",
    "publish_args",
]

BATCH = b"m"
PRESENCE = b"p"
_SEQ_MARK = b',"seq":0,'


class Keys(NamedTuple):
    """One room's keys and channel (all in the room's hash slot)."""

    seq: str  # INCR: the room's latest seq
    stream: str  # XADD: the last delivery.history messages, entry id <seq>-1
    epoch: str  # the name of this run of the room's seqs
    presence: str  # HASH "node\\nuser" -> 1, every box's members
    ids_now: str  # HASH idempotency key -> seq, this KEY_WINDOW bucket
    ids_before: str  # the previous bucket
    channel: str  # the shard channel of the room's traffic

    @classmethod
    def of(cls, prefix: str, room: str, wall: float) -> Keys:
        base = f"{prefix}{{{room}}}:"
        bucket = int(wall // KEY_WINDOW)
        return cls(
            base + "seq",
            base + "s",
            base + "e",
            base + "p",
            f"{base}k{bucket}",
            f"{base}k{bucket - 1}",
            base + "c",
        )


def message_parts(p: Publication) -> tuple[bytes, bytes]:
    """The message's JSON split where its seq goes: Redis joins head, seq and tail.
    ``seq`` is the last key after ``content``, so the last mark is the real one."""
    json = wire.message_json(p.room, p.sender, p.content, 0, p.timestamp, p.msg_id)
    cut = json.rfind(_SEQ_MARK) + len(_SEQ_MARK) - 2
    return json[:cut], json[cut + 1 :]


def publish_args(batch: list[Publication], wall_ns: int) -> list[bytes | str | int]:
    """ARGV of the publish script after its fixed three: five per message."""
    args: list[bytes | str | int] = []
    for p in batch:
        head, tail = message_parts(p)
        args += [p.msg_id, p.key, head, tail, wall_ns]
    return args


class Batch(NamedTuple):
    epoch: str
    first: int
    messages: list[tuple[str, int, bytes]]  # msg id, publish wall ns, JSON


def decode(data: bytes) -> Batch | tuple[str, str, bool, str | None] | None:
    """A channel payload: a :class:`Batch`, a presence change (node, user,
    joined, the join's connect-proxy info or None), or None for what this
    version does not know."""
    lines = data.split(b"\n")
    kind = lines[0]
    if kind == BATCH and len(lines) >= 3 and (len(lines) - 3) % 3 == 0:
        messages = [
            (lines[i].decode(), int(lines[i + 1]), lines[i + 2]) for i in range(3, len(lines), 3)
        ]
        return Batch(lines[1].decode(), int(lines[2]), messages)
    if kind == PRESENCE and len(lines) == 4:
        return lines[1].decode(), lines[2].decode(), lines[3] == b"1", None
    if kind == PRESENCE and len(lines) == 5:  # with info (JSON: never a raw newline)
        return lines[1].decode(), lines[2].decode(), lines[3] == b"1", lines[4].decode()
    return None


# KEYS: seq, stream, epoch, ids_now, ids_before, channel (a shard channel of the
# same slot). ARGV: history, ttl ms (0: none), a new epoch in case the room has
# none, then id, idempotency key, JSON head, JSON tail, wall ns per message.
# Returns the epoch, then per message its seq (negative: a retry of a publish
# already sequenced as -seq, which is not stored or sent again).
PUBLISH_SCRIPT = """
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  -- A new room, or Redis lost it: its seqs start again under a new epoch.
  epoch = ARGV[3]
  redis.call('SET', KEYS[3], epoch)
  redis.call('DEL', KEYS[1], KEYS[2])
end
local history = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local out = {epoch}
local parts = {'m', epoch}
local first = nil
for i = 4, #ARGV, 5 do
  local key = ARGV[i + 1]
  local seq = nil
  if key ~= '' then
    seq = redis.call('HGET', KEYS[4], key) or redis.call('HGET', KEYS[5], key)
  end
  if seq then
    out[#out + 1] = -tonumber(seq)
  else
    seq = redis.call('INCR', KEYS[1])
    local json = ARGV[i + 2] .. seq .. ARGV[i + 3]
    if history > 0 then
      redis.call('XADD', KEYS[2], 'MAXLEN', history, seq .. '-1', 'j', json)
    end
    if key ~= '' then
      redis.call('HSET', KEYS[4], key, seq)
    end
    if not first then first = seq end
    parts[#parts + 1] = ARGV[i]
    parts[#parts + 1] = ARGV[i + 4]
    parts[#parts + 1] = json
    out[#out + 1] = seq
  end
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('EXPIRE', KEYS[4], 2 * 600 + 60)
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
if first then
  table.insert(parts, 3, first)
  redis.call('SPUBLISH', KEYS[6], table.concat(parts, '\\n'))
end
return out
"""

# KEYS: seq, epoch, presence. ARGV: a new epoch in case the room has none.
# Returns the epoch, the latest seq, and every "node\\nuser" present with its
# value ("1", or the join's connect-proxy info), flat: field, value, field, ...
STATE_SCRIPT = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
  redis.call('DEL', KEYS[1])
end
return {epoch, tonumber(redis.call('GET', KEYS[1]) or '0'), redis.call('HGETALL', KEYS[3])}
"""

# KEYS: presence, channel, and with webhooks the room's occupied flag. ARGV: node,
# user, 1 (joined) or 0 (left), 1 to publish even when unchanged (a box that was
# taken for dead announces itself again, or a join brings new info), the join's
# connect-proxy info (JSON) or "": the entry's value, and sent with the change.
PRESENCE_SCRIPT = """
local field = ARGV[1] .. '\\n' .. ARGV[2]
local info = ARGV[5] or ''
local changed
if ARGV[3] == '1' then
  local value = '1'
  if info ~= '' then
    value = info
  end
  changed = redis.call('HSET', KEYS[1], field, value)
else
  changed = redis.call('HDEL', KEYS[1], field)
end
if changed == 1 or ARGV[4] == '1' then
  local said = 'p\\n' .. field .. '\\n' .. ARGV[3]
  if info ~= '' and ARGV[3] == '1' then
    said = said .. '\\n' .. info
  end
  redis.call('SPUBLISH', KEYS[2], said)
end
if KEYS[3] then
  -- Webhooks (brokers/redis/hooks.py): 1 = we made the room occupied, 2 = we
  -- left it empty.
  local occ = 0
  if changed == 1 then
    if ARGV[3] == '1' then
      if redis.call('SET', KEYS[3], '1', 'NX') then
        occ = 1
      end
    elseif redis.call('HLEN', KEYS[1]) == 0 then
      occ = 2
    end
  end
  return {changed, occ}
end
return changed
"""

# KEYS: the live nodes' sorted set. ARGV: node, ttl ms. Scores are Redis's own
# clock, so that boxes' clocks do not matter. Returns 1 when this node was not
# there (first beat, or taken for dead), then the live nodes.
NODES_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local new = redis.call('ZADD', KEYS[1], now, ARGV[1])
return {new, redis.call('ZRANGE', KEYS[1], 0, -1)}
"""
