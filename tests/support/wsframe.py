"""One frame parsed by websockets, the reference the tests hold our frames against."""

from __future__ import annotations

from websockets.frames import Frame
from websockets.streams import StreamReader


def parse_frame(data: bytes, mask: bool = False) -> Frame:
    """The one whole frame in ``data`` (``mask``: a client's, masked)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=mask)
    try:
        next(parser)
    except StopIteration as stop:
        frame: Frame = stop.value
        return frame
    raise AssertionError("incomplete frame")
