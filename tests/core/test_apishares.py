"""The server API's gathered answers: every engine's share merged into one."""

from __future__ import annotations

from shardchat.core import apishares as shares
from shardchat.core.apicalls import Rooms


def test_a_user_on_several_engines_counts_once_and_their_connections_add_up() -> None:
    parts = [{"ada": 2, "bob": 1}, {"ada": 1}, {}]
    assert shares.presence("r", 10)(parts) == {
        "room": "r",
        "count": 2,
        "connections": 4,
        "users": [{"user": "ada", "connections": 3}, {"user": "bob", "connections": 1}],
    }
    assert shares.presence_stats("r")(parts) == {"room": "r", "users": 2, "connections": 4}


def test_presence_lists_at_most_the_limit_by_name() -> None:
    result = shares.presence("r", 2)([{"c": 1, "a": 1}, {"b": 1}])
    assert [u["user"] for u in result["users"]] == ["a", "b"]
    assert result["count"] == 3 and result["truncated"] is True


def test_rooms_merge_filter_and_page() -> None:
    parts = [
        {"team.a": {"ada": 1}, "team.b": {"bob": 2}, "other": {"x": 1}},
        {"team.a": {"ada": 1, "cy": 1}, "team.c": {"dee": 1}},
    ]
    first = shares.rooms(Rooms("team.*", 2, None))(parts)
    assert first == {
        "rooms": [
            {"room": "team.a", "users": 2, "connections": 3},
            {"room": "team.b", "users": 1, "connections": 2},
        ],
        "cursor": "team.b",
    }
    rest = shares.rooms(Rooms("team.*", 2, "team.b"))(parts)
    assert rest == {"rooms": [{"room": "team.c", "users": 1, "connections": 1}], "cursor": None}
