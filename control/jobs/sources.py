"""Source refs of a project's repository: `git ls-remote` (a subprocess under a timeout, credentials
from the vault passed through git's environment, never on its command line) and the rule that turns a
requested ref into a commit and a version. Never clones, never writes anything."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from dataclasses import dataclass

import trio

SHA = re.compile(r"^[0-9a-f]{7,40}$")


class SourceUnavailable(Exception):
    pass


@dataclass(frozen=True)
class SourceRef:
    name: str  # main, v1.2.0
    ref: str  # refs/heads/main, refs/tags/v1.2.0
    sha: str
    kind: str  # branch | tag | other


@dataclass(frozen=True)
class Credentials:
    username: str | None
    secret: str


def _git_env(credentials: Credentials | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG")}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1")
    if credentials is not None:
        if credentials.username:
            token = base64.b64encode(f"{credentials.username}:{credentials.secret}".encode()).decode()
            header = f"Authorization: Basic {token}"
        else:
            header = f"Authorization: Bearer {credentials.secret}"
        env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="http.extraHeader", GIT_CONFIG_VALUE_0=header)
    return env


async def list_refs(repository: str, credentials: Credentials | None, timeout: float) -> list[SourceRef]:
    """Every branch and tag of `repository` (tags peeled to the commit they name)."""
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(["git", "ls-remote", "--heads", "--tags", "--", repository],
                                          capture_stdout=True, capture_stderr=True, check=False,
                                          env=_git_env(credentials), stdin=subprocess.DEVNULL)
    except trio.TooSlowError as exc:
        raise SourceUnavailable(f"git ls-remote timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise SourceUnavailable(f"cannot run git: {exc}") from exc
    if done.returncode != 0:
        raise SourceUnavailable(done.stderr.decode(errors="replace").strip()[-500:] or f"git exited {done.returncode}")
    peeled: dict[str, str] = {}
    plain: dict[str, str] = {}
    for line in done.stdout.decode(errors="replace").splitlines():
        sha, _, ref = line.partition("\t")
        if ref.endswith("^{}"):
            peeled[ref[:-3]] = sha
        elif ref:
            plain[ref] = sha
    refs = []
    for ref, sha in sorted(plain.items()):
        if ref.startswith("refs/heads/"):
            refs.append(SourceRef(ref[len("refs/heads/"):], ref, sha, "branch"))
        elif ref.startswith("refs/tags/"):
            refs.append(SourceRef(ref[len("refs/tags/"):], ref, peeled.get(ref, sha), "tag"))
    return refs


@dataclass(frozen=True)
class Resolution:
    source_ref: str
    sha: str
    kind: str
    version: str


def resolve(requested: str, refs: list[SourceRef]) -> Resolution | None:
    """A branch, a tag, a full ref or a commit SHA (prefix) → the commit, and a version: the newest
    tag on that commit, else the branch name plus the short SHA."""
    match = next((r for r in refs if requested in (r.ref, r.name) and r.kind == "branch"), None) or next(
        (r for r in refs if requested in (r.ref, r.name)), None)
    if match is None and SHA.match(requested):
        sha_match = [r for r in refs if r.sha.startswith(requested)]
        sha = sha_match[0].sha if sha_match else requested
        kind = "commit"
    elif match is None:
        return None
    else:
        sha, kind = match.sha, match.kind
    tags = sorted((r.name for r in refs if r.kind == "tag" and r.sha == sha), key=_version_key)
    version = tags[-1] if tags else f"{match.name if match else 'commit'}-{sha[:12]}"
    return Resolution(requested, sha, kind, version)


def _version_key(tag: str) -> tuple[tuple[int, ...], str]:
    return tuple(int(n) for n in re.findall(r"\d+", tag)), tag
