"""Where the job backend may reach: every refused repository form (local paths, file://, ext::, hosts
that are or resolve to loopback, link-local, private, unspecified, multicast addresses, passwords in
URLs, plain http to the public) is a 400 naming the field, on import and on vault connections; what
ZLH_JOBS_ALLOWED_SOURCES allows; and git held to the checked target (one transport, bounded output,
a timeout, fixed error words that do not tell an existing path from a missing one). This module runs
the gateway with nothing allowed beyond public hosts."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from control.jobs.sources import SourceUnavailable, _git_output, list_refs
from control.jobs.targets import (
    AllowedSources,
    Origin,
    SourceRefused,
    Target,
    check_target,
    parse_origin,
)
from tests.jobs.conftest import PROJECT_YAML, Jobs


@pytest.fixture
def settings(settings: Any) -> Any:
    settings.jobs_allowed_sources = []
    return settings


REFUSED = [
    "/srv/git/repo.git", "./repo", "repo", "~/repo", "file:///srv/git/repo.git", "FILE:///etc", "file://localhost/etc",
    "ext::sh -c touch% /tmp/pwned", "fd::3", "gopher://1.1.1.1/repo", "http://1.1.1.1/repo.git",
    "https://127.0.0.1/repo.git", "https://localhost/repo.git", "https://[::1]/repo.git",
    "https://169.254.169.254/latest/meta-data", "https://10.0.0.5/repo.git", "https://192.168.1.1/r.git",
    "https://172.16.0.1/r.git", "https://0.0.0.0/r.git", "https://224.0.0.1/r.git", "https://[::ffff:127.0.0.1]/r",
    "https://[fe80::1]/r", "https://100.64.0.1/r", "git@127.0.0.1:org/repo.git", "ssh://git@10.1.2.3/repo.git",
    "https://user:password@1.1.1.1/repo.git", "https://user@1.1.1.1/repo.git", "https://a@b@1.1.1.1/r.git",
    "https://1.1.1.1\t/r.git", "https://1.1.1.1/r.git\n", "https://1.1.1.1\\@127.0.0.1/r.git",
    "https://-oProxyCommand=touch/x", "https://no-such-host.invalid/r.git", "git://1.1.1.1/r.git",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_a_refused_source_form_never_reaches_git(url: str) -> None:
    with pytest.raises(SourceRefused):
        await check_target(url, AllowedSources(), 5.0)


async def test_remote_git_urls_on_public_hosts_are_accepted() -> None:
    https = await check_target("https://1.1.1.1/org/repo.git", AllowedSources(), 5.0)
    assert https.origin == Origin("https", "1.1.1.1", 443) and https.addresses == ("1.1.1.1",)
    scp = await check_target("git@1.1.1.1:org/repo.git", AllowedSources(), 5.0)
    assert scp.origin == Origin("ssh", "1.1.1.1", 22)
    ssh = await check_target("ssh://git@[2606:4700:4700::1111]:2222/repo.git", AllowedSources(), 5.0)
    assert ssh.origin == Origin("ssh", "2606:4700:4700::1111", 2222)


async def test_allowed_sources_open_exactly_what_they_name() -> None:
    loopback = AllowedSources.parse(["127.0.0.0/8"])
    forge = await check_target("http://127.0.0.1:8080/repo.git", loopback, 5.0)
    assert forge.origin == Origin("http", "127.0.0.1", 8080) and forge.addresses == ("127.0.0.1",)
    with pytest.raises(SourceRefused):
        await check_target("https://10.0.0.5/repo.git", loopback, 5.0)
    with pytest.raises(SourceRefused):
        await check_target("/srv/repo", loopback, 5.0)
    local = AllowedSources.parse(["local"])
    assert (await check_target("/srv/repo", local, 5.0)).origin is None
    assert (await check_target("file:///srv/repo", local, 5.0)).origin is None
    with pytest.raises(SourceRefused):
        await check_target("ext::sh -c id", local, 5.0)  # never, whatever is allowed
    with pytest.raises(SourceRefused):
        await check_target("https://127.0.0.1/repo.git", local, 5.0)


def test_origins_compare_scheme_host_and_port() -> None:
    assert parse_origin("HTTPS://Git.Example.COM/a.git") == parse_origin("https://git.example.com:443/b.git")
    assert parse_origin("https://git.example.com/a") != parse_origin("https://git.example.com:8443/a")
    assert parse_origin("https://git.example.com/a") != parse_origin("http://git.example.com/a")
    assert parse_origin("git@git.example.com:a.git") == parse_origin("ssh://git.example.com/a.git")
    assert parse_origin("/srv/repo") is None and parse_origin("file:///srv/repo") is None
    assert parse_origin("ext::sh -c id") is None


async def _import(jobs: Jobs, repository: str) -> Any:
    text = PROJECT_YAML.replace("  default_ref: main", f"  default_ref: main\n  repository: '{repository}'")
    return await jobs.client.post("/api/v1/projects/import", json={"yaml": text}, headers=jobs.operator)


async def test_import_refuses_each_form_with_a_400_naming_the_field(jobs: Jobs, tmp_path: Path) -> None:
    for url in ["/etc", "file:///etc/passwd", "ext::sh -c id", "https://127.0.0.1/r.git", "https://localhost/r.git",
                "git@10.0.0.1:r.git", "http://1.1.1.1/r.git", "https://169.254.169.254/r"]:
        response = await _import(jobs, url)
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"] == "SOURCE_REFUSED"
        assert [d["field"] for d in response.json()["details"]] == ["project.repository"]
    assert (await jobs.client.get("/api/v1/projects", headers=jobs.operator)).json()["projects"] == []


async def test_a_refusal_does_not_tell_an_existing_path_from_a_missing_one(jobs: Jobs, tmp_path: Path) -> None:
    existing = tmp_path / "real"
    existing.mkdir()
    await trio.run_process(["git", "init", "-q", str(existing)])
    there, missing = await _import(jobs, str(existing)), await _import(jobs, str(tmp_path / "missing"))
    assert there.status_code == missing.status_code == 400
    assert there.json()["details"][0]["message"] == missing.json()["details"][0]["message"]


async def test_vault_connection_urls_pass_the_same_rule(jobs: Jobs) -> None:
    for kind, url in [("git", "/srv/repo"), ("git", "file:///etc"), ("http", "file:///etc/passwd"),
                      ("http", "http://127.0.0.1:9/"), ("http", "https://169.254.169.254/latest"),
                      ("git", "https://10.0.0.1/r.git")]:
        response = await jobs.client.post("/api/v1/vault/connections", headers=jobs.operator, json={
            "name": "c", "kind": kind, "url": url, "secret": "s3cret"})
        assert response.status_code == 400, (url, response.text)
        assert response.json()["details"][0]["field"] == "url" and "s3cret" not in response.text


async def test_git_output_is_bounded_and_timed() -> None:
    with pytest.raises(SourceUnavailable, match="more than 4096 bytes"):
        await _git_output(["sh", "-c", "yes"], {"PATH": "/usr/bin:/bin"}, 10.0, 4096)
    with pytest.raises(SourceUnavailable, match="timed out"):
        await _git_output(["sleep", "30"], {"PATH": "/usr/bin:/bin"}, 0.3, 4096)


def _repo(path: Path) -> Path:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e",
           "PATH": "/usr/bin:/bin", "HOME": str(path)}
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env=env)
    subprocess.run(["git", "-C", str(path), "commit", "-q", "--allow-empty", "-m", "x"], check=True, env=env)
    return path


async def test_git_may_use_only_the_transport_of_the_checked_target(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    local = Target(f"file://{repo}", None)
    assert [r.name for r in await list_refs(local, None, 10.0)] == ["main"]
    # The same URL under a target checked as https (a redirect, a submodule, a rewritten URL) is refused.
    disguised = Target(f"file://{repo}", Origin("https", "example.com", 443), ("93.184.216.34",))
    with pytest.raises(SourceUnavailable):
        await list_refs(disguised, None, 10.0)
    with pytest.raises(SourceUnavailable):
        await list_refs(Target("ext::sh -c 'echo pwned >&2'", None), None, 10.0)


async def test_git_failures_use_fixed_words(tmp_path: Path) -> None:
    (tmp_path / "not-a-repo").mkdir()
    messages = set()
    for path in (tmp_path / "not-a-repo", tmp_path / "missing"):
        with pytest.raises(SourceUnavailable) as failure:
            await list_refs(Target(str(path), None), None, 10.0)
        messages.add(str(failure.value))
    assert len(messages) == 1 and str(tmp_path) not in messages.pop()


def test_allowed_sources_come_from_the_environment_and_a_typo_stops_start_up(tmp_path: Path) -> None:
    from control.config import ConfigError, Settings

    def load(value: str) -> Settings:
        return Settings.from_env(env={"ZLH_JOBS_ALLOWED_SOURCES": value}, data_dir=tmp_path, jwt_secret="k" * 40)

    assert load("10.0.0.0/8, local ,fd00::/8").jobs_allowed_sources == ["10.0.0.0/8", "local", "fd00::/8"]
    assert load("").jobs_allowed_sources == []
    with pytest.raises(ConfigError, match="ZLH_JOBS_ALLOWED_SOURCES"):
        load("10.0.0.0/33")
    with pytest.raises(ConfigError, match="ZLH_JOBS_ALLOWED_SOURCES"):
        load("localhost")
