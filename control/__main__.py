"""Command line: `python -m control run|migrate|create-admin` and the operator commands of
control/cli.py (servers, replicas, orphans, outbox, drain, config-reference). The `make run` entry point."""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
from functools import partial

import trio

from gateway.logs import configure_logging
from storage import users
from storage.migrations import migrate

from . import cli
from .app import hypercorn_config, open_store, prepare_storage, run_gateway
from .auth.passwords import HashCost, hash_password
from .config import ConfigError, Settings, bind_for


async def _serve(settings: Settings) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(run_gateway, settings, shutdown))
        pid_file = cli.write_pid_file(settings, binds)  # how `drain` finds this replica
        url = binds[0]
        print(f"\nZLH gateway listening on {url}", flush=True)
        print(f"  health:   curl {url}/health", flush=True)
        print(f"  API docs: {url}/openapi.json", flush=True)
        print("  first admin user: make admin   (or: .venv/bin/python -m control create-admin)", flush=True)
        if settings.demo_servers:
            print(f"  demo login: demo@zlh.local, password in {settings.data_dir / 'demo-password'} "
                  "(one game server and one dev container are being provisioned)", flush=True)
        print(f"  register: curl -s -X POST {url}/api/auth/register -H 'content-type: application/json' "
              "-d '{\"email\":\"me@example.com\",\"password\":\"correct horse battery\"}'\n", flush=True)
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    print("shutting down (draining open streams)…", flush=True)
                    shutdown.set()
                    break
        finally:
            pid_file.unlink(missing_ok=True)


async def _create_admin(settings: Settings, email: str, password: str) -> None:
    store = open_store(settings)
    try:
        await prepare_storage(settings, store)
        password_hash = await hash_password(password, HashCost.from_settings(settings))

        def create() -> str:
            existing = users.user_by_email(email)
            if existing is not None:
                users.set_role(existing.id, "admin")
                users.set_password(existing.id, password_hash)
                users.audit("user.promote_admin", None, f"user:{existing.id}")
                return f"updated {existing.email}: role admin, new password"
            user = users.create_user(email, password_hash, role="admin")
            users.audit("user.create_admin", None, f"user:{user.id}")
            return f"created admin {user.email} (id {user.id})"

        print(await store.run(create))
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zlh-gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="migrate and serve")
    run.add_argument("--port", type=int, help="port to listen on (overrides hypercorn.toml bind; host 127.0.0.1)")
    run.add_argument("--host", default=None, help="address to listen on (with the configured port unless --port)")
    sub.add_parser("migrate", help="apply database migrations")
    admin = sub.add_parser("create-admin", help="create (or promote) an admin user")
    admin.add_argument("--email")
    cli.add_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "config-reference":
        sys.exit(cli.config_reference(args))
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        if args.command == "run":
            settings.bind = bind_for(args.host, args.port, hypercorn_config(settings).bind)
    except ConfigError as exc:
        sys.exit(f"configuration error: {exc}")
    if args.command in cli.COMMANDS:
        sys.exit(cli.run_command(args, settings))
    if args.command == "run":
        trio.run(_serve, settings)
    elif args.command == "migrate":
        store = open_store(settings)
        applied = migrate(store.db)
        print(f"applied migrations: {applied or 'none (up to date)'}")
    elif args.command == "create-admin":
        email = args.email or input("admin email: ")
        password = os.environ.get("ZLH_ADMIN_PASSWORD") or getpass.getpass("password (min 8 chars): ")
        if len(password) < 8:
            sys.exit("password must be at least 8 characters")
        trio.run(_create_admin, settings, email, password)


if __name__ == "__main__":
    main()
