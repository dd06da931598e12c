"""The server API in the tests: raw HTTP calls, each answer checked against docs/api.yaml."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from shardchat.testing.rawws import response_head
from tests.support.helpers import scaled

KEY = "test-api-key-0123456789"
SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "api.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
_REGISTRY: Registry = Registry().with_resource(  # type: ignore[type-arg]
    "urn:api", Resource.from_contents(SPEC, default_specification=DRAFT202012)
)


def _pointer(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def check_answer(method: str, status: int, body: Any) -> None:
    """``body`` is what docs/api.yaml says ``method`` answers with ``status``."""
    path = SPEC["paths"].get(f"/api/{method}")
    code = "200" if status == 200 else "default"
    if path is None:  # no such method: the common error answer
        assert status != 200
        response = {"$ref": "#/components/responses/Error"}
    else:
        response = path["post"]["responses"][code]
    if "$ref" in response:
        pointer = response["$ref"] + "/content/application~1json/schema"
    else:
        pointer = "#/paths/" + _pointer(f"/api/{method}") + f"/post/responses/{code}"
        pointer += "/content/application~1json/schema"
    validator = Draft202012Validator({"$ref": "urn:api" + pointer}, registry=_REGISTRY)
    validator.validate(body)
    if status != 200:
        assert body["error"]["code"] in _STATUS_OF and _STATUS_OF[body["error"]["code"]] == status


_STATUS_OF = {
    "bad_json": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "room_full": 409,
    "unavailable": 503,
    "overloaded": 503,
}


class Http:
    """One keep-alive connection to the API, on a bare socket (so that a test can
    send any bytes, and know which connection answered)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=scaled(10))
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The next answer: status, headers (lower-case names), body."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status, headers = response_head(head)
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self) -> bool:
        """The server closed the connection (after what was read)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a whole answer")
        self.buf += chunk

    def call(
        self, method: str, body: Any = None, *, key: str | None = KEY, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """POST /api/``method``: the status and the JSON answer, checked against the spec."""
        data = raw if raw is not None else json.dumps(body or {}).encode()
        self.send(request(method, data, key=key))
        status, _, answer = self.answer()
        obj = json.loads(answer)
        check_answer(method, status, obj)
        return status, obj


def request(
    method: str,
    body: bytes,
    *,
    key: str | None = KEY,
    verb: str = "POST",
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [f"{verb} /api/{method} HTTP/1.1", "Host: 127.0.0.1"]
    if key is not None:
        lines.append(f"X-API-Key: {key}")
    lines += [f"{n}: {v}" for n, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def call(port: int, method: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    """One call on a connection of its own."""
    http = Http(port)
    try:
        return http.call(method, body, **kw)
    finally:
        http.close()


def on_shard(port: int, shard: int, tries: int = 200) -> Http:
    """A keep-alive API connection that a given shard serves (``info`` says which)."""
    for _ in range(tries):
        http = Http(port)
        status, answer = http.call("info")
        assert status == 200, answer
        if answer["result"]["node"] == str(shard):
            return http
        http.close()
    raise AssertionError(f"no API connection on shard {shard}")
