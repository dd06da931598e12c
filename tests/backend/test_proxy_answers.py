"""The backend's answers read: a connect's user, rooms and refusals (an unnamed 4xx
status refuses as 403), and a publish batch's verdicts."""

from __future__ import annotations

from shardchat.auth import Identity
from shardchat.backend.http import Response
from shardchat.backend.proxy import connect_answer, publish_verdicts
from shardchat.core.admission import Refusal
from shardchat.core.hookevents import Verdict


def answer(status: int, body: bytes) -> Response:
    return Response(status, {}, body)


def test_connect_answers() -> None:
    assert connect_answer(answer(200, b'{"user": "ada"}')) == Identity("ada", None)
    assert connect_answer(answer(200, b'{"user": "ada", "rooms": ["a"]}')) == Identity(
        "ada", frozenset({"a"})
    )
    assert connect_answer(answer(403, b'{"reason": "banned"}')) == Refusal(403, "banned\n")
    assert connect_answer(answer(401, b"log in first")) == Refusal(401, "log in first\n")
    assert connect_answer(answer(499, b"odd")) == Refusal(403, "odd\n")
    for bad in (b'{"user": "no spaces allowed"}', b"[]", b"not json", b'{"user": "a", "rooms": 1}'):
        refusal = connect_answer(answer(200, bad))
        assert isinstance(refusal, Refusal) and refusal.status == 503
    assert connect_answer(answer(500, b"")) == Refusal(
        503, "the application's backend answered 500\n"
    )


def test_connect_info_is_an_object_of_at_most_1_kib() -> None:
    admitted = connect_answer(answer(200, b'{"user": "ada", "info": {"name": "Ada", "n": [1]}}'))
    assert admitted == Identity("ada", None, info='{"name":"Ada","n":[1]}')
    at_limit = b'{"user": "ada", "info": {"k": "' + b"x" * (1024 - 8) + b'"}}'
    admitted = connect_answer(answer(200, at_limit))
    assert isinstance(admitted, Identity) and admitted.info is not None
    assert len(admitted.info) == 1024
    over = b'{"user": "ada", "info": {"k": "' + b"x" * (1025 - 8) + b'"}}'
    assert connect_answer(answer(200, over)) == Refusal(
        503, "the application's backend answered an info over 1024 bytes\n"
    )
    for bad in (b"[1]", b'"text"', b"3"):
        assert connect_answer(answer(200, b'{"user": "ada", "info": ' + bad + b"}")) == Refusal(
            503, "the application's backend answered an info that is not an object\n"
        )
    assert connect_answer(answer(200, b'{"user": "ada", "info": null}')) == Identity("ada", None)


def test_publish_verdicts() -> None:
    body = b'{"results": [{"id": "1", "content": "new"}, {"id": "2", "reject": "no"}]}'
    assert publish_verdicts(answer(200, body), 3) == [
        Verdict(),
        Verdict(content="new"),
        Verdict(reject="no"),
    ]
    assert publish_verdicts(answer(200, b'{"results": [{"id": "9"}]}'), 1) == [Verdict()]
    assert isinstance(publish_verdicts(answer(200, b"{}"), 1), str)
    assert publish_verdicts(answer(502, b""), 1) == "the application's backend answered 502"
