"""The parts of every request the gateway sends out, to an agent or a dev container, checked here.

A request an agent receives carries the agent's own secret, so a client-supplied value that could
change the request's shape (a CR LF that starts a second request, a space that ends the target, a
`/` that changes the route) must never reach the wire raw. The rules, in one place:
- a client-supplied path segment (a mod id, a backup id, an upload id) goes in through `segment`,
  which percent-encodes every byte that is not unreserved;
- a file path goes in only after `check_file_path`: at most 4096 bytes and 255 bytes per component
  (what a Linux filesystem can hold), no NUL;
- the clients refuse, before connecting, a request target holding anything but visible ASCII and a
  header holding a control character (`check_request`): a last line that holds whoever built the
  request.
Every refusal is an `OutboundRefused`, a 400 in the envelope: the client sent something that cannot
become a well-formed request, and nothing was sent anywhere. This module never does I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from .errors import ApiError

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255

_TARGET_UNSAFE = re.compile(r"[^\x21-\x7e]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_UNSAFE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB; obs-text is allowed


class OutboundRefused(ApiError):
    """A value that cannot be put into a request to an agent: answered 400, nothing sent."""

    def __init__(self, code: str, details: Any = None) -> None:
        super().__init__(400, code, details)


def segment(value: str) -> str:
    """One path segment, percent-encoded whole (a `/`, `?`, `%`, space or CR LF stays data)."""
    if value in ("", ".", ".."):
        raise OutboundRefused("INVALID_PATH_SEGMENT", {"segment": value})
    if len(_utf8(value)) > MAX_NAME_BYTES:
        raise OutboundRefused("NAME_TOO_LONG", {"limit": MAX_NAME_BYTES})
    return quote(value, safe="")


def check_file_path(path: str) -> str:
    """A client's file path, refused when no filesystem could hold it; returned unchanged."""
    encoded = _utf8(path)
    if b"\x00" in encoded:
        raise OutboundRefused("INVALID_PATH", {"reason": "NUL byte"})
    if any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise OutboundRefused("NAME_TOO_LONG", {"limit": MAX_NAME_BYTES})
    if len(encoded) > MAX_PATH_BYTES:
        raise OutboundRefused("PATH_TOO_LONG", {"limit": MAX_PATH_BYTES})
    return path


def _utf8(value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no name on disk is that
        raise OutboundRefused("INVALID_PATH", {"reason": "not valid UTF-8"}) from None


def file_path_problem(path: str) -> str | None:
    """For schema validators: why `check_file_path` refuses `path`, or None."""
    try:
        check_file_path(path)
    except OutboundRefused as refused:
        return refused.code
    return None


def check_request(target: str, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse a request whose target or headers would not go out as one well-formed request."""
    if not target or _TARGET_UNSAFE.search(target):
        raise OutboundRefused("INVALID_REQUEST_TARGET", {"reason": "control character, space or non-ASCII"})
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise OutboundRefused("INVALID_HEADER", {"reason": "header name is not a token"})
        if _VALUE_UNSAFE.search(value):
            raise OutboundRefused("INVALID_HEADER", {"header": name.decode("ascii"),
                                                     "reason": "control character in the value"})
