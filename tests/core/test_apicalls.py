"""The server API's call checks (core/apicalls.py): every method's fields, each
refusal naming its field, batches answered command by command."""

from __future__ import annotations

import pytest

from shardchat.core import apicalls as calls
from shardchat.core.apicalls import Limits, parse
from shardchat.core.errors import ApiBadJson, ApiBadRequest, ApiError, ApiNotFound

LIMITS = Limits(max_content=16, history=50, sender="system")


def test_each_method_gives_its_call_with_defaults() -> None:
    assert parse("publish", b'{"room": "r", "content": "c"}', LIMITS) == calls.Publish(
        "r", "c", "system", None
    )
    assert parse(
        "publish", b'{"room": "r", "content": "c", "sender": "s", "key": "k"}', LIMITS
    ) == (calls.Publish("r", "c", "s", "k"))
    assert parse("broadcast", b'{"rooms": ["a", "b"], "content": "c"}', LIMITS) == (
        calls.Broadcast(("a", "b"), "c", "system", None)
    )
    assert parse("disconnect", b'{"user": "u"}', LIMITS) == calls.Disconnect(
        "u", False, "disconnected by the server"
    )
    assert parse("subscribe", b'{"user": "u", "room": "r"}', LIMITS) == calls.Subscribe("u", "r")
    assert parse("unsubscribe", b'{"user": "u", "room": "r"}', LIMITS) == calls.Unsubscribe(
        "u", "r"
    )
    assert parse("presence", b'{"room": "r"}', LIMITS) == calls.Presence("r")
    assert parse("presence_stats", b'{"room": "r"}', LIMITS) == calls.PresenceStats("r")
    assert parse("history", b'{"room": "r"}', LIMITS) == calls.History("r", 50, None, None)
    assert parse("history", b'{"room": "r", "limit": 5, "before": 9}', LIMITS) == calls.History(
        "r", 5, None, 9
    )
    assert parse("rooms", b"", LIMITS) == calls.Rooms(None, calls.MAX_ROOMS_PAGE, None)
    assert parse("info", b"  ", LIMITS) == calls.Info()


@pytest.mark.parametrize(
    ("method", "body", "error", "message"),
    [
        ("nope", b"{}", ApiNotFound, "no such method: 'nope'"),
        ("publish", b"{", ApiBadJson, "malformed JSON"),
        ("publish", b'"x"', ApiBadRequest, "the body must be a JSON object"),
        ("publish", b'{"content": "c"}', ApiBadRequest, "room is required"),
        ("publish", b'{"room": "r", "content": 5}', ApiBadRequest, "content must be a string"),
        (
            "publish",
            b'{"room": "r", "content": "' + b"x" * 17 + b'"}',
            ApiBadRequest,
            "content is over 16 bytes",
        ),
        ("publish", b'{"room": "r", "content": "c", "key": ""}', ApiBadRequest, "key must be"),
        ("publish", b'{"room": "r", "content": "c", "x": 1}', ApiBadRequest, "x is not a field"),
        ("broadcast", b'{"rooms": [], "content": "c"}', ApiBadRequest, "rooms must be a list"),
        ("broadcast", b'{"rooms": ["a", "a"], "content": "c"}', ApiBadRequest, "twice"),
        ("broadcast", b'{"rooms": ["a", "b c"], "content": "c"}', ApiBadRequest, "rooms[1] must"),
        ("disconnect", b'{"user": "u", "reconnect": 1}', ApiBadRequest, "reconnect must be true"),
        ("disconnect", b'{"user": "u", "reason": "' + b"r" * 121 + b'"}', ApiBadRequest, "reason"),
        (
            "history",
            b'{"room": "r", "limit": 51}',
            ApiBadRequest,
            "limit must be an integer from 0 to 50",
        ),
        ("history", b'{"room": "r", "since": -1}', ApiBadRequest, "since must be"),
        ("history", b'{"room": "r", "since": true}', ApiBadRequest, "since must be"),
        ("rooms", b'{"limit": 0}', ApiBadRequest, "limit must be an integer from 1"),
        ("rooms", b'{"pattern": ""}', ApiBadRequest, "pattern must be a glob"),
        ("batch", b'{"commands": []}', ApiBadRequest, "commands must be a list"),
        ("batch", b'{"commands": [{"method": "batch"}]}', ApiBadRequest, "commands[0].method"),
        ("batch", b'{"commands": [1]}', ApiBadRequest, "commands[0] must be an object"),
    ],
)
def test_each_refusal_names_its_field(
    method: str, body: bytes, error: type[ApiError], message: str
) -> None:
    with pytest.raises(error) as caught:
        parse(method, body, LIMITS)
    assert message in caught.value.message
    assert type(caught.value) is error


def test_a_batch_keeps_each_commands_refusal_in_its_place() -> None:
    body = (
        b'{"commands": [{"method": "info"}, {"method": "publish", "params": {"room": "r"}},'
        b' {"method": "presence", "params": {"room": "r"}}]}'
    )
    batch = parse("batch", body, LIMITS)
    assert isinstance(batch, calls.Batch)
    (m0, c0), (m1, c1), (m2, c2) = batch.commands
    assert (m0, c0) == ("info", calls.Info())
    assert m1 == "publish" and isinstance(c1, ApiBadRequest)
    assert c1.message == "commands[1].params.content is required"
    assert (m2, c2) == ("presence", calls.Presence("r"))


def test_rooms_pattern_is_a_case_sensitive_glob() -> None:
    assert calls.matches("team.*", "team.a") and not calls.matches("team.*", "Team.a")
    assert calls.matches(None, "anything") and calls.matches("r?", "r1")
    assert not calls.matches("r?", "r12")


def test_answers() -> None:
    assert calls.result_body({"seq": 1}) == b'{"result":{"seq":1}}'
    assert calls.error_body(ApiBadRequest("room is required")) == (
        b'{"error":{"code":"bad_request","message":"room is required"}}'
    )
