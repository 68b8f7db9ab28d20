"""The one configuration object, read once from the environment at start-up. Nothing else reads
os.environ. Secrets here are never logged (Settings.__repr__ hides them).

Every field is a setting: its environment variable is the field's alias, its meaning the field's
description, and pydantic parses the value to the field's type, so a bad value is an error that names
the variable (ConfigError). Adding a setting is one field: `name: type = setting(default, "ENV_NAME",
"what it means")`. `python -m control config-reference` writes docs/configuration.md from these fields
(tests/control/test_config_reference.py fails when that file is stale).

Why pydantic and not pydantic-settings: `Settings.from_env(env=…)` must read an explicit mapping (tests
and the CLI do), which pydantic-settings only offers through a private method of its env source; the
env source's one other service, JSON for complex values, is the two small validators below.

Also here: hypercorn.toml, the server settings a deployer edits. Only the keys the front server honours
are accepted (HONOURED_SERVER_KEYS); TLS keys are refused because TLS belongs to the load balancer (the
front server does descriptor I/O and splices bulk bytes, neither of which works under TLS)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import shlex
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import to_jsonable_python

from gateway.console import ConsoleLimits
from gateway.forwarded import trusted_networks

log = logging.getLogger("zlh.config")

DEFAULT_PLANS: list[dict[str, Any]] = [
    {"name": "free", "max_game_servers": 1, "max_dev_servers": 1, "max_cpu_cores": 2,
     "max_memory_mb": 4096, "max_disk_gb": 20, "max_upload_bytes": 5 * 1024**3, "stripe_price_id": None},
    {"name": "pro", "max_game_servers": 5, "max_dev_servers": 3, "max_cpu_cores": 8,
     "max_memory_mb": 32768, "max_disk_gb": 200, "max_upload_bytes": 50 * 1024**3, "stripe_price_id": None},
]

_SECRET_FIELDS = {"jwt_secret", "proxmox_token_secret", "pdns_api_key", "prometheus_sd_token",
                  "stripe_secret_key", "stripe_webhook_secret"}

# The repository's hypercorn.toml, found next to the packages (not in the working directory).
PACKAGED_HYPERCORN_TOML = Path(__file__).resolve().parent.parent / "hypercorn.toml"
NGINX_FRONT = "deploy/nginx.conf"

# hypercorn.toml keys the front server (gateway/server.py) reads. Anything else is refused at start
# (IGNORED_SERVER_KEYS are accepted and documented as ignored) so that no setting is silently dropped.
HONOURED_SERVER_KEYS: dict[str, str] = {
    "bind": "listen addresses, host:port (ZLH_BIND / --host / --port override)",
    "backlog": "listen backlog of each socket",
    "keep_alive_timeout": "seconds an idle keep-alive connection stays open",
    "graceful_timeout": "seconds in-flight requests get to finish on shutdown or drain",
    "read_timeout": "seconds to wait for the first bytes of a request on a new connection",
    "h11_max_incomplete_size": "largest request head accepted (bytes)",
}
IGNORED_SERVER_KEYS: dict[str, str] = {
    "accesslog": "the gateway writes its own access log (one structured line per request, secrets redacted)",
    "errorlog": "the gateway logs through Python logging (ZLH_LOG_LEVEL)",
    "loglevel": "use ZLH_LOG_LEVEL",
    "access_log_format": "the gateway's access log has a fixed structured format",
}
TLS_SERVER_KEYS = frozenset({"certfile", "keyfile", "keyfile_password", "ca_certs", "ciphers", "verify_mode",
                             "verify_flags", "cert_reqs", "alpn_protocols", "insecure_bind", "quic_bind"})


class ConfigError(Exception):
    pass


def setting(default: Any = None, env: str | None = None, doc: str = "", **kwargs: Any) -> Any:
    """One setting: its default, its environment variable (None: not settable from the environment),
    and what it means (the configuration reference prints it)."""
    if "default_factory" in kwargs:
        return Field(alias=env, description=doc, **kwargs)
    return Field(default, alias=env, description=doc, **kwargs)


def _words(value: Any) -> Any:
    """A list from the environment: a JSON array, else comma-separated (or shell words for argv)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _argv(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        return json.loads(text) if text.startswith("[") else shlex.split(text)
    return value


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


CommaList = Annotated[list[str], BeforeValidator(_words)]
Argv = Annotated[list[str], BeforeValidator(_argv)]
JsonPlans = Annotated[list[dict[str, Any]], BeforeValidator(_json)]
JsonConsoleLimits = Annotated[ConsoleLimits, BeforeValidator(_json)]


class Settings(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", arbitrary_types_allowed=True)

    data_dir: Path = setting(Path("data"), "ZLH_DATA_DIR",
                             "SQLite file, generated signing key, mail outbox, local containers, pid files")
    database_url: str = setting("", "DATABASE_URL", "`postgresql://user:pass@host/db`; default SQLite "
                                "`<data>/zlh.db`")
    jwt_secret: str = setting("", "JWT_SECRET", "signing key, >= 32 bytes; per-kind keys are derived from it. "
                              "Default: generated once into `<data>/jwt.secret`")
    jwt_issuer: str = setting("zlh-gateway", "ZLH_JWT_ISSUER", "JWT issuer (the same on every replica)")
    access_token_ttl: int = setting(900, "ZLH_ACCESS_TOKEN_TTL", "seconds an access token is valid")
    refresh_token_ttl: int = setting(30 * 24 * 3600, "ZLH_REFRESH_TOKEN_TTL", "seconds a refresh token is valid")
    ide_token_ttl: int = setting(300, "ZLH_IDE_TOKEN_TTL", "seconds an IDE link token is valid")
    console_token_ttl: int = setting(300, "ZLH_CONSOLE_TOKEN_TTL", "seconds a console token is valid")
    password_reset_ttl: int = setting(1800, "ZLH_PASSWORD_RESET_TTL", "seconds a password-reset token is valid")
    session_resync_interval: float = setting(
        10.0, "ZLH_SESSION_RESYNC", "seconds between re-reads of ended sessions from the database (bounds how long "
        "a missed cross-replica event can go unseen; control/sessions.py)")
    # Password hashing, argon2id (control/auth/passwords.py): RFC 9106's second recommended option.
    argon2_time_cost: int = setting(3, "ZLH_ARGON2_TIME_COST", "argon2id passes of a password hash")
    argon2_memory_kib: int = setting(64 * 1024, "ZLH_ARGON2_MEMORY_KIB", "argon2id memory of a password hash (KiB)")
    argon2_parallelism: int = setting(4, "ZLH_ARGON2_PARALLELISM", "argon2id lanes of a password hash")
    login_limit_per_account: int = setting(10, "ZLH_LOGIN_LIMIT_PER_ACCOUNT",
                                           "failed logins per account within the rate-limit window")
    login_limit_per_address: int = setting(50, "ZLH_LOGIN_LIMIT_PER_ADDRESS",
                                           "failed logins per client address within the rate-limit window")
    rate_limit_window: int = setting(300, "ZLH_RATE_LIMIT_WINDOW", "seconds of the login rate-limit window")
    trusted_proxies: CommaList = setting(
        env="ZLH_TRUSTED_PROXIES", default_factory=list,
        doc="reverse proxies (CIDRs) whose X-Forwarded-For / Forwarded name the client; empty: the TCP peer is the "
            "client. Rate limits and access logs key on that address")
    public_url: str = setting("", "PUBLIC_URL", "the gateway's public URL; `https://…` makes IDE cookies Secure")
    ide_domain: str = setting("ide.localhost", "IDE_DOMAIN", "hosted IDEs answer on `dev-<id>.<IDE_DOMAIN>`")
    dev_ide_return_hosted_url: bool = setting(False, "DEV_IDE_RETURN_HOSTED_URL",
                                              "ide-token answers the hosted URL instead of the tunnel path")
    ide_cookie_secure: bool | None = setting(None, "IDE_COOKIE_SECURE",
                                             "force the IDE cookie's Secure flag (default: from PUBLIC_URL)")
    ide_session_ttl: int = setting(12 * 3600, "IDE_SESSION_TTL",
                                   "seconds the IDE cookie's session lasts once a link token was traded")
    ide_activity_interval: float = setting(5.0, "ZLH_IDE_ACTIVITY_INTERVAL",
                                           "seconds between writes of IDE activity (idle auto-stop)")
    environment_idle_timeout: float = setting(1800.0, "ENVIRONMENT_IDLE_TIMEOUT",
                                              "dev environments API: stop a RUNNING environment after this many "
                                              "seconds without activity (0: never)")
    environment_idle_check_interval: float = setting(30.0, "ENVIRONMENT_IDLE_CHECK_INTERVAL",
                                                     "seconds between idle auto-stop checks")
    environment_action_wait: float = setting(45.0, "ENVIRONMENT_ACTION_WAIT",
                                             "seconds a start/stop/delete waits before answering in progress")
    provider: str = setting("local", "ZLH_PROVIDER", "`local` (agent processes on this machine) or `proxmox`")
    poll_interval: float = setting(5.0, "ZLH_POLL_INTERVAL", "seconds between agent polls")
    agent_timeout: float = setting(3.0, "ZLH_AGENT_TIMEOUT", "seconds one agent call may take")
    config_dir: Path | None = setting(None, "ZLH_CONFIG_DIR", "directory holding `hypercorn.toml`")
    hypercorn_config: Path | None = setting(
        None, "ZLH_HYPERCORN_CONFIG", "explicit path of hypercorn.toml (must exist). Default: "
        "`<ZLH_CONFIG_DIR>/hypercorn.toml`, else the one shipped next to the packages")
    bind: CommaList = setting(env="ZLH_BIND", doc="`host:port[,host:port]`, overrides hypercorn.toml's bind",
                              default_factory=list)
    log_level: str = setting("INFO", "ZLH_LOG_LEVEL", "Python log level")
    db_threads: int = setting(8, "ZLH_DB_THREADS", "database worker threads (and pooled connections - 4)")
    plans: JsonPlans = setting(env="ZLH_PLANS", doc="plans as a JSON array (see DEFAULT_PLANS); "
                               "`STRIPE_PRICE_<PLAN>` sets one plan's Stripe price",
                               default_factory=lambda: [dict(p) for p in DEFAULT_PLANS])
    default_plan: str = setting("free", "ZLH_DEFAULT_PLAN", "plan of a new account")
    demo_servers: bool = setting(False, "ZLH_DEMO", "provision the demo account and servers (`make run` sets 1)")
    # Proxmox provider (ZLH_PROVIDER=proxmox). The template is a VMID to clone or an ostemplate volume.
    proxmox_url: str = setting("", "PROXMOX_URL", "`https://pve.example:8006`")
    proxmox_token_id: str = setting("", "PROXMOX_TOKEN_ID", "`user@realm!tokenid`")
    proxmox_token_secret: str = setting("", "PROXMOX_TOKEN_SECRET", "API token secret")
    proxmox_node: str = setting("", "PROXMOX_NODE", "node containers are created on")
    proxmox_verify_ssl: bool = setting(True, "PROXMOX_VERIFY_SSL", "verify PVE's certificate")
    proxmox_ca_bundle: str = setting("", "PROXMOX_CA_BUNDLE", "PEM file trusted instead of the system store")
    proxmox_template: str = setting("", "PROXMOX_TEMPLATE", "VMID to clone or an ostemplate volume")
    proxmox_storage: str = setting("local-lvm", "PROXMOX_STORAGE", "storage of new root disks")
    proxmox_bridge: str = setting("vmbr0", "PROXMOX_BRIDGE", "network bridge of new containers")
    proxmox_pool: str = setting("", "PROXMOX_POOL", "resource pool of new containers")
    proxmox_swap_mb: int = setting(512, "PROXMOX_SWAP_MB", "swap of new containers (MB)")
    proxmox_timeout: float = setting(30.0, "PROXMOX_TIMEOUT", "seconds one PVE API call may take; must outlast "
                                     "PVE's own 10 s wait for a config lock")
    proxmox_task_timeout: float = setting(600.0, "PROXMOX_TASK_TIMEOUT", "seconds one PVE task may take")
    proxmox_address_timeout: float = setting(120.0, "PROXMOX_ADDRESS_TIMEOUT",
                                             "seconds a started container's DHCP answer (IPv4 on eth0) may take")
    proxmox_agent_port: int = setting(18888, "PROXMOX_AGENT_PORT", "agent port inside a container")
    proxmox_ide_port: int = setting(8080, "PROXMOX_IDE_PORT", "code-server port inside a dev container")
    # Edge publishing: all empty means the embedded default, which publishes nothing external.
    pdns_api_url: str = setting("", "PDNS_API_URL", "PowerDNS HTTP API, `http://127.0.0.1:8081`")
    pdns_api_key: str = setting("", "PDNS_API_KEY", "PowerDNS API key")
    pdns_server_id: str = setting("localhost", "PDNS_SERVER_ID", "PowerDNS server id")
    pdns_zone: str = setting("", "PDNS_ZONE", "zone records are published in, `games.example.com`")
    public_domain: str = setting("", "PUBLIC_DOMAIN", "game host names live under this (default: the zone)")
    edge_public_ip: str = setting("", "EDGE_PUBLIC_IP", "what game and IDE host names resolve to")
    dns_ttl: int = setting(60, "DNS_TTL", "TTL of published records")
    velocity_config: str = setting("", "VELOCITY_CONFIG", "velocity.toml whose [servers]/[forced-hosts] we render")
    velocity_reload_command: str = setting("", "VELOCITY_RELOAD_COMMAND", "run after each render (shell words)")
    velocity_reload_url: str = setting("", "VELOCITY_RELOAD_URL", "or POSTed to after each render")
    prometheus_sd_token: str = setting("", "PROMETHEUS_SD_TOKEN", "bearer of the http_sd endpoint; empty disables")
    agent_metrics_path: str = setting("/metrics", "AGENT_METRICS_PATH", "agents' metrics path published to SD")
    edge_retry_base: float = setting(2.0, "EDGE_RETRY_BASE", "outbox backoff: base * 2**attempts seconds")
    edge_retry_max: float = setting(300.0, "EDGE_RETRY_MAX", "outbox backoff cap, seconds")
    edge_call_timeout: float = setting(10.0, "EDGE_CALL_TIMEOUT", "seconds one DNS/Velocity call may take")
    # Job backend (control/jobs/): a lease lapses this long after the holding runner's last call;
    # a lapsed job is re-queued while attempts < max attempts (per pipeline, default below), else failed.
    job_lease_ttl: float = setting(30.0, "ZLH_JOB_LEASE_TTL", "seconds a job lease lasts after the runner's call")
    job_max_attempts: int = setting(2, "ZLH_JOB_MAX_ATTEMPTS", "attempts of a job whose lease lapsed")
    job_reap_interval: float = setting(2.0, "ZLH_JOB_REAP_INTERVAL", "seconds between lapsed-lease checks")
    runner_offline_after: float = setting(60.0, "ZLH_RUNNER_OFFLINE_AFTER", "seconds without a heartbeat")
    artifact_max_bytes: int = setting(2 * 1024**3, "ZLH_ARTIFACT_MAX_BYTES", "largest job artifact")
    jobs_allowed_sources: CommaList = setting(
        env="ZLH_JOBS_ALLOWED_SOURCES", default_factory=list,
        doc="job backend: CIDRs (private forges; plain `http://` only there) and/or `local` (paths, `file://`) a "
            "project repository or vault connection may point at besides public https/ssh hosts")
    source_timeout: float = setting(15.0, "ZLH_SOURCE_TIMEOUT", "seconds a project source fetch may take")
    update_feed_dir: Path | None = setting(None, "ZLH_UPDATE_FEED", "release feed for update check/apply "
                                           "(default `<data>/release-feed`)")
    ready_timeout: float = setting(120.0, "ZLH_READY_TIMEOUT", "seconds a provisioning waits for readiness")
    local_agent_args: Argv = setting(env="ZLH_LOCAL_AGENT_ARGS", doc="local provider: extra arguments of every "
                                     "agent (shell words)", default_factory=list)
    local_ide_command: str = setting(
        "", "ZLH_LOCAL_IDE_COMMAND", "local provider: the IDE a dev container runs, a command template with "
        "`{port}` and `{data}` (e.g. `make code-server` prints one for code-server); empty: the built-in "
        "stand-in")
    local_stop_agents_on_exit: bool = setting(
        True, "ZLH_LOCAL_STOP_AGENTS_ON_EXIT", "local provider: stop agents on a clean shutdown (they are "
        "restarted on the next start); 0 keeps them running to show re-adoption")
    console_limits: JsonConsoleLimits = setting(env="ZLH_CONSOLE_LIMITS", doc="console limits as a JSON object "
                                                "(fields of gateway.console.ConsoleLimits)",
                                                default_factory=ConsoleLimits)
    console_commands_per_second: float | None = setting(
        None, "ZLH_CONSOLE_COMMANDS_PER_SECOND", "console commands per second per connection (burst 4x)")
    # Scale-out (control/cluster.py): several replicas on one PostgreSQL. "auto" partitions the poller
    # and elects a fleet leader on PostgreSQL; SQLite (one process) owns everything, as does "off".
    cluster: str = setting("auto", "ZLH_CLUSTER", "`auto` (on with PostgreSQL), `on` or `off`")
    replica_id: str = setting("", "ZLH_REPLICA_ID", "this replica's name (default: host-pid-random)")
    cluster_heartbeat: float = setting(0.5, "ZLH_CLUSTER_HEARTBEAT", "seconds between heartbeats (lease renewals)")
    cluster_lease_ttl: float = setting(
        3.0, "ZLH_CLUSTER_LEASE_TTL", "seconds a slot or leader lease lasts after its last renewal: a killed "
        "replica's agents are polled again this long after its last heartbeat plus the poller's 1 s catch-up")
    cluster_takeover_bound: float = setting(10.0, "ZLH_CLUSTER_TAKEOVER_BOUND",
                                            "a dead replica's agents and operations are taken over within this")
    cluster_slots: int = setting(128, "ZLH_CLUSTER_SLOTS", "agent partitions; the same on every replica")
    # Billing (control/billing/): empty STRIPE_SECRET_KEY means billing is not configured.
    stripe_secret_key: str = setting("", "STRIPE_SECRET_KEY", "empty: billing not configured")
    stripe_webhook_secret: str = setting("", "STRIPE_WEBHOOK_SECRET", "verifies POST /api/billing/webhook")
    stripe_api_base: str = setting("", "STRIPE_API_BASE", "empty: Stripe itself")
    stripe_timeout: float = setting(10.0, "STRIPE_TIMEOUT", "seconds one Stripe call may take")
    stripe_webhook_tolerance: int = setting(300, "STRIPE_WEBHOOK_TOLERANCE", "seconds a signed webhook is valid")
    billing_grace_period: int = setting(7 * 24 * 3600, "BILLING_GRACE_PERIOD",
                                        "seconds after a failed payment before the plan lapses")
    billing_renewal_notice: int = setting(3 * 24 * 3600, "BILLING_RENEWAL_NOTICE",
                                          "seconds before a renewal / period end to remind")
    billing_interval: float = setting(300.0, "BILLING_INTERVAL", "seconds between reconcile + reminder rounds")
    billing_return_url: str = setting("", "BILLING_RETURN_URL", "where Checkout sends the user back "
                                      "(default PUBLIC_URL/billing)")

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, ("[redacted]" if name in _SECRET_FIELDS else value)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `env` (default os.environ) with `overrides` by field name (tests)."""
        env = dict(os.environ if env is None else env)
        by_env = {f.alias: name for name, f in cls.model_fields.items() if f.alias}
        values: dict[str, Any] = {by_env[key]: value for key, value in env.items() if key in by_env and value != ""}
        from_environment = set(values)
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        values.update(overrides)
        try:
            s = cls.model_validate(values, by_name=True)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                name = str(error["loc"][0]) if error["loc"] else "?"
                where = cls.model_fields[name].alias if name in from_environment else name
                problems.append(f"{where}: {error['msg']} (got {_shown(name, error.get('input'))})")
            raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
        for plan in s.plans:  # STRIPE_PRICE_PRO=price_… sets the Stripe price of plan "pro"
            price = env.get(f"STRIPE_PRICE_{plan['name'].upper()}")
            if price:
                plan["stripe_price_id"] = price
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
        if (self.argon2_time_cost < 1 or self.argon2_parallelism < 1
                or self.argon2_memory_kib < 8 * self.argon2_parallelism):
            raise ConfigError("argon2: time cost and parallelism >= 1, memory >= 8 KiB per lane")
        try:
            trusted_networks(tuple(self.trusted_proxies))
        except ValueError as exc:
            raise ConfigError(f"ZLH_TRUSTED_PROXIES: {exc}") from None
        if self.console_commands_per_second is not None:
            rate = self.console_commands_per_second
            self.console_limits = ConsoleLimits(**{**self.console_limits.__dict__, "commands_per_second": rate,
                                                   "command_burst": max(1, int(rate * 4))})
        if not self.replica_id:
            self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        if self.provider not in ("local", "proxmox"):
            raise ConfigError("ZLH_PROVIDER must be local or proxmox")
        if self.cluster not in ("auto", "on", "off"):
            raise ConfigError("ZLH_CLUSTER must be auto, on or off")
        if self.cluster_slots < 1:
            raise ConfigError("ZLH_CLUSTER_SLOTS must be at least 1")
        if self.cluster_lease_ttl < 3 * self.cluster_heartbeat:
            raise ConfigError(f"ZLH_CLUSTER_LEASE_TTL ({self.cluster_lease_ttl:.1f}s) must last at least 3 heartbeats "
                              f"({self.cluster_heartbeat:.1f}s each)")
        if self.cluster_lease_ttl + self.cluster_heartbeat + 2.0 > self.cluster_takeover_bound:
            raise ConfigError("ZLH_CLUSTER_TAKEOVER_BOUND is too small: a lapsed lease is claimed within a heartbeat "
                              "and its agents are polled within the 1 s catch-up (+1 s slack), so the bound must be "
                              f"at least {self.cluster_lease_ttl + self.cluster_heartbeat + 2.0:.1f}s")
        for entry in self.jobs_allowed_sources:  # a typo must stop start-up, not silently allow nothing
            if entry != "local":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ConfigError(f"ZLH_JOBS_ALLOWED_SOURCES: {entry!r} is neither a CIDR nor `local`") from None
        if self.local_ide_command and "{port}" not in self.local_ide_command:
            raise ConfigError("ZLH_LOCAL_IDE_COMMAND must contain {port} (the IDE port the agent assigns)")

    @property
    def ide_cookie_is_secure(self) -> bool:
        if self.ide_cookie_secure is not None:
            return self.ide_cookie_secure
        return self.public_url.startswith("https://")

    def hypercorn_path(self) -> Path:
        """Which hypercorn.toml: the explicit path, else the config dir's, else the packaged one. A file
        that was named but is missing is an error, never a silent fall-back to Hypercorn's defaults."""
        if self.hypercorn_config is not None:
            path, why = Path(self.hypercorn_config), "ZLH_HYPERCORN_CONFIG"
        elif self.config_dir is not None:
            path, why = Path(self.config_dir) / "hypercorn.toml", "ZLH_CONFIG_DIR"
        else:
            path, why = PACKAGED_HYPERCORN_TOML, "the default (next to the packages)"
        if not path.is_file():
            raise ConfigError(f"hypercorn.toml not found at {path} ({why}); set ZLH_HYPERCORN_CONFIG to a file "
                              "or ZLH_CONFIG_DIR to a directory holding hypercorn.toml")
        return path

    def server_options(self) -> dict[str, Any]:
        """hypercorn.toml, checked: only the keys the front server honours, binds overridden by
        ZLH_BIND / the command line."""
        path = self.hypercorn_path()
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        tls = sorted(TLS_SERVER_KEYS & set(data))
        if tls:
            raise ConfigError(f"{path}: {', '.join(tls)}: TLS belongs to the load balancer in front of the gateway "
                              "(the front server does direct descriptor I/O and zero-copy splicing, which TLS "
                              f"cannot go through). Terminate TLS there, e.g. with {NGINX_FRONT}, and remove "
                              "these keys.")
        unknown = sorted(set(data) - set(HONOURED_SERVER_KEYS) - set(IGNORED_SERVER_KEYS))
        if unknown:
            raise ConfigError(f"{path}: {', '.join(unknown)} not honoured by the gateway's front server "
                              f"(honoured: {', '.join(HONOURED_SERVER_KEYS)}; see docs/configuration.md)")
        for key in sorted(set(IGNORED_SERVER_KEYS) & set(data)):
            if data[key]:
                log.warning("hypercorn.toml %s is ignored: %s", key, IGNORED_SERVER_KEYS[key])
            del data[key]
        if isinstance(data.get("bind"), str):
            data["bind"] = [data["bind"]]
        if self.bind:
            data["bind"] = list(self.bind)
        if not data.get("bind"):
            raise ConfigError(f"{path}: no bind address (set bind, ZLH_BIND or --port)")
        return data


def bind_for(host: str | None, port: int | None, configured: list[str]) -> list[str]:
    """The binds `run --host/--port` ask for: a port alone keeps loopback, a host alone keeps the
    configured port(s)."""
    if port is not None:
        return [f"{_bracket(host or '127.0.0.1')}:{port}"]
    if host is not None:
        return [f"{_bracket(host)}:{bind.rsplit(':', 1)[1]}" for bind in configured]
    return configured


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _shown(name: str, value: Any) -> str:
    return "[redacted]" if name in _SECRET_FIELDS else repr(value)


def configuration_reference() -> str:
    """docs/configuration.md: every setting, generated from the Settings fields."""
    lines = ["# Configuration reference", "",
             "Generated by `python -m control config-reference` from `control/config.py`; do not edit by hand.",
             "Every setting is read once at start from the environment. A bad value stops the start with an",
             "error naming the variable. Lists take a JSON array or comma-separated values (agent arguments:",
             "shell words); objects take JSON.", "",
             "## Environment", "", "| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        shown = "" if default in ("", None, []) else f"`{json.dumps(to_jsonable_python(default))}`"
        if name == "plans":
            shown = "free, pro (`DEFAULT_PLANS`)"
        lines.append(f"| `{field.alias}` | {shown} | {field.description} |")
    lines += ["| `STRIPE_PRICE_<PLAN>` | | Stripe price id of plan `<PLAN>` (e.g. `STRIPE_PRICE_PRO`) |", "",
              "## hypercorn.toml", "",
              "Found at `ZLH_HYPERCORN_CONFIG`, else `$ZLH_CONFIG_DIR/hypercorn.toml`, else the file shipped next",
              "to the packages; a named file that is missing is an error. Any key not listed here is refused at",
              "start. TLS keys (" + ", ".join(f"`{k}`" for k in sorted(TLS_SERVER_KEYS)) + ") are refused:",
              f"TLS belongs to the load balancer (`{NGINX_FRONT}`).", "",
              "| key | honoured | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | yes | {doc} |" for key, doc in HONOURED_SERVER_KEYS.items()]
    lines += [f"| `{key}` | ignored | {doc} |" for key, doc in IGNORED_SERVER_KEYS.items()]
    return "\n".join(lines) + "\n"


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
