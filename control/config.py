"""The one configuration object, read once from the environment at start-up. Nothing else reads
os.environ. Secrets here are never logged (Settings.__repr__ hides them)."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gateway.console import ConsoleLimits

DEFAULT_PLANS: list[dict[str, Any]] = [
    {"name": "free", "max_game_servers": 1, "max_dev_servers": 1, "max_cpu_cores": 2,
     "max_memory_mb": 4096, "max_disk_gb": 20, "max_upload_bytes": 5 * 1024**3, "stripe_price_id": None},
    {"name": "pro", "max_game_servers": 5, "max_dev_servers": 3, "max_cpu_cores": 8,
     "max_memory_mb": 32768, "max_disk_gb": 200, "max_upload_bytes": 50 * 1024**3, "stripe_price_id": None},
]

_SECRET_FIELDS = {"jwt_secret", "proxmox_token_secret", "pdns_api_key", "prometheus_sd_token",
                  "stripe_secret_key", "stripe_webhook_secret"}


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
    ide_session_ttl: int = 12 * 3600  # the IDE cookie's session, once a link token was traded
    ide_activity_interval: float = 5.0  # seconds between writes of IDE activity (idle auto-stop)
    # Dev environments API v1 (control/environments.py): stop a RUNNING environment after this many
    # seconds without activity (0 turns idle auto-stop off), checked every interval; a start/stop/delete
    # request waits this long for its operation before answering "in progress".
    environment_idle_timeout: float = 1800.0
    environment_idle_check_interval: float = 30.0
    environment_action_wait: float = 45.0
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
    # Proxmox provider (ZLH_PROVIDER=proxmox). The template is a VMID to clone or an ostemplate volume.
    proxmox_url: str = ""  # https://pve.example:8006
    proxmox_token_id: str = ""  # user@realm!tokenid
    proxmox_token_secret: str = ""
    proxmox_node: str = ""
    proxmox_verify_ssl: bool = True
    proxmox_ca_bundle: str = ""  # PEM file trusted instead of the system store
    proxmox_template: str = ""
    proxmox_storage: str = "local-lvm"
    proxmox_bridge: str = "vmbr0"
    proxmox_pool: str = ""
    proxmox_swap_mb: int = 512
    proxmox_timeout: float = 30.0  # one API call; must outlast PVE's own 10 s wait for a config lock
    proxmox_task_timeout: float = 600.0  # one PVE task (clone, create, start, …)
    proxmox_address_timeout: float = 120.0  # a started container's DHCP answer (IPv4 on eth0)
    proxmox_agent_port: int = 18888
    proxmox_ide_port: int = 8080
    # Edge publishing: all empty means the embedded default, which publishes nothing external.
    pdns_api_url: str = ""  # http://127.0.0.1:8081
    pdns_api_key: str = ""
    pdns_server_id: str = "localhost"
    pdns_zone: str = ""  # games.example.com
    public_domain: str = ""  # game host names live under this (defaults to the zone)
    edge_public_ip: str = ""  # what game and IDE host names resolve to
    dns_ttl: int = 60
    velocity_config: str = ""  # path of velocity.toml whose [servers] and [forced-hosts] we render
    velocity_reload_command: str = ""  # run after each render (shell words), e.g. an RCON "velocity reload"
    velocity_reload_url: str = ""  # or POSTed to after each render
    prometheus_sd_token: str = ""  # bearer for the http_sd endpoint; empty disables it
    agent_metrics_path: str = "/metrics"
    edge_retry_base: float = 2.0  # outbox backoff: base * 2**attempts, capped
    edge_retry_max: float = 300.0
    edge_call_timeout: float = 10.0
    # Job backend (control/jobs/): a lease lapses this long after the holding runner's last call;
    # a lapsed job is re-queued while attempts < max attempts (per pipeline, default below), else failed.
    job_lease_ttl: float = 30.0
    job_max_attempts: int = 2
    job_reap_interval: float = 2.0
    runner_offline_after: float = 60.0
    artifact_max_bytes: int = 2 * 1024**3
    source_timeout: float = 15.0
    update_feed_dir: Path | None = None  # release feed for update check/apply; default data_dir/release-feed
    ready_timeout: float = 120.0
    local_agent_args: list[str] = field(default_factory=list)
    local_stop_agents_on_exit: bool = False
    console_limits: ConsoleLimits = field(default_factory=ConsoleLimits)
    # Scale-out (control/cluster.py): several replicas on one PostgreSQL. "auto" partitions the poller
    # and elects a fleet leader on PostgreSQL; SQLite (one process) owns everything, as does "off".
    cluster: str = "auto"
    replica_id: str = ""  # default: host-pid-random, new each start
    cluster_heartbeat: float = 1.0  # seconds between heartbeats (lease renewals)
    cluster_takeover_bound: float = 10.0  # a dead replica's agents and operations are taken over within this
    cluster_slots: int = 128  # agent partitions (instance id modulo this); the same on every replica
    # Billing (control/billing/): empty STRIPE_SECRET_KEY means billing is not configured.
    stripe_secret_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""  # empty: Stripe itself
    stripe_timeout: float = 10.0
    stripe_webhook_tolerance: int = 300  # seconds a signed webhook stays acceptable
    billing_grace_period: int = 7 * 24 * 3600  # after a failed payment, before the plan lapses
    billing_renewal_notice: int = 3 * 24 * 3600  # how long before a renewal / period end to remind
    billing_interval: float = 300.0  # scheduler: seconds between reconcile + reminder rounds
    billing_return_url: str = ""  # where Checkout and the portal send the user back (default PUBLIC_URL/billing)

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
        if env.get("IDE_SESSION_TTL"):
            s.ide_session_ttl = int(env["IDE_SESSION_TTL"])
        for key, attr in (("ENVIRONMENT_IDLE_TIMEOUT", "environment_idle_timeout"),
                          ("ENVIRONMENT_IDLE_CHECK_INTERVAL", "environment_idle_check_interval"),
                          ("ENVIRONMENT_ACTION_WAIT", "environment_action_wait")):
            if env.get(key):
                setattr(s, attr, float(env[key]))
        s.provider = env.get("ZLH_PROVIDER", s.provider)
        s.poll_interval = float(env.get("ZLH_POLL_INTERVAL", s.poll_interval))
        s.hypercorn_config = Path(env.get("ZLH_HYPERCORN_CONFIG", str(s.hypercorn_config)))
        if env.get("ZLH_BIND"):
            s.bind = [b.strip() for b in env["ZLH_BIND"].split(",") if b.strip()]
        s.log_level = env.get("ZLH_LOG_LEVEL", s.log_level)
        s.stripe_secret_key = env.get("STRIPE_SECRET_KEY", "")
        s.stripe_webhook_secret = env.get("STRIPE_WEBHOOK_SECRET", "")
        s.stripe_api_base = env.get("STRIPE_API_BASE", "")
        s.billing_return_url = env.get("BILLING_RETURN_URL", "")
        for key, attr in (("BILLING_GRACE_PERIOD", "billing_grace_period"),
                          ("BILLING_RENEWAL_NOTICE", "billing_renewal_notice")):
            if env.get(key):
                setattr(s, attr, int(env[key]))
        if env.get("BILLING_INTERVAL"):
            s.billing_interval = float(env["BILLING_INTERVAL"])
        for plan in s.plans:  # STRIPE_PRICE_PRO=price_… sets the Stripe price of plan "pro"
            price = env.get(f"STRIPE_PRICE_{plan['name'].upper()}")
            if price:
                plan["stripe_price_id"] = price
        s.demo_servers = _flag(env.get("ZLH_DEMO"))
        if env.get("ZLH_CONSOLE_COMMANDS_PER_SECOND"):
            rate = float(env["ZLH_CONSOLE_COMMANDS_PER_SECOND"])
            s.console_limits = ConsoleLimits(commands_per_second=rate, command_burst=max(1, int(rate * 4)))
        if env.get("ZLH_SCRYPT_N"):
            s.scrypt_n = int(env["ZLH_SCRYPT_N"])
        s.job_lease_ttl = float(env.get("ZLH_JOB_LEASE_TTL", s.job_lease_ttl))
        s.job_max_attempts = int(env.get("ZLH_JOB_MAX_ATTEMPTS", s.job_max_attempts))
        s.artifact_max_bytes = int(env.get("ZLH_ARTIFACT_MAX_BYTES", s.artifact_max_bytes))
        if env.get("ZLH_UPDATE_FEED"):
            s.update_feed_dir = Path(env["ZLH_UPDATE_FEED"])
        _edge_from_env(s, env)
        s.cluster = env.get("ZLH_CLUSTER", s.cluster)
        s.replica_id = env.get("ZLH_REPLICA_ID", s.replica_id)
        s.cluster_heartbeat = float(env.get("ZLH_CLUSTER_HEARTBEAT", s.cluster_heartbeat))
        s.cluster_takeover_bound = float(env.get("ZLH_CLUSTER_TAKEOVER_BOUND", s.cluster_takeover_bound))
        s.cluster_slots = int(env.get("ZLH_CLUSTER_SLOTS", s.cluster_slots))
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
        if not self.replica_id:
            self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        if self.cluster not in ("auto", "on", "off"):
            raise ConfigError("ZLH_CLUSTER must be auto, on or off")
        if self.cluster_slots < 1:
            raise ConfigError("ZLH_CLUSTER_SLOTS must be at least 1")
        if self.cluster_lease_ttl < 3 * self.cluster_heartbeat:
            raise ConfigError("ZLH_CLUSTER_TAKEOVER_BOUND is too small for the heartbeat and poll catch-up "
                              f"(lease TTL {self.cluster_lease_ttl:.1f}s < 3 heartbeats)")

    @property
    def cluster_lease_ttl(self) -> float:
        """How long a slot or leader lease lasts after its last renewal. A dead replica's slot is
        claimed at most one heartbeat after it lapses and its agents are polled within the poller's
        catch-up spread (1 s), so TTL = bound - 2 heartbeats - 1 s (catch-up) - 1 s (slack)."""
        return self.cluster_takeover_bound - 2 * self.cluster_heartbeat - 2.0

    @property
    def ide_cookie_is_secure(self) -> bool:
        if self.ide_cookie_secure is not None:
            return self.ide_cookie_secure
        return self.public_url.startswith("https://")


def _edge_from_env(s: Settings, env: dict[str, str]) -> None:
    """Proxmox and edge-publishing settings: the env name is the field name upper-cased."""
    for name in ("proxmox_url", "proxmox_token_id", "proxmox_token_secret", "proxmox_node", "proxmox_ca_bundle",
                 "proxmox_template", "proxmox_storage", "proxmox_bridge", "proxmox_pool", "pdns_api_url",
                 "pdns_api_key", "pdns_server_id", "pdns_zone", "public_domain", "edge_public_ip",
                 "velocity_config", "velocity_reload_command", "velocity_reload_url", "prometheus_sd_token"):
        if name.upper() in env:
            setattr(s, name, env[name.upper()])
    for name in ("proxmox_swap_mb", "proxmox_agent_port", "proxmox_ide_port", "dns_ttl"):
        if name.upper() in env:
            setattr(s, name, int(env[name.upper()]))
    for name in ("proxmox_timeout", "proxmox_task_timeout", "proxmox_address_timeout", "edge_retry_base",
                 "edge_retry_max", "edge_call_timeout"):
        if name.upper() in env:
            setattr(s, name, float(env[name.upper()]))
    if "PROXMOX_VERIFY_SSL" in env:
        s.proxmox_verify_ssl = _flag(env["PROXMOX_VERIFY_SSL"])


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
