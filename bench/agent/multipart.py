"""A streaming `multipart/form-data` parser: bytes in, part events out, no I/O (sans-I/O).

Feed it the request body as it arrives; it returns `PartStart` (the part's headers), `PartData`
(non-empty pieces of the part's content, split wherever the network split them) and `PartEnd`. It
never buffers a whole part: at most one fed chunk, one delimiter's length and one header block.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

MAX_PART_HEADER_BYTES = 16 << 10


class MultipartError(Exception):
    """The body is not valid multipart for the boundary it declared."""


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]

    @property
    def filename(self) -> str | None:
        """The `filename` parameter of Content-Disposition, None for a plain form field."""
        message = Message()
        message["content-disposition"] = self.headers.get("content-disposition", "")
        filename = message.get_filename()
        return filename if isinstance(filename, str) else None


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a `multipart/form-data` Content-Type, or None if it is not one."""
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        return None
    boundary = message.get_boundary()
    return boundary.encode("latin-1") if boundary else None


class MultipartParser:
    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        # The body's first delimiter has no CRLF before it; pretend it had one.
        self._buffer = bytearray(b"\r\n")
        self._state = "preamble"

    @property
    def finished(self) -> bool:
        """True once the closing delimiter was seen."""
        return self._state == "epilogue"

    def feed(self, data: bytes | bytearray) -> list[Event]:
        if self._state == "epilogue":
            return []
        self._buffer += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list[Event]) -> bool:
        """Advance one state if the buffer allows; False when more bytes are needed."""
        buffer = self._buffer
        if self._state in ("preamble", "body"):
            index = buffer.find(self._delimiter)
            if index < 0:
                keep = len(self._delimiter) - 1
                if self._state == "body" and len(buffer) > keep:
                    events.append(PartData(bytes(buffer[: len(buffer) - keep])))
                if len(buffer) > keep:
                    del buffer[: len(buffer) - keep]
                return False
            if self._state == "body":
                if index:
                    events.append(PartData(bytes(buffer[:index])))
                events.append(PartEnd())
            del buffer[: index + len(self._delimiter)]
            self._state = "delimiter"
            return True
        if self._state == "delimiter":
            if len(buffer) < 2:
                return False
            if buffer.startswith(b"--"):
                self._state = "epilogue"
                buffer.clear()
                return False
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                if len(buffer) > MAX_PART_HEADER_BYTES:
                    raise MultipartError("garbage after a delimiter")
                return False
            if buffer[:line_end].strip(b" \t"):
                raise MultipartError("garbage after a delimiter")
            del buffer[: line_end + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            if buffer.startswith(b"\r\n"):
                del buffer[:2]
                events.append(PartStart({}))
                self._state = "body"
                return True
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_PART_HEADER_BYTES:
                    raise MultipartError("part headers too large")
                return False
            events.append(PartStart(parse_headers(bytes(buffer[:end]))))
            del buffer[: end + 4]
            self._state = "body"
            return True
        return False


def parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            raise MultipartError(f"bad part header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return headers
