"""The embedded default's demo: on `make run`, a demo account with one game server and one dev
container on the local provider, so the README walkthrough has something to show. Its password is
generated once and kept in the data directory (mode 600); it is never printed to a log."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from storage import instances as store_instances
from storage import users

from .auth.passwords import HashCost, hash_password
from .instances import CreateInstance, provision_instance
from .services import Services

DEMO_EMAIL = "demo@zlh.local"


def _password_file(services: Services) -> Path:
    return services.settings.data_dir / "demo-password"


async def ensure_demo(services: Services) -> Path:
    """Create the demo account and its two servers unless they exist; return the password file."""
    path = _password_file(services)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(12))
    password = path.read_text().strip()
    user = await services.store.run(users.user_by_email, DEMO_EMAIL)
    if user is None:
        password_hash = await hash_password(password, HashCost.from_settings(services.settings))
        user = await services.store.run(users.create_user, DEMO_EMAIL, password_hash, "user", "pro")
    existing = await services.store.run(store_instances.list_instances, user.id)
    kinds = {instance.kind for instance in existing}
    for kind, name, engine in (("game", "demo-survival", "minecraft"), ("dev", "demo-workspace", "vscode")):
        if kind not in kinds:
            body = CreateInstance.model_validate({"kind": kind, "name": name, "engineType": engine,
                                                  "payload": {"ports": [25565]} if kind == "game" else {}})
            await provision_instance(services, user.id, body)
    return path
