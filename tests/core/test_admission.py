"""Admission (core/admission.py) on plain values: names for users who gave none come
from the source it is handed, not from a random source of its own."""

from __future__ import annotations

import itertools
import re

from shardchat.core.admission import Admitted, Upgrade, admit
from shardchat.core.config import Config
from shardchat.hooks import Hooks, random_guest_name


def _upgrade(query: str) -> Upgrade:
    return Upgrade(1, "127.0.0.1", f"/ws?{query}", query, {})


def _admit(hooks: Hooks, query: str) -> Admitted:
    result = admit(
        Config(), hooks, 0, _upgrade(query), draining=False, connections=0, from_peer=0, verify=None
    )
    assert isinstance(result, Admitted), result
    return result


def test_a_user_without_a_name_gets_the_next_guest_name_of_the_injected_source() -> None:
    names = (f"guest-{i:04x}" for i in itertools.count(1))
    hooks = Hooks(None, guest_name=lambda: next(names))
    assert _admit(hooks, "room=a").user == "guest-0001"
    assert _admit(hooks, "user=ann").user == "ann"  # a name: the source is not asked
    assert _admit(hooks, "").user == "guest-0002"


def test_the_shards_default_source_is_random_guest_xxxx() -> None:
    names = {random_guest_name() for _ in range(50)}
    assert all(re.fullmatch("guest-[0-9a-f]{4}", n) for n in names), names
    assert len(names) > 1
    assert _admit(Hooks(None), "").user.startswith("guest-")
