"""Source refs of a project's repository: `git ls-remote` (a subprocess under a timeout, its output
bounded, credentials from the vault passed through git's environment, never on its command line) and
the rule that turns a requested ref into a commit and a version. Never clones, never writes anything.

Every call takes a `Target` that targets.py has checked. git is then held to it: only the transport
of that target is allowed (`protocol.allow=never` plus that one), redirects are not followed, the
checked addresses are pinned for curl (`http.curloptResolve`), no system or global git config, no
prompts. Failures are reported in fixed words, never with git's stderr, so an answer cannot tell
"path exists" from "path missing" and never echoes what a remote said."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from dataclasses import dataclass
from functools import partial

import trio

from .targets import Target

SHA = re.compile(r"^[0-9a-f]{7,40}$")
MAX_GIT_OUTPUT = 8 * 1024 * 1024  # ls-remote of a repository with very many refs; more is refused


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


def _git_config(target: Target, credentials: Credentials | None) -> list[tuple[str, str]]:
    scheme = target.origin.scheme if target.origin is not None else "file"
    config = [("protocol.allow", "never"), (f"protocol.{scheme}.allow", "always"),
              ("http.followRedirects", "false"), ("credential.helper", ""), ("core.askPass", "")]
    if target.origin is not None and target.origin.scheme in ("http", "https") and target.addresses:
        pinned = ",".join(f"[{a}]" if ":" in a else a for a in target.addresses)
        config.append(("http.curloptResolve", f"{target.origin.host}:{target.origin.port}:{pinned}"))
    if credentials is not None:
        if credentials.username:
            token = base64.b64encode(f"{credentials.username}:{credentials.secret}".encode()).decode()
            header = f"Authorization: Basic {token}"
        else:
            header = f"Authorization: Bearer {credentials.secret}"
        config.append(("http.extraHeader", header))
    return config


def _git_env(target: Target, credentials: Credentials | None) -> dict[str, str]:
    # HOME: ssh's known_hosts
    env = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG")}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
               GIT_ASKPASS="", SSH_ASKPASS="", GIT_SSH_COMMAND="ssh -o BatchMode=yes -o ConnectTimeout=10")
    config = _git_config(target, credentials)
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for index, (key, value) in enumerate(config):
        env[f"GIT_CONFIG_KEY_{index}"] = key
        env[f"GIT_CONFIG_VALUE_{index}"] = value
    return env


async def _git_output(args: list[str], env: dict[str, str], timeout: float, limit: int) -> tuple[int, bytes]:
    """Run git; its stdout, refused past `limit` bytes; killed at `timeout`."""
    chunks: list[bytes] = []
    size = 0
    too_much = False
    try:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                process = await nursery.start(partial(
                    trio.run_process, args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, check=False, env=env))
                assert process.stdout is not None
                async for chunk in process.stdout:
                    size += len(chunk)
                    if size > limit:
                        too_much = True
                        process.kill()
                        break
                    chunks.append(chunk)
                returncode = await process.wait()
    except trio.TooSlowError as exc:
        raise SourceUnavailable(f"git ls-remote timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise SourceUnavailable("cannot run git") from exc
    if too_much:
        raise SourceUnavailable(f"git ls-remote answered more than {limit} bytes")
    return returncode, b"".join(chunks)


async def list_refs(target: Target, credentials: Credentials | None, timeout: float) -> list[SourceRef]:
    """Every branch and tag of the checked `target` (tags peeled to the commit they name)."""
    returncode, stdout = await _git_output(["git", "ls-remote", "--heads", "--tags", "--", target.url],
                                           _git_env(target, credentials), timeout, MAX_GIT_OUTPUT)
    if returncode != 0:
        raise SourceUnavailable(f"repository unreachable, not a git repository, or access denied (git exit "
                                f"{returncode})")
    peeled: dict[str, str] = {}
    plain: dict[str, str] = {}
    for line in stdout.decode(errors="replace").splitlines():
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
