"""Bytes <-> messages: the JSON wire format of PROTOCOL.md, and server frames.

Decoding validates every field and raises :class:`ProtocolError` with the
protocol's error code; it never raises anything else. Encoding produces
UTF-8 JSON bytes (orjson) and, for the fan-out path, ready WebSocket frames.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

import orjson

from shardchat.core.errors import ErrorCode, ProtocolError
from shardchat.core.messages import (
    Ack,
    ClientMessage,
    HistoryQuery,
    Join,
    Leave,
    Ping,
    PresenceQuery,
    Publish,
    RoomId,
)

__all__ = [
    "MAX_SEQ",
    "NAME_RE",
    "compact",
    "decode",
    "encode",
    "error_payload",
    "is_valid_name",
    "message_json",
    "pong_payload",
    "text_frame",
]

NAME_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
MAX_ID = 64
MAX_SEQ = (1 << 63) - 1

_fullmatch = NAME_RE.fullmatch
_EMPTY = b""


def is_valid_name(name: object) -> bool:
    """PROTOCOL.md, Transport: 1-64 characters of ``[A-Za-z0-9_.:-]``."""
    return isinstance(name, str) and _fullmatch(name) is not None


def _room(obj: dict[str, object], rid: str | None) -> RoomId:
    room = obj.get("room")
    if room is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "missing field: room", rid)
    if not isinstance(room, str) or _fullmatch(room) is None:  # is_valid_name, inline
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "room must be 1-64 characters of [A-Za-z0-9_.:-]", rid
        )
    return RoomId(room)


def _seq(obj: dict[str, object], key: str, rid: str | None, *, required: bool) -> int | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"missing field: {key}", rid)
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{key} must be a non-negative integer", rid)
    return value


def _decode_join(obj: dict[str, object], rid: str | None, max_content: int) -> ClientMessage:
    epoch = obj.get("epoch")
    if epoch is not None and not isinstance(epoch, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "epoch must be a string", rid)
    since = _seq(obj, "since", rid, required=False)
    return Join(room=_room(obj, rid), since=since, epoch=epoch, id=rid)


def _decode_leave(obj: dict[str, object], rid: str | None, max_content: int) -> ClientMessage:
    return Leave(room=_room(obj, rid), id=rid)


def _decode_message(obj: dict[str, object], rid: str | None, max_content: int) -> ClientMessage:
    room = _room(obj, rid)
    content = obj.get("content")
    if content is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "missing field: content", rid)
    if not isinstance(content, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "content must be a string", rid)
    # A str of n code points is at most 4n UTF-8 bytes: encode only when it might be over.
    if len(content) * 4 > max_content and len(content.encode()) > max_content:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"content is over {max_content} bytes", rid)
    key = obj.get("key")  # most publishes have none (_idempotency_key's check, inline)
    if key is not None:
        key = _idempotency_key(obj, rid)
    return Publish(room=room, content=content, id=rid, key=key)


def _idempotency_key(obj: dict[str, object], rid: str | None) -> str | None:
    """A ``message``'s optional ``key`` (PROTOCOL.md, Extensions): 1-64 characters,
    like an ``id``; unlike a bad ``id`` (which is only not echoed), a bad ``key`` is
    refused, since taking it for no key would deliver a retry twice."""
    key = obj.get("key")
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_ID:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "key must be a string of 1-64 characters", rid)
    return key


def _decode_ack(obj: dict[str, object], rid: str | None, max_content: int) -> ClientMessage:
    seq = _seq(obj, "seq", rid, required=True)
    assert seq is not None
    return Ack(room=_room(obj, rid), seq=seq, id=rid)


def _decode_ping(obj: dict[str, object], rid: str | None, max_content: int) -> ClientMessage:
    echo = {k: v for k, v in obj.items() if k != "type"}
    return Ping(echo=echo, id=rid)


def _decode_presence(obj: dict[str, object], rid: str | None, max_content: int) -> ClientMessage:
    return PresenceQuery(room=_room(obj, rid), id=rid)


def _decode_history(obj: dict[str, object], rid: str | None, max_content: int) -> ClientMessage:
    room = _room(obj, rid)
    since = _seq(obj, "since", rid, required=False)
    limit = _seq(obj, "limit", rid, required=False)
    before = _seq(obj, "before", rid, required=False)
    return HistoryQuery(room=room, since=since, limit=limit, before=before, id=rid)


_DECODERS: dict[str, Callable[[dict[str, object], str | None, int], ClientMessage]] = {
    "join": _decode_join,
    "leave": _decode_leave,
    "message": _decode_message,
    "ack": _decode_ack,
    "ping": _decode_ping,
    "presence": _decode_presence,
    "history": _decode_history,
}


def decode(data: bytes | bytearray | memoryview, max_content: int) -> ClientMessage:
    """Decode one client text frame.

    Raises:
        ProtocolError: ``bad_json``, ``bad_request``, ``unknown_type`` or
            ``too_large``, with the request's ``id`` when it had a usable one.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a frame must be a JSON object")
    raw = obj.get("id")  # _request_id, inline: once per request
    rid = raw if raw is None or (isinstance(raw, str) and 1 <= len(raw) <= MAX_ID) else None
    kind = obj.get("type")
    if kind is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "missing field: type", rid)
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "type must be a string", rid)
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown type: {kind[:64]!r}", rid)
    # A ping echoes whatever it carries; every other request's id must be usable.
    if rid is None and raw is not None and kind != "ping":
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"id must be a string of 1-{MAX_ID} characters")
    return decoder(obj, rid, max_content)


def encode(obj: dict[str, object]) -> bytes:
    """A server frame's JSON (UTF-8 bytes)."""
    return orjson.dumps(obj)


def message_json(
    room: str, sender: str, content: str, seq: int, timestamp: int, msg_id: str
) -> bytes:
    """The JSON of a sequenced ``message`` frame, exactly as every member receives it.

    Held in rooms' history for as long as the room keeps it, so it is returned
    right-sized: orjson's ``bytes`` sit in an allocation of at least 4 KB that it
    does not shrink (``sys.getsizeof`` shows 219 B for a 4,097 B block), which
    made a held 100-character message cost 4.3 KB. The copy costs about 0.1 us
    (perf/scenarios/history_memory.py measures the memory).
    """
    json = orjson.dumps(
        {
            "type": "message",
            "room": room,
            "sender": sender,
            "content": content,
            "seq": seq,
            "timestamp": timestamp,
            "id": msg_id,
        }
    )
    return _EMPTY.join((json, _EMPTY))  # compact(), inline: once per message


def compact(data: bytes) -> bytes:
    """A right-sized copy of orjson's output, for bytes that are kept long (history,
    queues): ``join`` allocates exactly the length; ``bytes(memoryview(...))``
    does too but costs several times as much here."""
    return _EMPTY.join((data, _EMPTY))


def pong_payload(echo: dict[str, object], request_id: str | None) -> bytes:
    """The JSON of the ``pong`` that echoes a ``ping``.

    Raises:
        ProtocolError: ``bad_request`` when the echo cannot be encoded (orjson
            decodes 1024 levels of nesting but encodes only about 255).
    """
    try:
        return orjson.dumps({"type": "pong", **echo})
    except orjson.JSONEncodeError:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "ping nested too deeply to echo", request_id
        ) from None


def error_payload(
    code: ErrorCode, reason: str, request_id: str | None = None, retry_after: float | None = None
) -> bytes:
    """The JSON of an ``error`` frame."""
    obj: dict[str, object] = {"type": "error", "code": code, "reason": reason}
    if request_id is not None:
        obj["id"] = request_id
    if retry_after is not None:
        obj["retry_after"] = retry_after
    return orjson.dumps(obj)


_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_FIN_TEXT = 0x81
_HEADERS_7 = tuple(
    bytes((_FIN_TEXT, n)) for n in range(126)
)  # each short frame's header, made once


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, unfragmented WebSocket text frame (RFC 6455 5.2).

    Server frames are never masked (RFC 6455 5.1), so the frame is a 2, 4 or
    10 byte header before the payload: built once, written to many members.
    """
    n = len(payload)
    if n < 126:
        return _HEADERS_7[n] + payload
    if n < 65536:
        return _HEADER_16.pack(_FIN_TEXT, 126, n) + payload
    return _HEADER_64.pack(_FIN_TEXT, 127, n) + payload
