"""The IDE proxy's resolve and header rules as plain functions, the websocket splice on real socket
pairs, the end of open websockets on revocation, and the activity record on both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest
import trio
import trio.testing

from gateway.ide_proxy import (
    IdeGrant,
    IdeProxy,
    IdeRevocation,
    IdeTarget,
    credential_of,
    ide_host_pattern,
    ide_response_headers,
    origin_matches,
    resolve_host,
    resolve_path,
    splice,
    upstream_headers,
    without_token,
)
from gateway.server import Request
from gateway.upstream import UpstreamPool
from storage import dev as store_dev
from storage.clock import utcnow
from storage.db import Store, connect_database
from storage.migrations import migrate


def _request(target: str, *headers: tuple[bytes, bytes], method: str = "GET") -> Request:
    path, _, query = target.partition("?")
    return Request(method, target, path, query, list(headers), b"1.1", "10.0.0.9:5555", "http")


def test_path_resolution_keeps_raw_encoding_and_spots_the_bare_prefix() -> None:
    target = resolve_path(_request("/__ide/12/a%2Fb/c?x=%20&token=t"))
    assert target is not None and target.instance_id == 12 and target.routing == "path"
    assert target.path == "/a%2Fb/c" and target.upstream_target == "/a%2Fb/c?x=%20"
    bare = resolve_path(_request("/__ide/12"))
    assert bare is not None and bare.path == "" and bare.location("") == "/__ide/12/"
    assert resolve_path(_request("/__ide/12x/")) is None and resolve_path(_request("/__idea/1/")) is None


def test_host_resolution_matches_only_dev_names_under_the_ide_domain() -> None:
    pattern = ide_host_pattern("ide.example.com")
    hosted = resolve_host(_request("/any/path?q=1", (b"host", b"DEV-7.ide.example.com:8443")), pattern)
    assert hosted is not None and hosted.instance_id == 7 and hosted.path == "/any/path" and hosted.prefix == ""
    for host in (b"dev-7.ide.example.com.evil.net", b"xdev-7.ide.example.com", b"dev-x.ide.example.com",
                 b"ide.example.com", b"dev-7.other.example.com"):
        assert resolve_host(_request("/", (b"host", host)), pattern) is None


def test_token_is_removed_and_everything_else_kept_verbatim() -> None:
    assert without_token("a=1&token=abc&b=%2F&token2=z") == "a=1&b=%2F&token2=z"
    assert without_token("token=abc") == "" and without_token("folder=/x") == "folder=/x"


def test_query_token_wins_over_the_cookie_and_cookies_are_scoped_by_name() -> None:
    target = IdeTarget(3, "path", "/__ide/3", "/", "token=link")
    cookie = (b"cookie", b"zlh_ide_4=other; zlh_ide_3=mine")
    assert credential_of(_request("/__ide/3/?token=link", cookie), target).kind == "link"  # type: ignore[union-attr]
    plain = IdeTarget(3, "path", "/__ide/3", "/", "")
    found = credential_of(_request("/__ide/3/", cookie), plain)
    assert found is not None and (found.kind, found.token) == ("session", "mine")
    assert credential_of(_request("/__ide/3/", (b"cookie", b"zlh_ide_4=other")), plain) is None


def test_upstream_headers_state_the_browser_view_and_drop_gateway_credentials() -> None:
    request = _request("/__ide/3/", (b"host", b"gw.example:8080"), (b"authorization", b"Bearer x"),
                       (b"cookie", b"zlh_ide_3=s; Zlh_Other=t; keep=1"), (b"x-forwarded-host", b"spoofed"),
                       (b"connection", b"keep-alive, x-hop"), (b"x-hop", b"1"), (b"accept", b"*/*"))
    headers = dict(upstream_headers(request, "https"))
    assert headers[b"cookie"] == b"keep=1" and b"authorization" not in headers and b"x-hop" not in headers
    assert headers[b"host"] == headers[b"x-forwarded-host"] == b"gw.example:8080"
    assert headers[b"x-forwarded-proto"] == b"https" and headers[b"x-forwarded-for"] == b"10.0.0.9"
    assert headers[b"forwarded"] == b"for=10.0.0.9;host=gw.example:8080;proto=https"


def test_container_cannot_set_gateway_cookies_and_redirects_stay_under_the_prefix() -> None:
    upstream = [(b"set-cookie", b"zlh_ide_9=forged; Path=/"), (b"set-cookie", b"vscode-tkn=1; Path=/"),
                (b"location", b"/login?to=%2F"), (b"transfer-encoding", b"chunked"), (b"x-a", b"b")]
    by_path = ide_response_headers(upstream, IdeTarget(3, "path", "/__ide/3", "/", ""))
    assert by_path == [(b"set-cookie", b"vscode-tkn=1; Path=/"), (b"location", b"/__ide/3/login?to=%2F"),
                       (b"x-a", b"b")]
    by_host = ide_response_headers([(b"location", b"/login"), (b"location", b"//elsewhere/")],
                                   IdeTarget(3, "host", "", "/", ""))
    assert by_host == [(b"location", b"/login"), (b"location", b"//elsewhere/")]


def test_websocket_origin_must_name_the_host() -> None:
    host = (b"host", b"dev-3.ide.example.com")
    assert origin_matches(_request("/", host))
    assert origin_matches(_request("/", host, (b"origin", b"https://dev-3.ide.example.com")))
    assert not origin_matches(_request("/", host, (b"origin", b"https://dev-4.ide.example.com")))
    assert not origin_matches(_request("/", host, (b"origin", b"null")))


async def test_splice_copies_both_ways_and_passes_a_half_close_on() -> None:
    browser, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, container = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(splice, proxy_client, b"early-client", proxy_upstream, b"early-upstream")
        await browser.send_all(b"hello")
        received = b""
        while len(received) < len(b"early-clienthello"):
            received += await container.receive_some()
        assert received == b"early-clienthello"
        await container.send_all(b"back")
        got = b""
        while len(got) < len(b"early-upstreamback"):
            got += await browser.receive_some()
        assert got == b"early-upstreamback"
        await browser.send_eof()
        assert await container.receive_some() == b""  # the half-close reached the container
        await container.send_all(b"last words")
        assert await browser.receive_some() == b"last words"
        await container.send_eof()
    assert await browser.receive_some() == b""


async def test_open_websockets_end_when_revoked_or_no_longer_allowed_on_recheck() -> None:
    refused: set[str] = set()  # logins the rule refuses now, though no revocation was heard here

    async def still_allowed(grant: IdeGrant) -> bool:
        return grant.family not in refused

    async def authorize(*args: object) -> IdeGrant:
        raise AssertionError("not asked here")

    proxy = IdeProxy(UpstreamPool(), authorize, still_allowed, activity=None,  # type: ignore[arg-type]
                     ide_domain="ide.localhost", cookie_secure=False, access_check_interval=0.05)
    ended: list[str] = []

    async def websocket(user_id: int, family: str) -> None:
        with proxy.holding(IdeGrant("127.0.0.1", 1, 7, user_id, family)):
            await trio.sleep_forever()
        ended.append(family)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            for user_id, family in ((1, "phone"), (1, "laptop"), (2, "desk"), (3, "other")):
                nursery.start_soon(websocket, user_id, family)
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.revoke(IdeRevocation(family="phone")) == 1
            await trio.testing.wait_all_tasks_blocked()
            assert ended == ["phone"]
            refused.add("desk")
            while "desk" not in ended:
                await trio.sleep(0.01)
            assert proxy.revoke(IdeRevocation(user_id=1)) == 1
            assert proxy.revoke(IdeRevocation()) == 0  # names nobody: cuts nothing
            await trio.testing.wait_all_tasks_blocked()
            assert ended == ["phone", "desk", "laptop"]
            nursery.cancel_scope.cancel()


@pytest.fixture
async def store(database_url: str) -> Store:
    db = connect_database(database_url)
    await trio.to_thread.run_sync(migrate, db)
    return Store(db, threads=2)


async def test_activity_sums_live_replicas_and_keeps_the_latest_request(store: Store) -> None:
    now = utcnow()
    earlier = now - timedelta(minutes=5)
    await store.run(store_dev.record_ide_activity, "replica-a", [store_dev.ActivityReport(1, 2, earlier)])
    await store.run(store_dev.record_ide_activity, "replica-b", [store_dev.ActivityReport(1, 1, now)])
    live = await store.run(store_dev.ide_activity, 1, now - timedelta(seconds=15))
    assert live == store_dev.IdeActivity(3, now)
    # A report without a request keeps the last one; a silent replica stops counting.
    await store.run(store_dev.record_ide_activity, "replica-b", [store_dev.ActivityReport(1, 0, None)])
    later = await store.run(store_dev.ide_activity, 1, utcnow() + timedelta(seconds=1))
    assert later == store_dev.IdeActivity(0, now)
    assert await store.run(store_dev.ide_activity, 2, now) == store_dev.IdeActivity(0, None)
    await store.run(store_dev.forget_ide_activity, 1)
    assert await store.run(store_dev.ide_activity, 1, earlier) == store_dev.IdeActivity(0, None)
    store.close()
