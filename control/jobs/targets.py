"""Which places the job backend may reach on a client's behalf: a project's `repository` and a vault
connection's `url`. The one rule, checked when a project or connection is stored (a 400 naming the
field) and again right before every call (an address may have changed since):

- remote git URLs only: `https://host[:port]/…`, `ssh://[user@]host[:port]/…` and scp-style
  `[user@]host:path`. Local paths, `file://`, `ext::` and any other `transport::` form, http(s) URLs
  with credentials in them (they belong in the vault), and anything with whitespace, control
  characters or an authority that is not plainly `[user@]host[:port]` (so no parser reads another
  host out of it than this one did) are refused;
- the host must resolve (under a timeout), and every address it resolves to must be public: loopback,
  link-local, private, unspecified, multicast and reserved addresses are refused;
- the operator may allow more with `ZLH_JOBS_ALLOWED_SOURCES`: CIDRs (a private forge; there plain
  `http://` is accepted too) and/or `local` (paths and `file://`).

A refusal never says whether a local path exists: the disk is not looked at. The checked addresses are
handed on so the git call connects to exactly them (sources.py pins them for curl), which closes the
DNS-rebinding window for http(s); ssh resolves again itself.

`origin` is what a vault secret is bound to: (scheme, host, port) of the connection's own URL."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

LOCAL = "local"
DEFAULT_PORTS = {"https": 443, "http": 80, "ssh": 22}
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*\.?$")
_SCP = re.compile(r"^(?:(?P<user>[A-Za-z0-9._~-]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^/@:\[\]]+):(?P<path>.*)$")
_TRANSPORT = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
# The authority of a URL, strictly: so Python, git and curl cannot read a different host out of it.
_AUTHORITY = re.compile(r"^(?:(?P<user>[A-Za-z0-9._~-]+)@)?(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SourceRefused(Exception):
    """The place is not one the job backend may reach; the message is safe to show the client."""


@dataclass(frozen=True)
class AllowedSources:
    networks: tuple[Network, ...] = ()
    local: bool = False

    @classmethod
    def parse(cls, entries: list[str]) -> AllowedSources:
        networks = tuple(ipaddress.ip_network(e, strict=False) for e in entries if e != LOCAL)
        return cls(networks, LOCAL in entries)

    def allows(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int


@dataclass(frozen=True)
class Target:
    """A checked place: `origin` is None for a local path; `addresses` are what the host resolved to."""

    url: str
    origin: Origin | None
    addresses: tuple[str, ...] = ()


def _normal_host(host: str) -> str:
    return host.strip("[]").lower().rstrip(".")


def parse_origin(url: str) -> Origin | None:
    """The origin of a remote git or http(s) URL; None for anything local or malformed. Pure."""
    if _TRANSPORT.match(url):
        return None
    if "://" in url:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            return None
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            return None
        return Origin(scheme, _normal_host(parts.hostname), port)
    scp = _SCP.match(url)
    if scp is None or url.startswith(("/", ".", "~")):
        return None
    return Origin("ssh", _normal_host(scp.group("host")), DEFAULT_PORTS["ssh"])


def _refuse_form(url: str, allowed: AllowedSources, *, http_only: bool) -> Origin | None:
    """The origin of an acceptable URL, None for an allowed local path; SourceRefused otherwise."""
    if any(c.isspace() or not c.isprintable() or c == "\\" for c in url):
        raise SourceRefused("the URL must not contain whitespace, control characters or backslashes")
    if _TRANSPORT.match(url):
        raise SourceRefused("transport:: URLs (ext::, fd::, …) are not accepted")
    if "://" in url:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "file":
            if allowed.local and not http_only:
                return None
            raise SourceRefused("local repositories are not accepted; give a remote https:// or ssh:// URL")
        wanted = ("http", "https") if http_only else ("https", "ssh", "http")
        if scheme not in wanted:
            raise SourceRefused(f"scheme {scheme}:// is not accepted; use " + (
                "http(s)://" if http_only else "https://, ssh:// or user@host:path"))
        authority = _AUTHORITY.match(parts.netloc)
        if authority is None:
            raise SourceRefused("the URL has no valid host")
        if authority.group("user") is not None and scheme != "ssh" or parts.password is not None:
            raise SourceRefused("an http(s) URL must not carry credentials; put them in the vault")
        origin = parse_origin(url)
        if origin is None or not _valid_host(origin.host):
            raise SourceRefused("the URL has no valid host")
        return origin
    origin = None if http_only else parse_origin(url)
    if origin is None:
        if allowed.local and not http_only:
            return None
        raise SourceRefused("local repositories are not accepted; give a remote https:// or ssh:// URL"
                            if not http_only else "an http(s):// URL is required")
    if not _valid_host(origin.host):
        raise SourceRefused("the URL has no valid host")
    return origin


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST.match(host))


def _public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (address.is_loopback or address.is_link_local or address.is_private or address.is_unspecified
                or address.is_multicast or address.is_reserved or not address.is_global)


async def resolve_checked(origin: Origin, allowed: AllowedSources, timeout: float) -> tuple[str, ...]:
    """Every address `origin.host` resolves to, when all of them may be reached; SourceRefused otherwise."""
    try:
        with trio.fail_after(timeout):
            infos = await trio.socket.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
    except trio.TooSlowError as exc:
        raise SourceRefused(f"host {origin.host} did not resolve within {timeout:g}s") from exc
    except (socket.gaierror, UnicodeError) as exc:
        raise SourceRefused(f"host {origin.host} does not resolve") from exc
    addresses = sorted({ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}, key=str)
    if not addresses:
        raise SourceRefused(f"host {origin.host} does not resolve")
    for address in addresses:
        if not (_public(address) or allowed.allows(address)):
            raise SourceRefused(f"host {origin.host} resolves to a non-public address, which is not accepted")
    if origin.scheme == "http" and not all(allowed.allows(a) for a in addresses):
        raise SourceRefused("plain http:// is accepted only for operator-allowed networks; use https://")
    return tuple(str(a) for a in addresses)


async def check_target(url: str, allowed: AllowedSources, timeout: float, *, http_only: bool = False) -> Target:
    """The one check for a repository (`http_only` False) or an http vault connection's URL."""
    origin = _refuse_form(url, allowed, http_only=http_only)
    if origin is None:
        return Target(url, None)
    return Target(url, origin, await resolve_checked(origin, allowed, timeout))
