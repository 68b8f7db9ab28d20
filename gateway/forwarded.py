"""Who the client is, behind trusted reverse proxies (ZLH_TRUSTED_PROXIES): rate limits and access
logs key on this address, never on a header a client could write itself.

The rule: the TCP peer is the client unless the peer is a trusted proxy. Only then are the proxy
headers read, `X-Forwarded-For` (what nginx's `$proxy_add_x_forwarded_for` and HAProxy's `option
forwardfor` append) or, when there is none, `Forwarded` (RFC 7239 `for=`). Hops are walked from the
right, skipping trusted proxies; the first untrusted address is the client. Entries left of it were
written by the client and are never believed. A proxy that sets `Forwarded` must drop a client's
`X-Forwarded-For`. Never raises on a malformed header: a hop that does not parse ends the walk at
the last address that did."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_FORWARDED_FOR = re.compile(r'(?:^|;)\s*for\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.IGNORECASE)
_FORWARDED_PROTO = re.compile(r'(?:^|;)\s*proto\s*=\s*("[^"]*"|[^;,\s]*)', re.IGNORECASE)
MAX_HOPS = 32  # a longer chain is not walked further (bounded work per request)


@lru_cache(maxsize=8)
def trusted_networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """Parse CIDRs (a bare address is a /32 or /128). Raises ValueError for one that does not parse."""
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip())


def parse_address(text: str) -> Address | None:
    """An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]:5678`; else None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: Address, trusted: tuple[Network, ...]) -> bool:
    return any(address.version == network.version and address in network for network in trusted)


def _hops(headers: Iterable[tuple[str, str]]) -> list[str]:
    forwarded_for: list[str] = []
    forwarded: list[str] = []
    for name, value in headers:
        name = name.lower()
        if name == "x-forwarded-for":
            forwarded_for += value.split(",")
        elif name == "forwarded":
            forwarded += [match.group(1) for element in value.split(",")
                          for match in [_FORWARDED_FOR.search(element)] if match]
    return forwarded_for or forwarded


def real_client(peer: str | None, headers: Iterable[tuple[str, str]], trusted: tuple[Network, ...]) -> str | None:
    """The client's IP address as text: the peer's, or — when the peer is a trusted proxy — the
    rightmost untrusted hop of the proxy headers. `peer` is an address with or without a port."""
    address = parse_address(peer) if peer else None
    if address is None:
        return peer
    if not trusted or not _is_trusted(address, trusted):
        return str(address)
    for hop in reversed(_hops(headers)[-MAX_HOPS:]):
        parsed = parse_address(hop)
        if parsed is None:
            break
        address = parsed
        if not _is_trusted(address, trusted):
            break
    return str(address)


def forwarded_https(peer: str | None, headers: Iterable[tuple[str, str]], trusted: tuple[Network, ...]) -> bool:
    """Whether a trusted proxy says the client spoke HTTPS to it (`X-Forwarded-Proto: https`, else
    RFC 7239 `Forwarded: proto=https`, the first proxy's word). A client's own header is never
    believed: without a trusted peer this is False."""
    address = parse_address(peer) if peer else None
    if address is None or not trusted or not _is_trusted(address, trusted):
        return False
    forwarded = None
    for name, value in headers:
        name = name.lower()
        if name == "x-forwarded-proto":
            return value.split(",")[0].strip().lower() == "https"
        if name == "forwarded" and forwarded is None:
            match = _FORWARDED_PROTO.search(value.split(",")[0])
            forwarded = match is not None and match.group(1).strip('"').lower() == "https"
    return bool(forwarded)


def header_pairs(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """A data-plane head's headers (bytes) as the text pairs real_client and forwarded_https read."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw
            if name.lower() in (b"x-forwarded-for", b"forwarded", b"x-forwarded-proto")]
