"""The one configuration object, read once from the environment at start-up. Nothing else reads
os.environ. Secrets here are never logged (Settings.__repr__ hides them)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_PLANS: list[dict[str, Any]] = [
    {"name": "free", "max_game_servers": 1, "max_dev_servers": 1, "max_cpu_cores": 2,
     "max_memory_mb": 4096, "max_disk_gb": 20, "max_upload_bytes": 5 * 1024**3, "stripe_price_id": None},
    {"name": "pro", "max_game_servers": 5, "max_dev_servers": 3, "max_cpu_cores": 8,
     "max_memory_mb": 32768, "max_disk_gb": 200, "max_upload_bytes": 50 * 1024**3, "stripe_price_id": None},
]

_SECRET_FIELDS = {"jwt_secret"}


class ConfigError(Exception):
    pass


@dataclass
class Settings:
    data_dir: Path = Path("data")
    database_url: str = ""
    jwt_secret: str = ""
    jwt_issuer: str = "zlh-gateway"
    access_token_ttl: int = 900
    refresh_token_ttl: int = 30 * 24 * 3600
    ide_token_ttl: int = 300
    console_token_ttl: int = 300
    password_reset_ttl: int = 1800
    scrypt_n: int = 2**15
    login_limit_per_account: int = 10
    login_limit_per_address: int = 50
    rate_limit_window: int = 300
    public_url: str = ""
    ide_domain: str = "ide.localhost"
    dev_ide_return_hosted_url: bool = False
    ide_cookie_secure: bool | None = None
    provider: str = "local"
    poll_interval: float = 5.0
    agent_timeout: float = 3.0
    hypercorn_config: Path = Path("hypercorn.toml")
    bind: list[str] = field(default_factory=list)
    log_level: str = "INFO"
    db_threads: int = 8
    plans: list[dict[str, Any]] = field(default_factory=lambda: [dict(p) for p in DEFAULT_PLANS])
    default_plan: str = "free"
    demo_servers: bool = False

    def __repr__(self) -> str:
        shown = {f.name: ("[redacted]" if f.name in _SECRET_FIELDS else getattr(self, f.name)) for f in fields(self)}
        return f"Settings({shown})"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        s = cls()
        s.data_dir = Path(env.get("ZLH_DATA_DIR", str(s.data_dir)))
        s.database_url = env.get("DATABASE_URL", "")
        s.jwt_secret = env.get("JWT_SECRET", "")
        s.public_url = env.get("PUBLIC_URL", "")
        s.ide_domain = env.get("IDE_DOMAIN", s.ide_domain)
        s.dev_ide_return_hosted_url = _flag(env.get("DEV_IDE_RETURN_HOSTED_URL"))
        if "IDE_COOKIE_SECURE" in env:
            s.ide_cookie_secure = _flag(env["IDE_COOKIE_SECURE"])
        s.provider = env.get("ZLH_PROVIDER", s.provider)
        s.poll_interval = float(env.get("ZLH_POLL_INTERVAL", s.poll_interval))
        s.hypercorn_config = Path(env.get("ZLH_HYPERCORN_CONFIG", str(s.hypercorn_config)))
        if env.get("ZLH_BIND"):
            s.bind = [b.strip() for b in env["ZLH_BIND"].split(",") if b.strip()]
        s.log_level = env.get("ZLH_LOG_LEVEL", s.log_level)
        if env.get("ZLH_SCRYPT_N"):
            s.scrypt_n = int(env["ZLH_SCRYPT_N"])
        for key, value in overrides.items():
            setattr(s, key, value)
        s.finish()
        return s

    def finish(self) -> None:
        """Fill derived defaults and check what must hold before anything starts."""
        self.data_dir = Path(self.data_dir)
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'zlh.db').resolve()}"
        if not self.jwt_secret:
            self.jwt_secret = _persistent_secret(self.data_dir / "jwt.secret")
        if len(self.jwt_secret.encode()) < 32:
            raise ConfigError("JWT_SECRET must be at least 32 bytes")
        if self.scrypt_n < 2 or self.scrypt_n & (self.scrypt_n - 1):
            raise ConfigError("scrypt N must be a power of two")

    @property
    def ide_cookie_is_secure(self) -> bool:
        if self.ide_cookie_secure is not None:
            return self.ide_cookie_secure
        return self.public_url.startswith("https://")


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _persistent_secret(path: Path) -> str:
    """The embedded default: a random signing key made once and kept (mode 600) in the data dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    return value
