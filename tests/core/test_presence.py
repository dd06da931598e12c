"""The presence view (pure): one join and one leave per user across shards and
connections, and a restarted shard's users gone at once."""

from __future__ import annotations

import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from shardchat.core.presence import LocalPresence, PresenceView


def test_a_user_on_two_shards_joins_once_and_leaves_once() -> None:
    view = PresenceView()
    assert view.change("r", "ada", 0, True) is True
    assert view.change("r", "ada", 1, True) is False
    assert view.users("r") == ["ada"] and view.count("r") == 1
    assert view.change("r", "ada", 0, False) is False
    assert view.change("r", "ada", 1, False) is True
    assert view.users("r") == [] and view.present == {}


def test_local_connections_announce_first_and_last_only() -> None:
    view = LocalPresence()
    assert view.local_join("r", "ada") is True
    assert view.local_join("r", "ada") is False
    assert view.local_leave("r", "ada") is False
    assert view.local_leave("r", "ada") is True
    assert view.local_leave("r", "ada") is False and view.local == {}


def test_drop_shard_returns_exactly_its_users() -> None:
    view = PresenceView()
    view.change("r", "ada", 1, True)
    view.change("r", "bob", 1, True)
    view.change("r", "bob", 2, True)
    view.change("s", "cy", 1, True)
    assert sorted(view.drop_shard(1)) == [("r", "ada"), ("s", "cy")]
    assert view.users("r") == ["bob"] and view.users("s") == []


@given(
    st.lists(
        st.tuples(
            st.sampled_from("ab"), st.sampled_from(["u", "v"]), st.integers(0, 2), st.booleans()
        ),
        max_size=60,
    )
)
def test_matches_a_model_of_connection_counts(ops: list[tuple[str, str, int, bool]]) -> None:
    """Driven as shards drive it (announce only first/last), the view says a user is
    present exactly while some shard has a connection of theirs."""
    views = {shard: PresenceView() for shard in range(3)}
    locals_ = {shard: LocalPresence() for shard in range(3)}
    counts: dict[tuple[str, str, int], int] = {}
    for room, user, shard, joining in ops:
        key = (room, user, shard)
        if not joining and counts.get(key, 0) == 0:
            continue
        counts[key] = counts.get(key, 0) + (1 if joining else -1)
        announce = (
            locals_[shard].local_join(room, user)
            if joining
            else locals_[shard].local_leave(room, user)
        )
        if announce:
            for view in views.values():
                view.change(room, user, shard, joining)
    for room in "ab":
        expected = sorted(u for u in "uv" if any(counts.get((room, u, s), 0) for s in range(3)))
        for view in views.values():
            assert sorted(view.users(room)) == expected


def test_a_remote_user_costs_a_dict_slot_not_a_set() -> None:
    """A room's holders keep its users: an entry must stay a dict slot (a set per
    entry was about 246 bytes)."""
    view = PresenceView()
    names = [(f"room{i // 10}", f"user{i}") for i in range(5000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for room, user in names:
            assert view.change(room, user, 5, True)
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(names)
    finally:
        tracemalloc.stop()
    assert per_entry < 80, per_entry
    for room, user in names:
        assert view.change(room, user, 6, True) is False
    assert view.drop_shard(5) == []
    assert sorted(view.drop_shard(6)) == sorted(names)
    assert view.present == {}


def test_engine_ids_far_apart_still_make_small_masks_and_dropped_bits_are_reused() -> None:
    """The Redis broker numbers other nodes' engines from 2**16: a mask must not
    become a 65,536-bit int."""
    view = PresenceView()
    for peer in (0, 1 << 16, (1 << 16) + 1):
        assert view.change("r", f"u{peer}", peer, True)
    assert view.change("r", "both", 1 << 16, True) and not view.change("r", "both", 3, True)
    assert max(view.present["r"].values()).bit_length() <= 4
    assert sorted(view.drop_shard(1 << 16)) == [("r", f"u{1 << 16}")]  # "both" stays, on 3
    assert view.change("r", "new", 1 << 20, True)  # takes the dropped bit
    assert max(view.present["r"].values()).bit_length() <= 4
    assert view.change("r", "both", 3, False) and "both" not in view.present["r"]
    assert view.change("r", "gone", 1 << 16, False) is False  # a dropped engine
