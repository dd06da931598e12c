"""The API connection's first look at a request line, and the key it presents."""

from __future__ import annotations

import pytest

from shardchat.shard.apihttp import api_key_of, is_api_request, response


@pytest.mark.parametrize(
    ("head", "api"),
    [
        (b"POST /api/publish HTTP/1.1\r\n", True),
        (b"GET /api/info", True),
        (b"POST /api/", True),
        (b"POST /ap", None),  # not enough yet
        (b"POS", None),
        (b"GET /ws?user=a HTTP/1.1\r\n", False),
        (b"GET / HTTP/1.1\r\n", False),
        (b"GET /api HTTP/1.1\r\n", False),  # /api itself is a page path (404)
        (b"GET /apix HTTP/1.1", False),
        (b"x" * 20, False),  # no space in 16 bytes: not a request line we route
    ],
)
def test_is_api_request(head: bytes, api: bool | None) -> None:
    assert is_api_request(head) is api


def test_api_key_of_reads_both_headers() -> None:
    assert api_key_of([(b"x-api-key", b"k1")]) == b"k1"
    assert api_key_of([(b"authorization", b"apikey k2")]) == b"k2"
    assert api_key_of([(b"authorization", b"ApiKey  k3 ")]) == b"k3"
    assert api_key_of([(b"authorization", b"Bearer k4")]) is None
    assert api_key_of([]) is None


def test_answers_carry_the_main_ports_headers() -> None:
    """Every answer of the main port carries these (docs/PROTOCOL.md); the API's too."""
    head = response(404, b"{}", close=False).partition(b"\r\n\r\n")[0].split(b"\r\n")
    for line in (b"X-Content-Type-Options: nosniff", b"Referrer-Policy: no-referrer"):
        assert line in head
    assert b"Cache-Control: no-store" in head
    assert b"Connection: close" in response(401, b"{}", close=True).split(b"\r\n")
