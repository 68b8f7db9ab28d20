"""Every error the gateway produces is the envelope with the right status; logs carry no secrets."""

from __future__ import annotations

import io
import logging

import httpx

from gateway.logs import configure_logging
from tests.conftest import Gateway


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "details"}
    if code:
        assert body["error"] == code
    return body


async def test_error_paths_use_the_envelope(gateway: Gateway) -> None:
    c = gateway.client
    assert_envelope(await c.get("/no/such/route"), 404, "NOT_FOUND")
    assert_envelope(await c.delete("/api/me"), 405, "METHOD_NOT_ALLOWED")
    assert_envelope(await c.get("/api/me"), 401, "UNAUTHORIZED")
    assert_envelope(await c.get("/api/me", headers={"authorization": "Bearer not-a-jwt"}), 401, "INVALID_TOKEN")
    headers = {"content-type": "application/json"}
    assert_envelope(await c.post("/api/auth/login", content=b"{not json", headers=headers), 400, "INVALID_JSON")
    assert_envelope(await c.post("/api/auth/login", content=b'{"email": "\xff\xfe"}', headers=headers), 400, "INVALID_JSON")
    assert_envelope(await c.post("/api/auth/login", content=b"[1,2]", headers=headers), 400, "INVALID_JSON")
    assert_envelope(await c.post("/api/auth/login", content=b"email=a", headers={"content-type": "text/plain"}), 415)
    wrong_type = assert_envelope(await c.post("/api/auth/login", json={"email": 5, "password": "x"}), 422, "VALIDATION_FAILED")
    assert wrong_type["details"][0]["field"] == "email"
    unknown = assert_envelope(await c.post("/api/auth/register", json={"email": "a@b.co", "password": "password123", "admin": True}), 422)
    assert unknown["details"][0]["field"] == "admin"
    missing = assert_envelope(await c.post("/api/auth/register", json={"email": "a@b.co"}), 422)
    assert missing["details"][0]["field"] == "password"
    huge = b'{"email": "' + b"a" * (2 * 1024 * 1024) + b'", "password": "x"}'
    assert_envelope(await c.post("/api/auth/login", content=huge, headers=headers), 413, "PAYLOAD_TOO_LARGE")


async def test_logs_never_contain_request_secrets(gateway: Gateway) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", stream)
    try:
        session = await gateway.register("gina@example.com", "hunter2-secret-pw")
        await gateway.client.get("/api/me?token=query-secret-123", headers={
            **gateway.bearer(session), "cookie": "zlh_ide=cookie-secret-456"})
        await gateway.client.post("/api/auth/refresh", json={"refreshToken": session["refreshToken"]})
        await gateway.client.post("/api/auth/login", json={"email": "gina@example.com", "password": "hunter2-secret-pw"})
        logging.getLogger("zlh.test").info("Authorization: Bearer %s", session["accessToken"])
    finally:
        logging.getLogger().handlers.clear()
    output = stream.getvalue()
    assert "/api/me" in output  # requests were logged
    for secret in ("hunter2-secret-pw", "query-secret-123", "cookie-secret-456",
                   session["accessToken"], session["refreshToken"]):
        assert secret not in output


async def test_ops_routes(gateway: Gateway) -> None:
    assert (await gateway.client.get("/health")).json()["status"] == "ok"
    ready = await gateway.client.get("/ready")
    assert ready.status_code == 200 and ready.json()["database"] is True
    await gateway.client.get("/health")
    metrics = await gateway.client.get("/metrics")
    assert 'zlh_http_requests_total{method="GET",route="/health",status="200"}' in metrics.text
    spec = (await gateway.client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    login = spec["paths"]["/api/auth/login"]["post"]
    ref = login["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert "email" in spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
