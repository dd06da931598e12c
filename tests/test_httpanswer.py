"""shardchat.httpanswer: bytes fed in, one answer (or one error) out, wherever
the stream is cut; the reader every HTTP client of shardchat uses."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardchat.core.errors import AnswerError, AnswerGone
from shardchat.httpanswer import Answer, AnswerReader, post_bytes

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"result":1}'
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"


def sent() -> h11.Connection:
    """A client connection whose request is sent: the reader's starting point."""
    conn = h11.Connection(h11.CLIENT)
    post_bytes(conn, "/hook", [("Host", "backend")], b"{}")
    return conn


def reader(max_body: int = 1 << 20) -> AnswerReader:
    return AnswerReader(sent(), max_body)


def feed_all(r: AnswerReader, *chunks: bytes) -> list[Answer | None]:
    return [r.feed(chunk) for chunk in chunks]


def test_post_bytes_is_one_request_with_its_length() -> None:
    data = post_bytes(h11.Connection(h11.CLIENT), "/api/info", [("Host", "h")], b'{"a":1}')
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /api/info HTTP/1.1\r\n")
    assert b"\r\ncontent-length: 7" in head.lower() and body == b'{"a":1}'


def test_a_whole_answer_at_once() -> None:
    answer = reader().feed(OK)
    assert answer is not None
    assert answer.status == 200 and answer.body == b'{"result":1}'
    assert answer.headers()["content-type"] == "application/json"
    assert answer.reusable  # both sides done: the connection may carry another request


def test_more_bytes_are_needed_until_the_end_of_the_body() -> None:
    r = reader()
    assert feed_all(r, OK[:10], OK[10:-1]) == [None, None]
    answer = r.feed(OK[-1:])
    assert answer is not None and answer.body == b'{"result":1}'


def test_a_chunked_body_is_joined() -> None:
    answer = reader().feed(CHUNKED)
    assert answer is not None and answer.body == b"abcde"


def test_an_informational_answer_is_passed_over() -> None:
    answer = reader().feed(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert answer is not None and answer.status == 200


def test_a_body_that_ends_with_the_stream() -> None:
    r = reader()
    assert r.feed(b"HTTP/1.1 200 OK\r\n\r\nuntil") is None
    answer = r.feed(b"")
    assert answer is not None and answer.body == b"until"
    assert not answer.reusable  # the stream ended it: no next request here


def test_connection_close_is_not_reusable() -> None:
    answer = reader().feed(b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert answer is not None and answer.status == 503 and not answer.reusable


def test_the_stream_ending_before_any_byte_is_gone() -> None:
    with pytest.raises(AnswerGone, match="closed before answering"):
        reader().feed(b"")


def test_the_stream_ending_in_the_head_is_an_error_not_gone() -> None:
    r = reader()
    assert r.feed(OK[:20]) is None
    with pytest.raises(AnswerError, match="bad HTTP answer") as caught:
        r.feed(b"")
    assert not isinstance(caught.value, AnswerGone)  # bytes came: the request was read


def test_the_stream_ending_in_the_body_is_an_error() -> None:
    r = reader()
    assert r.feed(OK[:-3]) is None
    with pytest.raises(AnswerError, match="bad HTTP answer"):
        r.feed(b"")


def test_not_http_is_an_error() -> None:
    with pytest.raises(AnswerError, match="bad HTTP answer"):
        reader().feed(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


def test_a_body_over_the_limit_is_an_error() -> None:
    r = reader(max_body=11)
    with pytest.raises(AnswerError, match="too large"):
        r.feed(OK)
    assert reader(max_body=12).feed(OK) is not None  # the limit itself is allowed


def test_the_next_answer_on_a_kept_connection() -> None:
    conn = sent()
    first = AnswerReader(conn, 100).feed(OK)
    assert first is not None and first.reusable
    conn.start_next_cycle()
    post_bytes(conn, "/hook", [("Host", "backend")], b"{}")
    second = AnswerReader(conn, 100).feed(CHUNKED)
    assert second is not None and second.body == b"abcde"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_split_of_the_bytes_reads_the_same_answer(data: st.DataObject) -> None:
    whole = data.draw(st.sampled_from([OK, CHUNKED]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=8)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    pieces = [p for p in pieces if p]  # an empty piece is the end of the stream
    r = reader()
    results = feed_all(r, *pieces)
    assert results[:-1] == [None] * (len(pieces) - 1)
    answer = results[-1]
    assert answer is not None and answer.status == 200
    assert answer.body == (b'{"result":1}' if whole is OK else b"abcde")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, len(OK) - 1))
def test_a_stream_cut_anywhere_is_one_error(cut: int) -> None:
    r = reader()
    assert r.feed(OK[:cut]) is None
    with pytest.raises(AnswerError):
        r.feed(b"")
