"""Hostile input in the control API: JSON that is too deep, integers too long, duplicate keys, ids and
page numbers out of range, emails no mailbox can have. Each gets a 4xx in its envelope, on the real
app over a real socket, and nothing is logged as a crash."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from control.api import MAX_ID, JsonRefused, decode_json
from gateway.logs import configure_logging
from tests.conftest import Gateway
from tests.control.test_errors import assert_envelope

JSON = {"content-type": "application/json"}


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    yield stream
    logging.getLogger().handlers.clear()


def assert_no_crash_logged(log: io.StringIO) -> None:
    text = log.getvalue()
    assert "zlh.access" in text  # the requests were logged
    assert "Traceback" not in text and '"level": "error"' not in text, text[-3000:]


@pytest.mark.parametrize(("body", "reason"), [
    (b"[" * 10_000 + b"]" * 10_000, "nested deeper than 64"),
    (b'{"a":' * 65 + b"1" + b"}" * 65, "nested deeper than 64"),
    (b'{"email": ' + b"9" * 5_000 + b"}", "integer out of range"),
    (b'{"email": -' + b"9" * 20 + b"}", "integer out of range"),
    (b'{"email": "a@b.co", "email": "c@d.co", "password": "x"}', "duplicate key 'email'"),
    (b'{"email": NaN}', "NaN is not JSON"),
    (b'{"email": 1e999}', "number out of range"),
])
def test_decoder_refuses(body: bytes, reason: str) -> None:
    with pytest.raises(JsonRefused) as refused:
        decode_json(body)
    assert reason in refused.value.reason


def test_decoder_keeps_what_is_fine() -> None:
    assert decode_json(b'{"a": [[[[1]]]], "b": "[[[[{{{{", "c": -9223372036854775807, "d": 1.5}') == {
        "a": [[[[1]]]], "b": "[[[[{{{{", "c": -9223372036854775807, "d": 1.5}
    assert decode_json(b'{"a":' * 63 + b"1" + b"}" * 63) is not None  # 63 deep (+1 for the outer object)
    assert decode_json(b"  ") is None


async def test_hostile_bodies_answer_400_without_a_traceback(gateway: Gateway, log: io.StringIO) -> None:
    c = gateway.client
    session = await gateway.register()
    for body in (b"[" * 10_000 + b"]" * 10_000, b'{"email": ' + b"9" * 5_000 + b"}",
                 b'{"email": "a@b.co", "email": "c@d.co", "password": "password123"}'):
        for path in ("/api/auth/login", "/api/auth/register", "/api/auth/password-reset/request"):
            assert_envelope(await c.post(path, content=body, headers=JSON), 400, "INVALID_JSON")
        response = await c.post("/api/servers/1/console/command", content=body,
                                headers={**JSON, **gateway.bearer(session)})
        assert response.status_code in (400, 404), response.text  # body parsing follows the owner check
    # The environments API (seed 004) keeps its own envelope, but the same decoder.
    deep = await c.post("/api/v1/environments", content=b"[" * 10_000, headers={**JSON, **gateway.bearer(session)})
    assert deep.status_code == 400 and deep.json()["message"] == "request body is not valid JSON"
    assert_no_crash_logged(log)


async def test_ids_and_pages_out_of_range(gateway: Gateway, log: io.StringIO) -> None:
    c = gateway.client
    session = await gateway.register()
    auth = gateway.bearer(session)
    huge = "9" * 30
    for path in (f"/api/servers/{huge}", f"/api/servers/{MAX_ID + 1}", f"/api/servers/{2**63}",
                 f"/api/v1/jobs/{huge}", f"/api/game/servers/{huge}/backups",
                 f"/api/servers/{huge}/files/download?path=a", f"/api/game/servers/{huge}/backups/b1/download"):
        assert_envelope(await c.get(path, headers=auth), 404)
    for method, path in (("DELETE", f"/api/containers/{huge}"), ("DELETE", f"/api/containers/{MAX_ID + 1}"),
                         ("POST", f"/api/servers/{MAX_ID + 1}/start")):
        assert_envelope(await c.request(method, path, headers=auth), 404)
    assert_envelope(await c.get(f"/api/servers/{MAX_ID}", headers=auth), 404, "SERVER_NOT_FOUND")  # in range: looked up
    ide = await c.get(f"/__ide/{10**17}/", headers=auth)
    assert 400 <= ide.status_code < 500, ide.text
    for query in (f"page={huge}", f"page={2**63}", "page=\u00b2", "pageSize=0", f"pageSize={huge}"):
        response = await c.get(f"/api/v1/environments?{query}", headers=auth)
        assert response.status_code == 400, (query, response.text)
    ok = await c.get(f"/api/v1/environments?page={MAX_ID}&pageSize=100", headers=auth)
    assert ok.status_code == 200 and ok.json()["environments"] == []
    assert_no_crash_logged(log)


@pytest.mark.parametrize("email", ["@\u001d.", "a\u0000b@example.com", "a@exa\u0085mple.com", "a b@example.com",
                                   "x" * 250 + "@example.com", "nobody@", "a@b."])
async def test_emails_no_mailbox_can_have_are_422(gateway: Gateway, log: io.StringIO, email: str) -> None:
    c = gateway.client
    for path, body in (("/api/auth/password-reset/request", {"email": email}),
                       ("/api/auth/register", {"email": email, "password": "password123"}),
                       ("/api/auth/login", {"email": email, "password": "password123"})):
        details = assert_envelope(await c.post(path, json=body), 422, "VALIDATION_FAILED")["details"]
        assert details[0]["field"] == "email"
    assert_no_crash_logged(log)


async def test_a_long_valid_email_is_served(gateway: Gateway) -> None:
    email = "x" * 240 + "@example.com"  # 252 characters: over the rate-limit key column if stored raw
    session = await gateway.register(email)
    assert session["user"]["email"] == email
    login = await gateway.client.post("/api/auth/login", json={"email": email, "password": "password123"})
    assert login.status_code == 200, login.text
    reset = await gateway.client.post("/api/auth/password-reset/request", json={"email": email})
    assert reset.status_code == 202, reset.text
