"""One HTTP/1.1 answer read from the bytes fed to it (h11), without I/O.

Every client of shardchat that sends a request and waits for its answer (the
server API's clients, the backend's HTTP client, the admin port's forward to
the server API) reads it with an :class:`AnswerReader`: the caller sends the
request on its own socket, then feeds the reader what it receives, ``b""``
for the end of the stream, until :meth:`~AnswerReader.feed` returns the
:class:`Answer`. Whatever stops an answer raises :class:`AnswerError`; a
stream that ended before any byte of an answer raises its subclass
:class:`AnswerGone`, the one case where sending the request again on a new
connection is safe when the old one was a kept-alive one (the peer closed it
while it was idle and never read the request).

::

    conn = h11.Connection(h11.CLIENT)
    sock.sendall(conn.send(request) + conn.send(h11.Data(data=body)) + ...)
    reader = AnswerReader(conn, max_body=1 << 20)
    while (answer := reader.feed(sock.recv(65536))) is None:
        pass
"""

from __future__ import annotations

from dataclasses import dataclass

import h11

from shardchat.core.errors import AnswerError, AnswerGone

__all__ = ["Answer", "AnswerError", "AnswerGone", "AnswerReader", "post_bytes"]


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer: its head, its body, and whether the connection may carry
    the next request (both sides done with this one)."""

    response: h11.Response
    body: bytes
    reusable: bool

    @property
    def status(self) -> int:
        return self.response.status_code

    def headers(self) -> dict[str, str]:
        """The head's fields, names lower-cased (the last of a repeated name)."""
        return {k.decode().lower(): v.decode("latin-1") for k, v in self.response.headers}


class AnswerReader:
    """Reads the answer to the request last sent on ``conn``, from bytes fed in.

    ``max_body``: the largest body kept; a longer one is an :class:`AnswerError`.
    """

    __slots__ = ("_body", "_conn", "_max_body", "_response", "_size")

    def __init__(self, conn: h11.Connection, max_body: int) -> None:
        self._conn = conn
        self._max_body = max_body
        self._response: h11.Response | None = None
        self._body: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes | bytearray) -> Answer | None:
        """Take ``data`` (``b""``: the stream ended); the answer once it is whole,
        None while more bytes are needed.

        Raises:
            AnswerGone: the stream ended before any byte of an answer.
            AnswerError: the answer is not HTTP, too large, or cut short.
        """
        conn = self._conn
        if not data and self._response is None and not conn.trailing_data[0]:
            # h11 calls this a protocol error; to the caller it is a closed
            # connection, which a kept-alive one may be.
            raise AnswerGone("closed before answering")
        try:
            conn.receive_data(bytes(data))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    return None
                kind = type(event)
                if kind is h11.Response:
                    self._response = event  # type: ignore[assignment]
                elif kind is h11.Data:
                    chunk = event.data  # type: ignore[union-attr]
                    self._size += len(chunk)
                    if self._size > self._max_body:
                        raise AnswerError(f"the answer is too large (over {self._max_body} bytes)")
                    self._body.append(bytes(chunk))
                elif kind is h11.EndOfMessage:
                    assert self._response is not None  # h11 sends a Response first
                    # h11 says DONE too for a body the end of the stream ended.
                    reusable = (
                        bool(data) and conn.our_state is h11.DONE and conn.their_state is h11.DONE
                    )
                    return Answer(self._response, b"".join(self._body), reusable)
                elif kind is h11.ConnectionClosed:
                    # Only before a Response: after one, h11 ends or refuses the body.
                    raise AnswerGone("closed before answering")
                # InformationalResponse (1xx): the real answer follows.
        except h11.RemoteProtocolError as exc:
            raise AnswerError(f"bad HTTP answer: {exc}") from None


def post_bytes(
    conn: h11.Connection, target: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    """A whole ``POST`` of ``body`` to ``target`` with ``headers`` (Content-Length
    added), as bytes to send on ``conn``'s socket."""
    request = h11.Request(
        method="POST", target=target, headers=[*headers, ("Content-Length", str(len(body)))]
    )
    return b"".join(
        conn.send(event) or b"" for event in (request, h11.Data(data=body), h11.EndOfMessage())
    )
