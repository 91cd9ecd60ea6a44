"""Length-prefixed frames over a byte stream: how a process talks to the helper processes it
starts (odo-verify's signature checkers, the backend's ingest processes) over their pipes.

A frame is its length (8 bytes, big-endian) and then that many bytes. A reader bounds the
length it accepts, so that a stream gone wrong cannot make it allocate without limit.
"""

from __future__ import annotations

from typing import IO

HEAD = 8                                   # bytes of a frame's length
#: The largest frame read unless the caller says otherwise.
MAX_FRAME = 64 * 1024 * 1024


class FrameError(EOFError):
    """A frame cut short, or longer than its reader takes."""


def read_frame(stream: IO[bytes], limit: int = MAX_FRAME) -> bytes | None:
    """The next frame's bytes, or None when the stream ends between frames."""
    head = stream.read(HEAD)
    if not head:
        return None
    if len(head) < HEAD:
        raise FrameError("a frame's length cut short")
    size = int.from_bytes(head, "big")
    if size > limit:
        raise FrameError(f"a frame of {size} bytes, longer than the {limit} taken")
    body = stream.read(size)
    if len(body) != size:
        raise FrameError("a frame cut short")
    return body


def write_frame(stream: IO[bytes], body: bytes) -> None:
    stream.write(len(body).to_bytes(HEAD, "big") + body)
    stream.flush()
