"""The client address behind trusted proxies (ZLH_TRUSTED_PROXIES): believed only when the TCP peer is
a trusted proxy, walked from the right; used by the login rate limit and by both access logs (control
routes and the data plane). Live on a real socket, behind a "proxy" (the test client on loopback)
and directly."""

from __future__ import annotations

import io
import json
import logging

import pytest

from control.config import ConfigError, Settings
from gateway.forwarded import forwarded_https, real_client, trusted_networks
from gateway.logs import configure_logging
from tests.conftest import TEST_SECRET, Gateway

PROXIES = trusted_networks(("10.0.0.0/8", "2001:db8::/32"))


@pytest.mark.parametrize(("peer", "headers", "client"), [
    ("203.0.113.7", [("x-forwarded-for", "198.51.100.1")], "203.0.113.7"),  # peer not trusted: header ignored
    ("10.0.0.2", [("x-forwarded-for", "198.51.100.1")], "198.51.100.1"),
    ("10.0.0.2", [("x-forwarded-for", "6.6.6.6, 198.51.100.1, 10.0.0.9")], "198.51.100.1"),  # skip trusted hops
    ("10.0.0.2", [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "198.51.100.1")], "198.51.100.1"),
    ("10.0.0.2", [("x-forwarded-for", "garbage, 10.0.0.3")], "10.0.0.3"),  # a bad hop ends the walk
    ("10.0.0.2", [("x-forwarded-for", "198.51.100.1:4711")], "198.51.100.1"),
    ("10.0.0.2", [], "10.0.0.2"),
    ("10.0.0.2", [("forwarded", 'for=6.6.6.6, for="[2001:db8:cafe::17]:4711";proto=https, for=198.51.100.2')],
     "198.51.100.2"),
    ("10.0.0.2", [("forwarded", 'for="[2001:db8:cafe::17]:4711"')], "2001:db8:cafe::17"),  # all trusted: leftmost
    ("10.0.0.2", [("forwarded", "for=unknown")], "10.0.0.2"),
    ("10.0.0.2", [("forwarded", "for=6.6.6.6"), ("x-forwarded-for", "198.51.100.1")], "198.51.100.1"),
    ("::ffff:10.0.0.2", [("x-forwarded-for", "198.51.100.1")], "198.51.100.1"),  # v4-mapped peer
    ("2001:db8::1", [("x-forwarded-for", "2001:db9::5")], "2001:db9::5"),
])
def test_real_client(peer: str, headers: list[tuple[str, str]], client: str) -> None:
    assert real_client(peer, headers, PROXIES) == client


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert real_client("10.0.0.2", [("x-forwarded-for", "198.51.100.1")], ()) == "10.0.0.2"


@pytest.mark.parametrize(("peer", "headers", "https"), [
    ("10.0.0.2:5000", [("X-Forwarded-Proto", "https")], True),
    ("10.0.0.2", [("x-forwarded-proto", "https, http")], True),  # the first proxy's word
    ("10.0.0.2:5000", [("X-Forwarded-Proto", "http")], False),
    ("10.0.0.2:5000", [("Forwarded", 'for=1.2.3.4;proto="https"')], True),
    ("10.0.0.2:5000", [], False),
    ("203.0.113.9:5000", [("X-Forwarded-Proto", "https")], False),  # a client's own header is never believed
    ("not-an-address", [("X-Forwarded-Proto", "https")], False),
])
def test_forwarded_https_only_from_a_trusted_proxy(peer: str, headers: list[tuple[str, str]], https: bool) -> None:
    assert forwarded_https(peer, headers, trusted_networks(("10.0.0.0/8",))) is https
    assert forwarded_https(peer, headers, ()) is False


def test_trusted_proxies_setting() -> None:
    settings = Settings.from_env({"ZLH_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1", "JWT_SECRET": TEST_SECRET})
    assert settings.trusted_proxies == ["10.0.0.0/8", "192.168.1.1"]
    with pytest.raises(ConfigError, match="ZLH_TRUSTED_PROXIES"):
        Settings.from_env({"ZLH_TRUSTED_PROXIES": "10.0.0.0/33", "JWT_SECRET": TEST_SECRET})


@pytest.fixture(params=[True, False], ids=["behind-proxy", "direct"])
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    settings.trusted_proxies = ["127.0.0.0/8"] if request.param else []
    settings.login_limit_per_address = 3
    return settings


async def test_rate_limits_and_logs_key_on_the_real_client(gateway: Gateway) -> None:
    behind_proxy = bool(gateway.settings.trusted_proxies)
    stream = io.StringIO()
    configure_logging("INFO", stream)
    try:
        async def login(forwarded_for: str) -> int:
            response = await gateway.client.post("/api/auth/login", headers={"x-forwarded-for": forwarded_for},
                                                 json={"email": "nobody@example.com", "password": "wrong-password"})
            return response.status_code

        assert [await login("6.6.6.6, 198.51.100.1") for _ in range(4)] == [401, 401, 401, 429]
        # Another client behind the same proxy has its own bucket; directly, the header is not believed.
        assert await login("198.51.100.2") == (401 if behind_proxy else 429)
        await gateway.client.get("/api/servers/1/files/download?path=a", headers={"x-forwarded-for": "198.51.100.3"})
    finally:
        logging.getLogger().handlers.clear()
    entries = [json.loads(line) for line in stream.getvalue().splitlines() if '"zlh.access"' in line]
    control = next(e for e in entries if e["path"] == "/api/auth/login")
    data_plane = next(e for e in entries if e["route"] == "files.download")
    assert control["client"] == ("198.51.100.1" if behind_proxy else "127.0.0.1")
    assert data_plane["client"] == ("198.51.100.3" if behind_proxy else "127.0.0.1")
    for entry in (control, data_plane):
        assert entry["peer"].startswith("127.0.0.1:")
