"""Single byte-range requests (RFC 9110 `Range: bytes=...`) over a body of known size.

Pure parsing, no I/O. A malformed header or a multi-range request is ignored (the whole body is
served with 200, as the RFC allows); a well-formed range that selects nothing is unsatisfiable (416).
"""

from __future__ import annotations

from dataclasses import dataclass


class RangeNotSatisfiable(Exception):
    """The range is well formed but selects no byte of the body."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range `header` asks for within `size` bytes, or None to serve everything."""
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if first and not first.isdigit() or last and not last.isdigit():
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable()
        return ByteRange(max(size - suffix, 0), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable()
    end = min(int(last), size - 1) if last else size - 1
    return ByteRange(start, end)
