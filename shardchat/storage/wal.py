"""A SQLite write-ahead log's valid length: the damaged tail is found and cut.

SQLite itself ignores the frames of a WAL after the first one whose salt or
checksum does not match (https://www.sqlite.org/fileformat.html, The WAL
file format), so a torn or corrupt tail never reaches a reader. It does so
silently, though, and keeps the bytes. :func:`cut_damaged_tail` walks the
frames the same way, truncates the file after the last valid commit frame
and returns how many bytes it cut, so that the start-up can log it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

__all__ = ["cut_damaged_tail", "valid_length"]

_HEADER = 32
_FRAME_HEADER = 24
_MAGIC_LE = 0x377F0682  # checksums of native little-endian words
_MAGIC_BE = 0x377F0683
_MASK = 0xFFFFFFFF


def _checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum over ``data`` (a multiple of 8 bytes), from (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK
        s1 = (s1 + words[i + 1] + s0) & _MASK
    return s0, s1


def valid_length(data: bytes) -> int:
    """The bytes of ``data`` (a whole WAL file) up to its last valid commit frame:
    0 for a WAL whose header is damaged, which SQLite would ignore whole."""
    if len(data) < _HEADER:
        return 0
    magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:_HEADER])
    if magic not in (_MAGIC_LE, _MAGIC_BE) or page_size < 512 or page_size & (page_size - 1):
        return 0
    big_endian = magic == _MAGIC_BE
    s0, s1 = _checksum(data[:24], 0, 0, big_endian)
    if (s0, s1) != (c0, c1):
        return 0
    frame = _FRAME_HEADER + page_size
    valid = _HEADER
    at = _HEADER
    while at + frame <= len(data):
        page, commit_size, f_salt1, f_salt2, f0, f1 = struct.unpack(
            ">6I", data[at : at + _FRAME_HEADER]
        )
        if page == 0 or (f_salt1, f_salt2) != (salt1, salt2):
            break
        s0, s1 = _checksum(data[at : at + 8], s0, s1, big_endian)
        s0, s1 = _checksum(data[at + _FRAME_HEADER : at + frame], s0, s1, big_endian)
        if (s0, s1) != (f0, f1):
            break
        at += frame
        if commit_size:  # a commit frame: everything up to here is a whole transaction
            valid = at
    return valid


def cut_damaged_tail(path: Path) -> int:
    """Truncate the WAL at ``path`` after its last valid commit frame when its tail
    is torn (not a whole number of frames: a write cut short by a crash, or a
    damaged file); the bytes cut (0: nothing torn, or no WAL).

    A WAL of whole frames is left to SQLite, which ignores a frame whose salt
    or checksum does not match, and the frames a checkpoint left behind (an
    older generation it writes over): checking every checksum here would cost
    the start-up a pass over the whole file.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "r+b") as f:
        head = f.read(_HEADER)
        if len(head) == _HEADER:
            page_size = struct.unpack(">I", head[8:12])[0]
            if page_size >= 512 and (size - _HEADER) % (_FRAME_HEADER + page_size) == 0:
                return 0
        f.seek(0)
        keep = valid_length(f.read())
        f.truncate(keep)
        os.fsync(f.fileno())
    return size - keep
