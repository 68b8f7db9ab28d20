"""The hosted IDE proxy on real sockets: the real gateway in front of a real reference agent whose
stand-in IDE echoes what reaches it (headers, path, query; websocket frames)."""

from __future__ import annotations

import json
import logging

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from control.auth.tokens import TokenKind, TokenService
from tests.conftest import TEST_SECRET
from tests.control.test_auth import _mail_token
from tests.ide.conftest import DevIde, echoed

pytestmark = pytest.mark.usefixtures("ide")


def _tokens(ide: DevIde) -> TokenService:
    return TokenService(TEST_SECRET, ide.gateway.settings.jwt_issuer)


async def test_ide_token_answers_tunnel_path(ide: DevIde) -> None:
    response = await ide.gateway.client.post(f"/api/dev/{ide.id}/ide-token", headers=ide.gateway.bearer(ide.session))
    body = response.json()
    assert response.status_code == 200, body
    assert body["url"] == f"/__ide/{ide.id}/" and body["hosted"] is False
    assert body["openUrl"] == f"/__ide/{ide.id}/?token={body['token']}"
    assert body["expiresIn"] == ide.gateway.settings.ide_token_ttl


async def test_token_in_query_sets_scoped_cookie_and_redirects_without_token(ide: DevIde) -> None:
    token = await ide.token()
    response = await ide.get(f"/__ide/{ide.id}/some/page?folder=%2Fhome&token={token}&x=1")
    assert response.status_code == 302
    assert response.headers["location"] == f"/__ide/{ide.id}/some/page?folder=%2Fhome&x=1"
    assert response.headers["cache-control"] == "no-store"
    cookie = response.headers["set-cookie"]
    name_value, *attributes = [part.strip() for part in cookie.split(";")]
    assert name_value.startswith(f"zlh_ide_{ide.id}=") and token not in name_value
    assert f"Path=/__ide/{ide.id}/" in attributes
    assert "HttpOnly" in attributes and "SameSite=Lax" in attributes
    assert "Secure" not in attributes  # plain-HTTP public URL, not configured secure
    assert not any(a.lower().startswith("domain=") for a in attributes)

    page = echoed(await ide.get(f"/__ide/{ide.id}/some/page?folder=%2Fhome&x=1", {"cookie": name_value}))
    assert page["path"] == "/some/page" and page["query"] == "folder=%2Fhome&x=1"


async def test_a_clients_own_forwarded_proto_does_not_make_the_cookie_secure(ide: DevIde) -> None:
    """Secure follows X-Forwarded-Proto only from a trusted proxy (ZLH_TRUSTED_PROXIES; none here)."""
    response = await ide.get(f"/__ide/{ide.id}/?token={await ide.token()}", {"x-forwarded-proto": "https"})
    assert response.status_code == 302
    assert "secure" not in [part.strip().lower() for part in response.headers["set-cookie"].split(";")]


async def test_bare_prefix_redirects_to_slash(ide: DevIde) -> None:
    response = await ide.get(f"/__ide/{ide.id}?a=b")
    assert response.status_code == 302
    assert response.headers["location"] == f"/__ide/{ide.id}/?a=b"
    traded = await ide.get(f"/__ide/{ide.id}?token={await ide.token()}")
    assert traded.status_code == 302 and traded.headers["location"] == f"/__ide/{ide.id}/"
    assert "set-cookie" in traded.headers


async def test_gateway_credentials_never_reach_the_container(ide: DevIde) -> None:
    cookie = await ide.path_cookie()
    seen = echoed(await ide.get(f"/__ide/{ide.id}/echo", {
        "cookie": f"theme=dark; {cookie}; zlh_portal=secret-session; vscode-tkn=abc",
        "authorization": f"Bearer {ide.session['accessToken']}",
        "x-forwarded-host": "evil.example", "proxy-authorization": "Basic eA==", "x-custom": "kept"}))
    headers = seen["headers"]
    assert "authorization" not in headers and "proxy-authorization" not in headers
    assert headers["cookie"] == "theme=dark; vscode-tkn=abc"
    assert "zlh_" not in json.dumps(seen) and ide.session["accessToken"] not in json.dumps(seen)
    host = f"127.0.0.1:{ide.port}"
    assert headers["host"] == host and headers["x-forwarded-host"] == host
    assert headers["x-forwarded-proto"] == "http"
    assert f"host={host};proto=http" in headers["forwarded"]
    assert headers["x-custom"] == "kept"


async def test_request_bodies_and_large_responses_stream_through(ide: DevIde) -> None:
    cookie = await ide.path_cookie()
    posted = echoed(await ide.get(f"/__ide/{ide.id}/upload", {"cookie": cookie}, method="POST",
                                  content=b"x" * 300_000))
    assert posted["method"] == "POST" and posted["bodyBytes"] == 300_000
    size = 8 * 1024 * 1024
    download = await ide.get(f"/__ide/{ide.id}/__bench/bytes?n={size}", {"cookie": cookie})
    assert download.status_code == 200 and len(download.content) == size


@pytest.mark.parametrize("case", ["garbage", "expired", "other-instance", "other-user", "access-token",
                                  "link-as-cookie", "missing"])
async def test_bad_credentials_never_reach_the_ide(ide: DevIde, case: str) -> None:
    tokens = _tokens(ide)
    status, query, cookie = 401, "", ""
    if case == "garbage":
        query = "token=not-a-jwt"
    elif case == "expired":
        query = "token=" + tokens.issue(TokenKind.IDE, ide.session["user"]["id"], -5, iid=ide.id, use="link")
    elif case == "other-instance":
        status, query = 403, "token=" + tokens.issue(TokenKind.IDE, ide.session["user"]["id"], 60,
                                                       iid=ide.id + 1000, use="link")
    elif case == "other-user":
        intruder = await ide.gateway.register("intruder@example.com")  # not yours looks like not there
        status, query = 404, "token=" + tokens.issue(TokenKind.IDE, intruder["user"]["id"], 60, iid=ide.id,
                                                       use="link")
    elif case == "access-token":
        query = "token=" + ide.session["accessToken"]
    elif case == "link-as-cookie":
        cookie = f"zlh_ide_{ide.id}={await ide.token()}"
    response = await ide.get(f"/__ide/{ide.id}/?{query}", {"cookie": cookie} if cookie else {})
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "details"}
    assert "set-cookie" not in response.headers


async def test_other_users_own_token_does_not_open_this_ide(ide: DevIde) -> None:
    intruder = await ide.gateway.register("intruder@example.com")
    own = await ide.gateway.client.post(f"/api/dev/{ide.id}/ide-token", headers=ide.gateway.bearer(intruder))
    assert own.status_code == 404  # the one ownership check: not theirs looks like not there
    other = await ide.gateway.provision(intruder, "dev", "theirs")
    their_token = await ide.token(intruder, other["id"])
    response = await ide.get(f"/__ide/{ide.id}/?token={their_token}")
    assert response.status_code == 403 and response.json()["error"] == "TOKEN_NOT_FOR_THIS_INSTANCE"


async def test_host_routing_trades_token_for_host_only_cookie(ide: DevIde) -> None:
    token = await ide.token()
    response = await ide.get(f"/files/a.txt?token={token}", {"host": ide.host})
    assert response.status_code == 302 and response.headers["location"] == "/files/a.txt"
    attributes = [part.strip() for part in response.headers["set-cookie"].split(";")]
    assert attributes[0].startswith(f"zlh_ide_{ide.id}=") and "Path=/" in attributes
    assert not any(a.lower().startswith("domain=") for a in attributes)  # host-only
    seen = echoed(await ide.get("/files/a.txt", {"host": ide.host, "cookie": attributes[0]}))
    assert seen["path"] == "/files/a.txt"
    assert seen["headers"]["x-forwarded-host"] == ide.host and "cookie" not in seen["headers"]
    # The same host name serves the IDE on every path, API-looking ones included.
    api_path = echoed(await ide.get("/api/me", {"host": ide.host, "cookie": attributes[0]}))
    assert api_path["path"] == "/api/me"


async def test_cookie_of_one_dev_host_is_refused_on_another(ide: DevIde) -> None:
    neighbour = await ide.gateway.register("neighbour@example.com")  # the free plan has one dev container
    other = await ide.gateway.provision(neighbour, "dev", "second")
    await ide.gateway.client.post(f"/api/dev/{other['id']}/codeserver/start", headers=ide.gateway.bearer(neighbour))
    name_value = await ide.host_cookie()
    value = name_value.split("=", 1)[1]
    other_host = f"dev-{other['id']}.{ide.gateway.settings.ide_domain}:{ide.port}"
    # Under its own name the other host ignores it; renamed, the session still names instance A.
    as_sent = await ide.get("/", {"host": other_host, "cookie": name_value})
    assert as_sent.status_code == 401
    renamed = await ide.get("/", {"host": other_host, "cookie": f"zlh_ide_{other['id']}={value}"})
    assert renamed.status_code == 403 and renamed.json()["error"] == "TOKEN_NOT_FOR_THIS_INSTANCE"
    # The same holds by path, and the cookie still works where it belongs.
    by_path = await ide.get(f"/__ide/{other['id']}/", {"cookie": f"zlh_ide_{other['id']}={value}"})
    assert by_path.status_code == 403
    assert (await ide.get("/", {"host": ide.host, "cookie": name_value})).status_code == 200


async def test_websocket_by_path_relays_frames_and_subprotocol(ide: DevIde) -> None:
    cookie = await ide.path_cookie()
    origin = f"http://127.0.0.1:{ide.port}"
    headers = [(b"origin", origin.encode()), (b"cookie", f"a=1; {cookie}".encode()),
               (b"authorization", b"Bearer gateway-secret")]
    async with ide.websocket(f"/__ide/{ide.id}/stable-abc?reconnectionToken=r1", headers,
                             subprotocols=["vscode.v1", "other"]) as ws:
        assert ws.subprotocol == "vscode.v1"
        hello = json.loads(await ws.get_message())
        assert hello["path"] == "/stable-abc" and hello["query"] == "reconnectionToken=r1"
        seen = hello["headers"]
        assert seen["cookie"] == "a=1" and "authorization" not in seen
        assert seen["origin"] == origin and seen["x-forwarded-host"] == f"127.0.0.1:{ide.port}"
        assert seen["sec-websocket-protocol"] == "vscode.v1, other"
        for message in ("text frame", b"\x00\x01binary" * 1000):
            await ws.send_message(message)
            assert await ws.get_message() == message


async def test_websocket_by_host_relays_frames(ide: DevIde) -> None:
    cookie = await ide.host_cookie()
    headers = [(b"origin", f"http://{ide.host}".encode()), (b"cookie", cookie.encode())]
    async with ide.websocket("/?reconnection=false", headers, host=ide.host) as ws:
        hello = json.loads(await ws.get_message())
        assert hello["path"] == "/" and hello["headers"]["x-forwarded-host"] == ide.host
        await ws.send_message("ping")
        assert await ws.get_message() == "ping"


async def test_websocket_refused_without_cookie_or_with_foreign_origin(ide: DevIde) -> None:
    cookie = await ide.path_cookie()
    with pytest.raises(ConnectionRejected) as missing:
        async with ide.websocket(f"/__ide/{ide.id}/", [(b"origin", f"http://127.0.0.1:{ide.port}".encode())]):
            pass
    assert missing.value.status_code == 401
    with pytest.raises(ConnectionRejected) as foreign:
        async with ide.websocket(f"/__ide/{ide.id}/", [(b"origin", b"http://evil.example"),
                                                        (b"cookie", cookie.encode())]):
            pass
    assert foreign.value.status_code == 403


async def test_activity_counts_open_websockets_and_last_request(ide: DevIde) -> None:
    path = f"/api/dev/{ide.id}/ide/activity"
    bearer = ide.gateway.bearer(ide.session)
    before = (await ide.gateway.client.get(path, headers=bearer)).json()
    assert before == {"openWebsockets": 0, "lastRequestAt": None}
    cookie = await ide.path_cookie()
    headers = [(b"origin", f"http://127.0.0.1:{ide.port}".encode()), (b"cookie", cookie.encode())]
    async with ide.websocket(f"/__ide/{ide.id}/", headers) as ws:
        await ws.get_message()
        during = await ide.gateway.wait_for(lambda b: b["openWebsockets"] == 1, path, ide.session, timeout=10)
        assert during["lastRequestAt"] is not None
    after = await ide.gateway.wait_for(lambda b: b["openWebsockets"] == 0, path, ide.session, timeout=10)
    assert after["lastRequestAt"] >= during["lastRequestAt"]


async def test_ending_a_login_ends_its_ide_sessions_and_cuts_their_websockets(ide: DevIde) -> None:
    """Logout ends the IDE sessions of that login only; a password reset ends every one of the user."""
    gateway = ide.gateway
    other = (await gateway.client.post("/api/auth/login", json={"email": "dev@example.com",
                                                                "password": "password123"})).json()
    logged_out, kept = await ide.path_cookie(), await ide.path_cookie(other)
    origin = (b"origin", f"http://127.0.0.1:{ide.port}".encode())
    async with ide.websocket(f"/__ide/{ide.id}/", [origin, (b"cookie", logged_out.encode())]) as cut, \
            ide.websocket(f"/__ide/{ide.id}/", [origin, (b"cookie", kept.encode())]) as survivor:
        await cut.get_message()
        await survivor.get_message()
        logout = await gateway.client.post("/api/auth/logout", json={"refreshToken": ide.session["refreshToken"]})
        assert logout.status_code == 204
        with trio.fail_after(5), pytest.raises(ConnectionClosed):
            await cut.get_message()
        await survivor.send_message("still here")
        assert await survivor.get_message() == "still here"
        refused = await ide.get(f"/__ide/{ide.id}/", {"cookie": logged_out})
        assert refused.status_code == 401 and refused.json()["error"] == "SESSION_REVOKED"
        echoed(await ide.get(f"/__ide/{ide.id}/", {"cookie": kept}))

        await gateway.client.post("/api/auth/password-reset/request", json={"email": "dev@example.com"})
        reset = await gateway.client.post("/api/auth/password-reset/confirm", json={
            "token": _mail_token(gateway.settings.data_dir / "outbox"), "password": "another-password"})
        assert reset.status_code == 200
        with trio.fail_after(5), pytest.raises(ConnectionClosed):
            await survivor.get_message()
    assert (await ide.get(f"/__ide/{ide.id}/", {"cookie": kept})).status_code == 401


async def test_stopped_code_server_answers_502_and_restart_brings_it_back(ide: DevIde) -> None:
    cookie = await ide.path_cookie()
    bearer = ide.gateway.bearer(ide.session)
    stopped = await ide.gateway.client.post(f"/api/dev/{ide.id}/codeserver/stop", headers=bearer)
    assert stopped.status_code == 200 and stopped.json()["running"] is False
    down = await ide.get(f"/__ide/{ide.id}/", {"cookie": cookie})
    assert down.status_code == 502 and down.json()["error"] == "IDE_UNAVAILABLE"
    restarted = await ide.gateway.client.post(f"/api/dev/{ide.id}/codeserver/restart", headers=bearer)
    assert restarted.status_code == 200 and restarted.json()["running"] is True
    echoed(await ide.get(f"/__ide/{ide.id}/", {"cookie": cookie}))


async def test_game_servers_have_no_ide(ide: DevIde) -> None:
    game = await ide.gateway.provision(ide.session, "game", "mc")
    bearer = ide.gateway.bearer(ide.session)
    for path in ("ide-token", "codeserver/start"):
        response = await ide.gateway.client.post(f"/api/dev/{game['id']}/{path}", headers=bearer)
        assert response.status_code == 409 and response.json()["error"] == "NOT_A_DEV_CONTAINER"


async def test_logs_never_contain_ide_tokens_or_cookies(ide: DevIde, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = await ide.token()
    traded = await ide.get(f"/__ide/{ide.id}/x?token={token}")
    cookie = traded.headers["set-cookie"].split(";")[0]
    await ide.get(f"/__ide/{ide.id}/x", {"cookie": cookie})
    await ide.get(f"/__ide/{ide.id}/x?token=forged.{token[10:]}")
    await trio.sleep(0.1)
    session = cookie.split("=", 1)[1]
    gateway_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not the client
    assert any(r.name == "zlh.access" for r in gateway_records)
    for record in gateway_records:
        text = record.getMessage() + json.dumps(getattr(record, "fields", {}), default=str)
        assert token not in text and session not in text and token[:40] not in text
