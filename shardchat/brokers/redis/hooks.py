"""What the Redis broker keeps for webhooks across boxes: scripts and keys. Pure.

docs/WEBHOOKS.md. ``room_occupied``/``room_vacated`` are decided in Redis,
where every box's presence of a room is (its hash ``:p``): a flag ``:o`` in
the room's slot says the backend was told the room is occupied. The presence
script (``wire.PRESENCE_SCRIPT``, given the flag as a third key) sets it
with the room's first member anywhere (the node whose script set it reports
``room_occupied``) and says when its change left the room empty; after
``webhooks.vacated_grace`` that node runs :data:`VACATE_SCRIPT`, which clears
the flag only if the room is still empty (it then reports ``room_vacated``):
once per transition whatever the number of boxes, none for a quick return.

A dead node's entries are removed by whichever surviving node sees them first
(:data:`REMOVE_SCRIPT`, an HDEL: the one that removed an entry reports its
``leave``), and each of its users' ``disconnect`` is reported by the node that
wins :func:`gone_key` (``SET NX``): exactly once among the survivors.
"""

from __future__ import annotations

import hashlib

__all__ = ["GONE_TTL", "REMOVE_SCRIPT", "VACATE_SCRIPT", "death_id", "gone_key", "occupied_key"]

GONE_TTL = 86400  # seconds a dead node's user stays claimed (its disconnect reported)

# KEYS: presence, occupied flag. Returns 1 when the room was left empty and the
# flag cleared by us (report room_vacated), else 0.
VACATE_SCRIPT = """
if redis.call('HLEN', KEYS[1]) == 0 then
  return redis.call('DEL', KEYS[2])
end
return 0
"""

# KEYS: presence. ARGV: "node\\nuser" of a dead node. Returns 0 when another node
# removed it first, 1 when we did, 2 when we did and the room is now empty.
REMOVE_SCRIPT = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if redis.call('HLEN', KEYS[1]) == 0 then
  return 2
end
return 1
"""


def occupied_key(prefix: str, room: str) -> str:
    """The room's flag: the backend was told it is occupied (same slot as ``:p``)."""
    return f"{prefix}{{{room}}}:o"


def gone_key(prefix: str, node: str, user: str) -> str:
    """Claimed by the survivor that reports a dead node's user's disconnect."""
    return f"{prefix}gone:{node}:{user}"


def death_id(node: str, user: str, kind: str, room: str = "") -> str:
    """A dead node's user's event id: the same whoever reports it."""
    key = f"{node}:{user}:{kind}:{room}".encode()
    return "evt_b" + hashlib.sha256(key).hexdigest()[:24]
