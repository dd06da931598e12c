"""The server API's HTTP pieces: which connection is the API's, its key, its answers.

A connection on the main port whose request line asks for ``/api/`` goes to
the API; the key comes in ``X-API-Key`` or ``Authorization: apikey``; an
answer is a small fixed-form response with a JSON body, its headers all of
our own making.
"""

from __future__ import annotations

import email.utils
import http
import time

__all__ = ["PREFIX", "api_key_of", "content_length", "is_api_request", "response"]

PREFIX = b"/api/"


def is_api_request(head: bytes) -> bool | None:
    """Whether the first bytes of a connection start a request for ``/api/...``;
    None while too few have come to tell."""
    space = head.find(b" ")
    if space < 0:
        return None if len(head) < 16 else False
    target = head[space + 1 : space + 1 + len(PREFIX)]
    if len(target) < len(PREFIX) and PREFIX.startswith(target) and b"\n" not in head:
        return None
    return target == PREFIX


def api_key_of(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request presents: ``X-API-Key: KEY`` or ``Authorization: apikey KEY``."""
    for name, value in headers:
        if name == b"x-api-key":
            return value
        if name == b"authorization":
            scheme, _, key = value.partition(b" ")
            if scheme.lower() == b"apikey":
                return key.strip()
    return None


_dates: list[tuple[int, bytes]] = [(0, b"")]


def _date() -> bytes:
    """The Date header's value (RFC 9110 6.6.1), made once a second."""
    now = int(time.time())
    second, text = _dates[0]
    if second != now:
        text = email.utils.formatdate(now, usegmt=True).encode()
        _dates[0] = (now, text)
    return text


def response(
    status: int, body: bytes, close: bool, extra: tuple[tuple[str, str], ...] = ()
) -> bytes:
    """One answer: a JSON body and the fixed headers (our own values only)."""
    head = [
        b"HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase.encode()),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Date: " + _date(),
        b"Cache-Control: no-store",
        b"X-Content-Type-Options: nosniff",
        b"Referrer-Policy: no-referrer",  # as every answer of the main port
        *(f"{name}: {value}".encode() for name, value in extra),
    ]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def content_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 checked it is a number
    return 0
