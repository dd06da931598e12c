"""An application backend that answers at once, for perf/scenarios/backend_cost.py.

    python -m perf.lib.fast_backend --port 8000

Keep-alive HTTP/1.1 on uvloop, no framework: ``POST /publish`` keeps every
message (``{"results": []}``), ``POST /connect`` admits ``{"user": "bench"}``,
``POST /webhooks`` answers 204 and counts the events of each batch (its
``"id":`` keys); ``GET /count`` returns that count. Its CPU is its own
process's, not the server's.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop

_ANSWERS = {
    b"/publish": b'{"results":[]}',
    b"/connect": b'{"user":"bench"}',
}


class Backend(asyncio.Protocol):
    events = 0

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            path = head.split(b" ", 2)[1]
            assert self.transport is not None
            if path == b"/webhooks":
                Backend.events += body.count(b'"id":')
                self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                continue
            if path == b"/count":
                answer = str(Backend.events).encode()
            else:
                answer = _ANSWERS.get(path, b"{}")
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(answer)).encode()
                + b"\r\n\r\n"
                + answer
            )


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Backend, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
