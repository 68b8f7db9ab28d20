"""Every route goes through the one access rule: walk the route table (control/app.py::control_routes)
and call each route that is not on the short public list, on the real gateway, with the credential it
takes (bearer access token; console token in the websocket's first frame; IDE link token) of an account
that was disabled, or of a login that ended. Each must answer 401 or 403 — so a route added later that
authenticates in its own way, or not at all, fails here until it uses the rule (or is declared public)."""

from __future__ import annotations

import json
import re

import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from control.app import control_routes
from control.auth.tokens import TokenKind, TokenService
from tests.conftest import TEST_SECRET, Gateway
from tests.control.test_accounts import admin_session

# Open by design: no account involved (operations, the auth entry points, Stripe's signed webhook,
# Prometheus' own token, the job backend's installer probes).
PUBLIC = {
    ("GET", "/health"), ("GET", "/ready"), ("GET", "/live"), ("GET", "/"), ("GET", "/metrics"),
    ("GET", "/openapi.json"), ("GET", "/api/edge/prometheus-sd"),
    ("POST", "/api/auth/register"), ("POST", "/api/auth/login"), ("POST", "/api/auth/refresh"),
    ("POST", "/api/auth/logout"), ("POST", "/api/auth/password-reset/request"),
    ("POST", "/api/auth/password-reset/confirm"),
    ("POST", "/api/billing/webhook"), ("GET", "/healthz"), ("GET", "/api/v1/server-info"),
}
# Runner-only routes of the job backend (runner token, control/jobs/access.py::as_runner) that validate
# their body before the handler authenticates the runner: they answer 422 to a bad body from anyone,
# which is not access (no account's data is reached) but is the order the rule wants reversed — left to
# the job backend's owner. They must still never answer 2xx.
RUNNER_BODY_FIRST = {("POST", "/api/v1/jobs/<int:job_id>/status"), ("POST", "/api/v1/jobs/<int:job_id>/artifacts"),
                     ("POST", "/api/v1/jobs/<int:job_id>/tests")}
CONSOLE = ("GET", "/api/servers/<int:server_id>/console")
IDE = ("GET", "/__ide/<int:server_id>/<path:rest>")


def concrete(path: str) -> str:
    return re.sub(r"<(?:(\w+):)?(\w+)>", lambda m: "1" if m.group(1) == "int" else "x", path)


async def ended_session(gateway: Gateway, how: str) -> dict:
    session = await gateway.register("walker@example.com")
    if how == "disabled":
        admin = await admin_session(gateway)
        done = await gateway.client.post(f"/api/admin/users/{session['user']['id']}/disable",
                                         headers=gateway.bearer(admin))
        assert done.status_code == 200, done.text
    else:
        done = await gateway.client.post("/api/auth/logout", json={"refreshToken": session["refreshToken"]})
        assert done.status_code == 204, done.text
    return session


@pytest.mark.parametrize("how", ["disabled", "logged-out"])
async def test_every_route_refuses_an_ended_session(gateway: Gateway, how: str) -> None:
    session = await ended_session(gateway, how)
    user_id = session["user"]["id"]
    tokens = TokenService(TEST_SECRET, "zlh-gateway")
    family = jwt.decode(session["accessToken"], options={"verify_signature": False})["fam"]
    routes = control_routes()
    table = {(route.method, route.path) for route in routes}
    assert PUBLIC <= table, f"public routes no longer in the table: {PUBLIC - table}"
    walked, wrong = 0, []
    for route in routes:
        key = (route.method, route.path)
        if key in PUBLIC:
            continue
        path = concrete(route.path)
        if key == CONSOLE:
            token = tokens.issue(TokenKind.CONSOLE, user_id, 60, sid=1, role="user", fam=family)
            with trio.fail_after(15):
                async with open_websocket_url(gateway.url.replace("http://", "ws://") + path) as ws:
                    await ws.send_message(json.dumps({"type": "auth", "token": token}))
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
            if closed.value.reason.code not in (4001, 4010):
                wrong.append((key, closed.value.reason.code))
            walked += 1
            continue
        headers = gateway.bearer(session)
        if key == IDE:
            link = tokens.issue(TokenKind.IDE, user_id, 60, iid=1, use="link", fam=family)
            path += f"?token={link}"
        body = b"{}" if route.method in ("POST", "PUT", "PATCH") else None
        response = await gateway.client.request(route.method, path, headers={
            **headers, "content-type": "application/json", "upload-offset": "0"}, content=body)
        if key in RUNNER_BODY_FIRST and response.status_code in (401, 403, 422):
            walked += 1
            continue
        if response.status_code not in (401, 403):
            wrong.append((key, response.status_code, response.text[:200]))
        walked += 1
    assert not wrong, f"routes that did not refuse a {how} session: {wrong}"
    assert walked > 100
