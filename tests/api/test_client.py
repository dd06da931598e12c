"""The server API's Python clients against a scripted HTTP peer: a kept
connection the server closed is opened again once, and an answer that is not
HTTP is an ApiError, for the blocking and the asyncio client alike."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from shardchat.api import ApiClient, AsyncApiClient
from shardchat.core.errors import ApiError, ApiRoomFull


def answer(body: bytes, status: bytes = b"200 OK", close: bool = False) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n" % len(body)
    return head + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body


RESULT = answer(b'{"result":{"users":[],"count":0}}')


class Peer:
    """A server that answers each connection's requests from a script: a list of
    answers per connection (None: close without answering)."""

    def __init__(self, script: list[list[bytes | None]]) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for answers in self.script:
            conn, _ = self.listener.accept()
            self.connections += 1
            with conn:
                for reply in answers:
                    _read_request(conn)
                    if reply is None:
                        break
                    conn.sendall(reply)

    def close(self) -> None:
        self.listener.close()


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += conn.recv(65536)


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[Peer]:
    server = Peer(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("peer", [[[RESULT, None], [RESULT]]], indirect=True)
def test_a_kept_connection_the_server_closed_is_opened_again_once(peer: Peer) -> None:
    with ApiClient(f"http://127.0.0.1:{peer.port}", "k", timeout=5) as api:
        assert api.presence("r")["count"] == 0
        assert api.presence("r")["count"] == 0  # the first connection closed: anew
    assert peer.connections == 2


@pytest.mark.parametrize("peer", [[[b"SSH-2.0-x\r\n\r\n"]]], indirect=True)
def test_an_answer_that_is_not_http_is_an_api_error(peer: Peer) -> None:
    with ApiClient(f"http://127.0.0.1:{peer.port}", "k", timeout=5) as api:
        with pytest.raises(ApiError, match="bad HTTP answer"):
            api.info()


@pytest.mark.parametrize(
    "peer",
    [[[answer(b'{"error":{"code":"room_full","message":"full"}}', b"409 Conflict", True)]]],
    indirect=True,
)
def test_a_refusal_is_the_class_of_its_code(peer: Peer) -> None:
    with ApiClient(f"http://127.0.0.1:{peer.port}", "k", timeout=5) as api:
        with pytest.raises(ApiRoomFull, match="full"):
            api.subscribe("u", "r")


@pytest.mark.parametrize(
    "peer", [[[RESULT, None], [RESULT], [b"\x00garbage\r\n\r\n"]]], indirect=True
)
async def test_the_asyncio_client_alike(peer: Peer) -> None:
    async with AsyncApiClient(f"http://127.0.0.1:{peer.port}", "k", timeout=5) as api:
        assert (await api.presence("r"))["count"] == 0
        assert (await api.presence("r"))["count"] == 0
        await api.aclose()  # the next call on a connection of its own
        with pytest.raises(ApiError, match="bad HTTP answer"):
            await api.info()
    assert peer.connections == 3
