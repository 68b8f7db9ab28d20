"""The accounts admin API and ended sessions on one gateway (real sockets, SQLite and PostgreSQL):
disable, delete, logout, password reset and a role change refuse the old access token on the very next
request; admins only (403 for users); every action in the audit log; the registry is rebuilt from the
database at start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

from control.auth.tokens import TokenKind, TokenService
from control.sessions import Sessions
from gateway.errors import ApiError
from storage import instances as store_instances
from storage import tokens as token_store
from storage import users
from storage.clock import utcnow
from storage.db import Store, connect_database
from storage.migrations import migrate
from storage.models import database
from tests.conftest import TEST_SECRET, Gateway
from tests.control.test_auth import _mail_token

T = TypeVar("T")


async def in_db(work: Callable[..., T], *args: Any) -> T:
    """Storage work against the running gateway's database, in one transaction."""
    db = database.obj

    def unit() -> T:
        with db.connection_context(), db.atomic():
            return work(*args)

    return await trio.to_thread.run_sync(unit)


async def admin_session(gateway: Gateway, email: str = "admin@example.com") -> dict:
    """An admin's login (made admin in the database, as `make admin` does, then logged in)."""
    registered = await gateway.register(email)
    await in_db(users.set_role, registered["user"]["id"], "admin")
    login = await gateway.client.post("/api/auth/login", json={"email": email, "password": "password123"})
    assert login.status_code == 200, login.text
    return login.json()


async def me_status(gateway: Gateway, session: dict) -> tuple[int, str]:
    response = await gateway.client.get("/api/me", headers=gateway.bearer(session))
    return response.status_code, response.json().get("error", "")


async def test_disable_refuses_the_old_access_token_on_the_next_request(gateway: Gateway) -> None:
    admin = await admin_session(gateway)
    user = await gateway.register()
    servers = await gateway.client.get("/api/servers", headers=gateway.bearer(user))
    assert servers.status_code == 200
    disabled = await gateway.client.post(f"/api/admin/users/{user['user']['id']}/disable",
                                         headers=gateway.bearer(admin))
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["state"] == "disabled"
    assert await me_status(gateway, user) == (403, "ACCOUNT_DISABLED")
    # Nothing else works either: provisioning, refreshing, logging in.
    provision = await gateway.client.post("/api/instances", headers=gateway.bearer(user), json={
        "kind": "game", "name": "srv", "engineType": "minecraft"})
    assert provision.status_code == 403 and provision.json()["error"] == "ACCOUNT_DISABLED"
    refresh = await gateway.client.post("/api/auth/refresh", json={"refreshToken": user["refreshToken"]})
    assert refresh.status_code == 401
    login = await gateway.client.post("/api/auth/login", json={"email": "user@example.com", "password": "password123"})
    assert login.status_code == 401
    # Enabled again: a new login works; the logins the disable ended stay ended.
    enabled = await gateway.client.post(f"/api/admin/users/{user['user']['id']}/enable", headers=gateway.bearer(admin))
    assert enabled.status_code == 200 and enabled.json()["state"] == "active"
    assert (await me_status(gateway, user))[0] == 401
    login = await gateway.client.post("/api/auth/login", json={"email": "user@example.com", "password": "password123"})
    assert login.status_code == 200
    assert (await me_status(gateway, login.json()))[0] == 200


async def test_delete_is_refused_while_the_account_owns_servers_then_ends_it(gateway: Gateway) -> None:
    admin = await admin_session(gateway)
    user = await gateway.register()
    user_id = user["user"]["id"]
    instance = await in_db(lambda: store_instances.create_instance(
        vmid=store_instances.next_free_vmid(), owner=user_id, kind="game", name="kept", engine_type="minecraft",
        payload={}, allocated_ports=[], provider="local", agent_secret="s", state="failed"))
    refused = await gateway.client.delete(f"/api/admin/users/{user_id}", headers=gateway.bearer(admin))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "ACCOUNT_HAS_RESOURCES" and refused.json()["details"]["instances"] == 1
    assert (await me_status(gateway, user))[0] == 200  # a refused delete changes nothing
    await in_db(lambda: store_instances.Instance.delete().where(store_instances.Instance.id == instance.id).execute())
    deleted = await gateway.client.delete(f"/api/admin/users/{user_id}", headers=gateway.bearer(admin))
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["state"] == "deleted"
    assert await me_status(gateway, user) == (401, "ACCOUNT_DELETED")
    login = await gateway.client.post("/api/auth/login", json={"email": "user@example.com", "password": "password123"})
    assert login.status_code == 401
    again = await gateway.client.delete(f"/api/admin/users/{user_id}", headers=gateway.bearer(admin))
    assert again.status_code == 404
    # The email is free for a new account, which is a different account.
    fresh = await gateway.register()
    assert fresh["user"]["id"] != user_id and (await me_status(gateway, fresh))[0] == 200


async def test_logout_ends_that_logins_access_token_only(gateway: Gateway) -> None:
    first = await gateway.register()
    second = (await gateway.client.post("/api/auth/login", json={"email": "user@example.com",
                                                                 "password": "password123"})).json()
    out = await gateway.client.post("/api/auth/logout", json={"refreshToken": first["refreshToken"]})
    assert out.status_code == 204
    assert await me_status(gateway, first) == (401, "SESSION_REVOKED")
    assert (await me_status(gateway, second))[0] == 200


async def test_password_reset_ends_every_access_token(gateway: Gateway) -> None:
    first = await gateway.register()
    second = (await gateway.client.post("/api/auth/login", json={"email": "user@example.com",
                                                                 "password": "password123"})).json()
    await gateway.client.post("/api/auth/password-reset/request", json={"email": "user@example.com"})
    reset = _mail_token(gateway.settings.data_dir / "outbox")
    done = await gateway.client.post("/api/auth/password-reset/confirm",
                                     json={"token": reset, "password": "a-new-password-1"})
    assert done.status_code == 200, done.text
    assert await me_status(gateway, first) == (401, "SESSION_REVOKED")
    assert await me_status(gateway, second) == (401, "SESSION_REVOKED")


async def test_a_role_change_ends_the_logins_that_carry_the_old_role(gateway: Gateway) -> None:
    admin = await admin_session(gateway)
    other = await admin_session(gateway, "other-admin@example.com")
    listed = await gateway.client.get("/api/admin/users", headers=gateway.bearer(other))
    assert listed.status_code == 200
    demoted = await gateway.client.post(f"/api/admin/users/{other['user']['id']}/role", headers=gateway.bearer(admin),
                                        json={"role": "user"})
    assert demoted.status_code == 200 and demoted.json()["role"] == "user"
    stale = await gateway.client.get("/api/admin/users", headers=gateway.bearer(other))
    assert stale.status_code == 401 and stale.json()["error"] == "SESSION_REVOKED"
    relogin = (await gateway.client.post("/api/auth/login", json={"email": "other-admin@example.com",
                                                                  "password": "password123"})).json()
    assert (await gateway.client.get("/api/admin/users", headers=gateway.bearer(relogin))).status_code == 403
    bad = await gateway.client.post(f"/api/admin/users/{other['user']['id']}/role", headers=gateway.bearer(admin),
                                    json={"role": "root"})
    assert bad.status_code == 422
    own = await gateway.client.post(f"/api/admin/users/{admin['user']['id']}/disable", headers=gateway.bearer(admin))
    assert own.status_code == 409 and own.json()["error"] == "OWN_ACCOUNT"


async def test_admin_routes_are_403_for_users_and_404_for_unknown_accounts(gateway: Gateway) -> None:
    admin = await admin_session(gateway)
    user = await gateway.register()
    victim = admin["user"]["id"]
    calls = [("GET", "/api/admin/users", None), ("GET", f"/api/admin/users/{victim}", None),
             ("POST", f"/api/admin/users/{victim}/disable", None), ("POST", f"/api/admin/users/{victim}/enable", None),
             ("DELETE", f"/api/admin/users/{victim}", None), ("POST", f"/api/admin/users/{victim}/role",
                                                               {"role": "user"}),
             ("GET", "/api/admin/audit", None)]
    for method, path, body in calls:
        response = await gateway.client.request(method, path, headers=gateway.bearer(user), json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"] == "FORBIDDEN"
    assert (await me_status(gateway, admin))[0] == 200  # none of it reached the admin's account
    for method, path, body in calls[1:-1]:
        response = await gateway.client.request(method, path.replace(str(victim), "999999"),
                                                headers=gateway.bearer(admin), json=body)
        assert response.status_code == 404, (method, path, response.text)


async def test_list_search_and_pages_and_the_audit_log(gateway: Gateway) -> None:
    admin = await admin_session(gateway)
    for n in range(5):
        await gateway.register(f"team-{n}@example.com")
    await gateway.register("outsider@example.org")
    page = await gateway.client.get("/api/admin/users?email=TEAM-&pageSize=2&page=2", headers=gateway.bearer(admin))
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["total"] == 5 and body["page"] == 2 and [u["email"] for u in body["users"]] == [
        "team-2@example.com", "team-3@example.com"]
    for query in ("page=0", "pageSize=101", "page=x", "email=" + "a" * 400):
        bad = await gateway.client.get(f"/api/admin/users?{query}", headers=gateway.bearer(admin))
        assert bad.status_code == 400 and bad.json()["error"] == "VALIDATION_FAILED", query
    target = body["users"][0]["id"]
    await gateway.client.post(f"/api/admin/users/{target}/disable", headers=gateway.bearer(admin))
    await gateway.client.post(f"/api/admin/users/{target}/enable", headers=gateway.bearer(admin))
    await gateway.client.post(f"/api/admin/users/{target}/role", headers=gateway.bearer(admin), json={"role": "admin"})
    audit = await gateway.client.get(f"/api/admin/audit?action=account.&target=user:{target}",
                                     headers=gateway.bearer(admin))
    assert audit.status_code == 200, audit.text
    entries = audit.json()["entries"]
    assert [e["action"] for e in entries] == ["account.role", "account.enable", "account.disable"]
    assert all(e["actorId"] == admin["user"]["id"] for e in entries)
    assert entries[0]["details"] == {"role": "admin", "previous": "user"}
    older = await gateway.client.get(f"/api/admin/audit?limit=1&target=user:{target}&before={entries[0]['id']}",
                                     headers=gateway.bearer(admin))
    assert [e["action"] for e in older.json()["entries"]] == ["account.enable"]


async def test_the_registry_is_rebuilt_from_the_database(database_url: str) -> None:
    """What a replica knows at start: logins ended and accounts disabled or deleted before it began."""
    db = connect_database(database_url)
    await trio.to_thread.run_sync(migrate, db)
    store = Store(db, threads=2)

    def setup() -> tuple[int, int, int]:
        ended, kept = users.create_user("a@example.com", "x"), users.create_user("b@example.com", "x")
        gone = users.create_user("c@example.com", "x")
        token_store.start_family("fam-ended", ended.id)
        token_store.start_family("fam-kept", kept.id)
        token_store.revoke_family("fam-ended", "logout")
        users.set_disabled(kept.id, utcnow())
        users.mark_deleted(gone.id, utcnow())
        return ended.id, kept.id, gone.id

    try:
        ended, disabled, deleted = await store.run(setup)
        sessions = Sessions(store, horizon=3600, resync_interval=60)
        assert sessions.allows(ended, "fam-ended")  # not loaded yet: nothing known
        await sessions.load()
        for user_id, family, code in ((ended, "fam-ended", "SESSION_REVOKED"), (disabled, None, "ACCOUNT_DISABLED"),
                                      (deleted, None, "ACCOUNT_DELETED")):
            try:
                sessions.check(user_id, family)
            except ApiError as error:
                assert error.code == code
            else:
                raise AssertionError(f"{code} not refused")
        assert sessions.allows(ended, "another-login")
        # Enabled meanwhile on another replica, event missed: the next resync lets it back in.
        await store.run(users.set_disabled, disabled, None)
        await sessions.load()
        assert sessions.allows(disabled, "fam-kept")
    finally:
        store.close()
        db.close()


async def test_a_reset_that_ends_hundreds_of_logins_ends_every_one(gateway: Gateway) -> None:
    """More ended logins than one cross-replica event can name (control/cluster.py::MAX_EVENT_FAMILIES)."""
    session = await gateway.register()
    user_id = session["user"]["id"]
    await in_db(lambda: [token_store.start_family(f"bulk-{n:04d}-" + "x" * 20, user_id) for n in range(250)])
    await gateway.client.post("/api/auth/password-reset/request", json={"email": "user@example.com"})
    done = await gateway.client.post("/api/auth/password-reset/confirm", json={
        "token": _mail_token(gateway.settings.data_dir / "outbox"), "password": "a-new-password-1"})
    assert done.status_code == 200, done.text
    assert await me_status(gateway, session) == (401, "SESSION_REVOKED")
    tokens = TokenService(TEST_SECRET, "zlh-gateway")
    for n in (0, 120, 249):  # in the first, a middle and the last event
        token = tokens.issue(TokenKind.ACCESS, user_id, 60, role="user", fam=f"bulk-{n:04d}-" + "x" * 20)
        assert await me_status(gateway, {"accessToken": token}) == (401, "SESSION_REVOKED")
