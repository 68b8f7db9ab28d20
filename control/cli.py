"""The operator commands of `python -m control` / `zlh-gateway`: servers, replicas, orphans, outbox,
drain, users, config-reference. Each prints a table, or JSON with `--json`.

How the CLI reaches the fleet: it opens the same database as the gateway (the same settings:
DATABASE_URL / ZLH_DATA_DIR), reads through storage/fleet.py, and changes only what an operator asks
for (an outbox retry). `users` goes through the admin HTTP API instead (it logs in as an admin:
ZLH_ADMIN_EMAIL / ZLH_ADMIN_PASSWORD, else asked). `drain` reaches a replica on this host through its
pid file: `run` writes `<data>/run/<replica id>.json` ({pid, replicaId, binds}) and removes it at exit;
drain sends that pid SIGTERM — the same clean shutdown as Ctrl-C or `systemctl stop`: the replica stops accepting
connections, closes idle keep-alive ones, marks itself draining in the cluster (on PostgreSQL: its slot
leases and the fleet lead go to the other replicas at once; it keeps heartbeating so the operations it
drives are not taken over twice), lets open streams, consoles and IDE sockets finish within
hypercorn.toml's graceful_timeout, resigns and exits 0. Drain waits for that exit."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import peewee
import trio

from storage import fleet

from .config import Settings, configuration_reference
from .providers.local import process_alive

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
        parser.add_argument("--json", action="store_true", help="print JSON")
        return parser

    command("servers", help="every server: state and agent freshness")
    command("replicas", help="replicas, their slot leases and the fleet leader")
    command("orphans", help="containers without rows and rows without containers")
    outbox = command("outbox", help="the edge-publishing outbox: pending and failed changes")
    outbox.add_argument("--failed", action="store_true", help="only changes that failed at least once")
    outbox.add_argument("--retry", metavar="ID", nargs="?", const="failed",
                        help="make change ID (or, without ID, every failed change) due now")
    drain = command("drain", help="drain a replica on this host: finish open streams, exit 0")
    drain.add_argument("--replica", help="replica id (default: the only one running from this data dir)")
    drain.add_argument("--timeout", type=float, default=None,
                       help="seconds to wait for its exit (default: graceful_timeout + 15)")
    users = command("users", help="accounts, through the gateway's admin API (as an admin)")
    users.add_argument("action", nargs="?", default="list", choices=["list", "disable", "enable", "delete", "role"])
    users.add_argument("user_id", nargs="?", type=int, help="the user (disable, enable, delete, role)")
    users.add_argument("role", nargs="?", choices=["user", "admin"], help="the new role (role)")
    users.add_argument("--search", help="list: only users whose email contains this")
    users.add_argument("--url", help="the gateway (default: the replica running from this data dir)")
    users.add_argument("--email", help="admin email (default ZLH_ADMIN_EMAIL, else asked)")
    reference = sub.add_parser("config-reference", help="write docs/configuration.md from the settings")
    reference.add_argument("--check", action="store_true", help="fail if the file is stale")
    reference.add_argument("--output", type=Path, default=REFERENCE)


COMMANDS = {"servers", "replicas", "orphans", "outbox", "drain", "users"}


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    handlers: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "servers": _servers, "replicas": _replicas, "orphans": _orphans, "outbox": _outbox, "drain": _drain,
        "users": _users}
    try:
        return handlers[args.command](args, settings)
    except peewee.DatabaseError as exc:
        print(f"{args.command}: database {settings.database_url.split('@')[-1]} not usable ({exc}); "
              "is it migrated (python -m control migrate)?", file=sys.stderr)
        return 1


def _read(settings: Settings, work: Callable[..., Any], *args: Any) -> Any:
    from .app import open_store  # the assembly opens the database the one way it is opened

    store = open_store(settings)
    try:
        return trio.run(store.run, work, *args)
    finally:
        store.close()


def _print(args: argparse.Namespace, data: Any, rows: list[dict[str, Any]], columns: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_cell(row.get(c)).ljust(widths[c]) for c in columns))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return _ranges(value) if all(isinstance(v, int) for v in value) else ",".join(map(str, value))
    return str(value)


def _ranges(numbers: list[int]) -> str:
    """[0,1,2,5] -> "0-2,5" (slot lists)."""
    parts, numbers = [], sorted(numbers)
    start = prev = None
    for n in [*numbers, None]:
        if start is None:
            start = prev = n
        elif n is not None and prev is not None and n == prev + 1:
            prev = n
        else:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = n
    return ",".join(parts) or "-"


def _servers(args: argparse.Namespace, settings: Settings) -> int:
    rows = _read(settings, fleet.servers, 2 * settings.poll_interval + settings.agent_timeout)
    _print(args, rows, rows, ["id", "vmid", "kind", "name", "owner", "state", "serverState", "alive", "ready",
                              "fresh", "lastSeenAt", "lastError"])
    return 0


def _replicas(args: argparse.Namespace, settings: Settings) -> int:
    data = _read(settings, fleet.replicas, settings.cluster_lease_ttl)
    if not args.json:
        print(f"leader: {data['leader'] or '-'}   slots: {data['slotCount']}   unheld: {_cell(data['unheldSlots'])}")
    _print(args, data, data["replicas"], ["id", "address", "live", "draining", "heartbeatAgeSeconds", "slots"])
    return 0


def _orphans(args: argparse.Namespace, settings: Settings) -> int:
    from .app import build_provider, open_store

    store = open_store(settings)
    try:
        provider = build_provider(settings, store)

        async def find() -> dict[str, Any]:
            rows = await store.run(fleet.instance_vmids)
            containers = await provider.list_vmids()
            return {"containersWithoutRows": [{"vmid": v} for v in sorted(containers - set(rows))],
                    "rowsWithoutContainers": [{"vmid": v, **rows[v]} for v in sorted(set(rows) - containers)]}

        data = trio.run(find)
    finally:
        store.close()
    rows = [{"kind": "container without row", **r} for r in data["containersWithoutRows"]]
    rows += [{"kind": "row without container", **r} for r in data["rowsWithoutContainers"]]
    _print(args, data, rows, ["kind", "vmid", "id", "name", "state"])
    if rows and not args.json:
        print("remove one with: DELETE /api/containers/<vmid> (as an admin)")
    return 0


def _outbox(args: argparse.Namespace, settings: Settings) -> int:
    if args.retry is not None:
        try:
            target = None if args.retry == "failed" else int(args.retry)
        except ValueError:
            print(f"--retry takes a change id, not {args.retry!r}", file=sys.stderr)
            return 2
        count = _read(settings, fleet.retry_outbox, target)
        if args.json:
            print(json.dumps({"retried": count}))
        else:
            print(f"{count} change(s) due now")
        return 0 if count or target is None else 1
    rows = _read(settings, fleet.outbox, args.failed)
    _print(args, rows, rows, ["id", "target", "key", "action", "attempts", "dueAt", "lastError"])
    return 0


def pid_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "run"


def write_pid_file(settings: Settings, binds: list[str]) -> Path:
    directory = pid_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{settings.replica_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "replicaId": settings.replica_id, "binds": binds}))
    os.replace(tmp, path)
    return path


def _running_replicas(settings: Settings) -> list[dict[str, Any]]:
    found = []
    for path in sorted(pid_dir(settings).glob("*.json")) if pid_dir(settings).is_dir() else []:
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if process_alive(pid):  # else a stale file from a replica that did not exit cleanly
            found.append(record)
    return found


def _drain(args: argparse.Namespace, settings: Settings) -> int:
    replicas = [r for r in _running_replicas(settings) if args.replica in (None, r["replicaId"])]
    if len(replicas) != 1:
        names = ", ".join(r["replicaId"] for r in _running_replicas(settings)) or "none"
        print(f"drain: {'no such replica' if not replicas else 'several replicas, pick one with --replica'} "
              f"(running from {pid_dir(settings)}: {names})", file=sys.stderr)
        return 1
    replica = replicas[0]
    graceful = float(settings.server_options().get("graceful_timeout", 25))
    timeout = args.timeout if args.timeout is not None else graceful + 15
    pid = int(replica["pid"])
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    if not args.json:
        print(f"draining {replica['replicaId']} (pid {pid}); open streams get {graceful:.0f}s", flush=True)
    while process_alive(pid) and time.monotonic() - started < timeout:
        time.sleep(0.1)
    drained = not process_alive(pid)
    result = {"replicaId": replica["replicaId"], "pid": pid, "drained": drained,
              "seconds": round(time.monotonic() - started, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'drained' if drained else 'still running after'} {result['seconds']}s")
    return 0 if drained else 1


ADMIN_USERS = "/api/admin/users"
HTTP_TIMEOUT = 30.0


def _users(args: argparse.Namespace, settings: Settings) -> int:
    """Accounts go through the admin API (control/accounts.py), never straight to the database, so every
    action is authorized, audited and ends sessions on every replica the way the API does."""
    if args.action != "list" and args.user_id is None:
        print(f"users {args.action} needs a user id", file=sys.stderr)
        return 2
    if args.action == "role" and args.role is None:
        print("users role needs the new role: user or admin", file=sys.stderr)
        return 2
    url = args.url or next((r["binds"][0] for r in _running_replicas(settings)), None)
    if url is None:
        print(f"users: no gateway running from {pid_dir(settings)}; pass --url", file=sys.stderr)
        return 1
    email = args.email or os.environ.get("ZLH_ADMIN_EMAIL") or input("admin email: ")
    password = os.environ.get("ZLH_ADMIN_PASSWORD") or getpass.getpass("admin password: ")
    try:
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as http:
            login = http.post("/api/auth/login", json={"email": email, "password": password})
            if login.status_code != 200:
                return _http_failure("login", login)
            headers = {"authorization": f"Bearer {login.json()['accessToken']}"}
            path = f"{ADMIN_USERS}/{args.user_id}"
            if args.action == "list":
                search = {"email": args.search} if args.search else None
                response = http.get(ADMIN_USERS, headers=headers, params=search)
            elif args.action == "delete":
                response = http.delete(path, headers=headers)
            elif args.action == "role":
                response = http.post(f"{path}/role", headers=headers, json={"role": args.role})
            else:
                response = http.post(f"{path}/{args.action}", headers=headers)
    except httpx.HTTPError as exc:
        print(f"users: {url} not reachable ({exc})", file=sys.stderr)
        return 1
    if response.status_code >= 400:
        return _http_failure(f"users {args.action}", response)
    body = response.json() if response.content else {}
    if args.action == "list":
        rows = body.get("users", body) if isinstance(body, dict) else body
        _print(args, body, rows, ["id", "email", "role", "disabled", "createdAt"])
    elif args.json:
        print(json.dumps(body))
    else:
        print(f"user {args.user_id}: {args.action} done")
    return 0


def _http_failure(what: str, response: httpx.Response) -> int:
    try:
        detail = response.json()
    except ValueError:
        detail = response.text[:500]
    print(f"{what}: HTTP {response.status_code} {detail}", file=sys.stderr)
    return 1


def config_reference(args: argparse.Namespace) -> int:
    """Needs no settings (and must not make a data dir): the reference is of the fields."""
    text = configuration_reference()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python -m control config-reference", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0

