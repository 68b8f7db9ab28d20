"""Behind a trusted reverse proxy (ZLH_TRUSTED_PROXIES) that terminated HTTPS, the IDE cookie is
Secure: the proxy's `X-Forwarded-Proto: https` is believed because the TCP peer is trusted (here the
test client on loopback plays the proxy). IDE_COOKIE_SECURE=0 still wins."""

from __future__ import annotations

import pytest

from control.config import Settings
from tests.ide.conftest import DevIde


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.trusted_proxies = ["127.0.0.0/8"]
    return settings


def _attributes(cookie: str) -> list[str]:
    return [part.strip().lower() for part in cookie.split(";")]


async def test_https_seen_by_a_trusted_proxy_makes_the_ide_cookie_secure(ide: DevIde) -> None:
    response = await ide.get(f"/__ide/{ide.id}/?token={await ide.token()}", {"x-forwarded-proto": "https"})
    assert response.status_code == 302
    assert "secure" in _attributes(response.headers["set-cookie"])
    plain = await ide.get(f"/__ide/{ide.id}/?token={await ide.token()}", {"x-forwarded-proto": "http"})
    assert "secure" not in _attributes(plain.headers["set-cookie"])
