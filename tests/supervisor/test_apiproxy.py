"""The admin port's forward to the server API, on real loopback sockets driven by a
selector as the supervisor drives it: an answer passed through with the key added, an
API that cannot be reached (502), one that never answers (504), the API off (503)."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from shardchat.supervisor.apiproxy import ApiProxy, ApiTarget
from tests.support.helpers import free_port, scaled


def drive(
    selector: selectors.BaseSelector,
    proxy: ApiProxy,
    answers: list[tuple[int, bytes]],
    now: float | None = None,
) -> None:
    """Run the selector until the proxy has answered (as the supervisor's loop does)."""
    deadline = time.monotonic() + scaled(10)
    while not answers:
        assert time.monotonic() < deadline, "no answer"
        for key, _ in selector.select(0.05):
            key.data()
        proxy.expire(now if now is not None else time.monotonic())


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def test_an_answer_is_passed_through_with_the_key_added(listener: socket.socket) -> None:
    seen: list[bytes] = []

    def api() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b'{"room":"r"}'):
                data += conn.recv(65536)
            seen.append(data)
            body = b'{"result":{"seq":7}}'
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )

    thread = threading.Thread(target=api, daemon=True)
    thread.start()
    selector = selectors.DefaultSelector()
    proxy = ApiProxy(selector, ApiTarget("127.0.0.1", listener.getsockname()[1], "the-key"))
    answers: list[tuple[int, bytes]] = []
    proxy.forward("publish", b'{"room":"r"}', lambda status, body: answers.append((status, body)))
    drive(selector, proxy, answers)
    thread.join(scaled(5))
    assert answers == [(200, b'{"result":{"seq":7}}')]
    request = seen[0].decode()
    assert request.startswith("POST /api/publish HTTP/1.1\r\n")
    assert "\r\nX-API-Key: the-key\r\n" in request
    assert proxy.fds() == []  # the connection is closed


def test_an_api_that_cannot_be_reached_is_a_502() -> None:
    selector = selectors.DefaultSelector()
    proxy = ApiProxy(selector, ApiTarget("127.0.0.1", free_port(), "k"))
    answers: list[tuple[int, bytes]] = []
    proxy.forward("rooms", b"{}", lambda status, body: answers.append((status, body)))
    drive(selector, proxy, answers)
    assert answers[0][0] == 502
    assert orjson.loads(answers[0][1])["error"]["code"] == "unreachable"


def test_an_api_that_never_answers_is_a_504_at_the_deadline(listener: socket.socket) -> None:
    selector = selectors.DefaultSelector()
    proxy = ApiProxy(selector, ApiTarget("127.0.0.1", listener.getsockname()[1], "k"))
    answers: list[tuple[int, bytes]] = []
    proxy.forward("rooms", b"{}", lambda status, body: answers.append((status, body)))
    deadline = proxy.next_deadline()
    assert deadline is not None
    drive(selector, proxy, answers, now=deadline)  # the loop reaches the deadline
    assert answers[0][0] == 504
    assert orjson.loads(answers[0][1])["error"]["code"] == "timeout"
    assert proxy.next_deadline() is None


def test_the_api_off_is_a_503_at_once() -> None:
    proxy = ApiProxy(selectors.DefaultSelector(), None)
    answers: list[tuple[int, bytes]] = []
    proxy.forward("rooms", b"{}", lambda status, body: answers.append((status, body)))
    assert answers and answers[0][0] == 503
    assert orjson.loads(answers[0][1])["error"]["code"] == "api_off"
