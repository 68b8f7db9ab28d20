"""Auth: sessions, rotation and reuse detection, token kinds, password reset, rate limits."""

from __future__ import annotations

import email
from pathlib import Path

import jwt
import peewee
import pytest

from control.auth.tokens import TokenKind, TokenService
from gateway.errors import ApiError
from storage.db import connect_database
from tests.conftest import TEST_SECRET, Gateway


async def test_register_login_refresh_and_me(gateway: Gateway) -> None:
    session = await gateway.register("Alice@Example.com")
    assert session["user"]["email"] == "alice@example.com"
    login = await gateway.client.post("/api/auth/login", json={"email": "ALICE@example.com", "password": "password123"})
    assert login.status_code == 200
    body = login.json()
    assert set(body) >= {"accessToken", "refreshToken", "expiresIn", "user"}
    me = await gateway.client.get("/api/me", headers=gateway.bearer(body))
    assert me.status_code == 200 and me.json()["email"] == "alice@example.com"
    refreshed = await gateway.client.post("/api/auth/refresh", json={"refreshToken": body["refreshToken"]})
    assert refreshed.status_code == 200
    assert refreshed.json()["refreshToken"] != body["refreshToken"]


async def test_duplicate_email_is_409_case_insensitively(gateway: Gateway) -> None:
    await gateway.register("bob@example.com")
    again = await gateway.client.post("/api/auth/register", json={"email": "BOB@example.com", "password": "password123"})
    assert again.status_code == 409
    assert again.json() == {"error": "EMAIL_TAKEN", "details": {"field": "email"}}


async def test_refresh_reuse_revokes_the_whole_family(gateway: Gateway) -> None:
    first = await gateway.register()
    second = (await gateway.client.post("/api/auth/refresh", json={"refreshToken": first["refreshToken"]})).json()
    reuse = await gateway.client.post("/api/auth/refresh", json={"refreshToken": first["refreshToken"]})
    assert reuse.status_code == 401 and reuse.json()["error"] == "REFRESH_TOKEN_REUSED"
    # The legitimate successor is dead too: the family is revoked.
    after = await gateway.client.post("/api/auth/refresh", json={"refreshToken": second["refreshToken"]})
    assert after.status_code == 401


async def test_logout_revokes_refresh(gateway: Gateway) -> None:
    session = await gateway.register()
    out = await gateway.client.post("/api/auth/logout", json={"refreshToken": session["refreshToken"]})
    assert out.status_code == 204
    again = await gateway.client.post("/api/auth/refresh", json={"refreshToken": session["refreshToken"]})
    assert again.status_code == 401


async def test_token_kinds_never_verify_as_one_another(gateway: Gateway) -> None:
    session = await gateway.register()
    # A refresh token as a bearer access token.
    as_access = await gateway.client.get("/api/me", headers={"authorization": f"Bearer {session['refreshToken']}"})
    assert as_access.status_code == 401
    # An access token where a refresh token is expected.
    as_refresh = await gateway.client.post("/api/auth/refresh", json={"refreshToken": session["accessToken"]})
    assert as_refresh.status_code == 401
    # An IDE (or console) token, correctly signed for its own kind, is not an access token.
    service = TokenService(TEST_SECRET, "zlh-gateway")
    for kind in (TokenKind.IDE, TokenKind.CONSOLE):
        other = service.issue(kind, session["user"]["id"], 60, role="admin")
        response = await gateway.client.get("/api/me", headers={"authorization": f"Bearer {other}"})
        assert response.status_code == 401
    # A token signed with alg none or another key is refused.
    claims = jwt.decode(session["accessToken"], options={"verify_signature": False})
    forged = jwt.encode(claims, "x" * 40, algorithm="HS256")
    none_alg = jwt.encode(claims, None, algorithm="none")
    for token in (forged, none_alg):
        response = await gateway.client.get("/api/me", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 401


def test_each_kind_rejects_the_others_offline() -> None:
    service = TokenService(TEST_SECRET, "zlh-gateway")
    for kind in TokenKind:
        token = service.issue(kind, 7, 60)
        assert service.verify(kind, token)["sub"] == "7"
        for other in TokenKind:
            if other is not kind:
                with pytest.raises(ApiError):
                    service.verify(other, token)


def _mail_token(outbox: Path) -> str:
    messages = sorted(outbox.glob("*.eml"))
    assert messages, "no reset mail delivered"
    body = email.message_from_bytes(messages[-1].read_bytes()).get_payload()
    return body.split("\n\n")[1].strip()


async def test_password_reset_is_single_use_and_revokes_sessions(gateway: Gateway) -> None:
    session = await gateway.register("carol@example.com")
    unknown = await gateway.client.post("/api/auth/password-reset/request", json={"email": "nobody@example.com"})
    known = await gateway.client.post("/api/auth/password-reset/request", json={"email": "carol@example.com"})
    assert unknown.status_code == known.status_code == 202 and unknown.json() == known.json()
    token = _mail_token(gateway.settings.data_dir / "outbox")
    done = await gateway.client.post("/api/auth/password-reset/confirm",
                                     json={"token": token, "password": "new-password-1"})
    assert done.status_code == 200
    again = await gateway.client.post("/api/auth/password-reset/confirm",
                                      json={"token": token, "password": "new-password-2"})
    assert again.status_code == 400 and again.json()["error"] == "INVALID_RESET_TOKEN"
    old = await gateway.client.post("/api/auth/refresh", json={"refreshToken": session["refreshToken"]})
    assert old.status_code == 401
    login = await gateway.client.post("/api/auth/login", json={"email": "carol@example.com", "password": "new-password-1"})
    assert login.status_code == 200


async def test_reset_token_expires(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from storage import clock

    await gateway.register("dave@example.com")
    await gateway.client.post("/api/auth/password-reset/request", json={"email": "dave@example.com"})
    token = _mail_token(gateway.settings.data_dir / "outbox")
    monkeypatch.setattr(clock, "offset", timedelta(minutes=31))
    late = await gateway.client.post("/api/auth/password-reset/confirm", json={"token": token, "password": "xxxxxxxxx"})
    assert late.status_code == 400


async def test_database_holds_no_plaintext_tokens(gateway: Gateway) -> None:
    session = await gateway.register("erin@example.com")
    await gateway.client.post("/api/auth/password-reset/request", json={"email": "erin@example.com"})
    reset = _mail_token(gateway.settings.data_dir / "outbox")
    db = connect_database(gateway.settings.database_url)
    dump = []
    with db.connection_context():
        for table in ("refresh_token", "password_reset", "refresh_family", "user", "audit_log"):
            quoted = f'"{table}"' if isinstance(db, peewee.PostgresqlDatabase) else table
            dump.extend(str(row) for row in db.execute_sql(f"SELECT * FROM {quoted}").fetchall())
    text = "\n".join(dump)
    for secret in (session["refreshToken"], session["accessToken"], reset, "password123"):
        assert secret not in text
        assert secret.split(".")[-1] not in text


async def test_login_is_rate_limited_per_account(gateway: Gateway) -> None:
    await gateway.register("frank@example.com")
    statuses = []
    for _ in range(gateway.settings.login_limit_per_account + 2):
        response = await gateway.client.post("/api/auth/login", json={"email": "frank@example.com", "password": "wrong-pass"})
        statuses.append(response.status_code)
    assert statuses[0] == 401
    assert statuses[-1] == 429
    limited = await gateway.client.post("/api/auth/login", json={"email": "frank@example.com", "password": "password123"})
    assert limited.status_code == 429 and "retry-after" in limited.headers
    assert limited.json()["error"] == "RATE_LIMITED"
