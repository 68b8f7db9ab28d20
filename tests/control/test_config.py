"""The settings object: every field settable from its environment variable with typed parsing, bad
values named, hypercorn.toml found where it is asked for and checked key by key, TLS refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from control.app import hypercorn_config
from control.config import PACKAGED_HYPERCORN_TOML, ConfigError, Settings, bind_for
from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parents[2]
# Every variable the README has documented; they must keep working.
README_VARIABLES = [
    "ZLH_DATA_DIR", "DATABASE_URL", "JWT_SECRET", "ZLH_BIND", "PUBLIC_URL", "IDE_DOMAIN", "DEV_IDE_RETURN_HOSTED_URL",
    "IDE_COOKIE_SECURE", "ZLH_PROVIDER", "ZLH_POLL_INTERVAL", "ZLH_CLUSTER", "PROXMOX_URL", "PROXMOX_TOKEN_ID",
    "PROXMOX_TOKEN_SECRET", "PROXMOX_NODE", "PROXMOX_TEMPLATE", "PROXMOX_STORAGE", "PROXMOX_BRIDGE", "PROXMOX_POOL",
    "PROXMOX_VERIFY_SSL", "PROXMOX_CA_BUNDLE", "PDNS_API_URL", "PDNS_API_KEY", "PDNS_ZONE", "PUBLIC_DOMAIN",
    "EDGE_PUBLIC_IP", "VELOCITY_CONFIG", "VELOCITY_RELOAD_COMMAND", "VELOCITY_RELOAD_URL", "PROMETHEUS_SD_TOKEN",
    "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "BILLING_GRACE_PERIOD", "ZLH_HYPERCORN_CONFIG", "ZLH_LOG_LEVEL",
    "ZLH_DEMO", "ZLH_ARGON2_TIME_COST", "ZLH_REPLICA_ID", "ZLH_CLUSTER_HEARTBEAT", "ZLH_CLUSTER_TAKEOVER_BOUND",
    "ZLH_CLUSTER_SLOTS", "ZLH_JOB_LEASE_TTL", "ZLH_CONSOLE_COMMANDS_PER_SECOND", "IDE_SESSION_TTL",
]


def settings_from(env: dict[str, str], tmp_path: Path, **overrides: object) -> Settings:
    return Settings.from_env(env={"JWT_SECRET": TEST_SECRET, **env}, data_dir=tmp_path, **overrides)


def test_every_setting_has_an_environment_variable_and_a_description() -> None:
    aliases = [field.alias for field in Settings.model_fields.values()]
    assert None not in aliases
    assert len(set(aliases)) == len(aliases)
    assert all(field.description for field in Settings.model_fields.values())
    assert set(README_VARIABLES) <= set(aliases)


def test_settings_that_could_not_be_set_before_are_parsed_from_the_environment(tmp_path: Path) -> None:
    s = settings_from({"ZLH_AGENT_TIMEOUT": "1.5", "ZLH_DB_THREADS": "3", "ZLH_ACCESS_TOKEN_TTL": "60",
                       "ZLH_REFRESH_TOKEN_TTL": "120", "ZLH_LOGIN_LIMIT_PER_ACCOUNT": "4",
                       "ZLH_LOGIN_LIMIT_PER_ADDRESS": "7", "ZLH_BIND": "127.0.0.1:1, [::1]:2",
                       "ZLH_LOCAL_AGENT_ARGS": "--game-command 'sleep 5'", "IDE_COOKIE_SECURE": "yes",
                       "ZLH_CONSOLE_LIMITS": '{"per_server_connections": 3}', "ZLH_POLL_INTERVAL": "2"}, tmp_path)
    assert (s.agent_timeout, s.db_threads, s.access_token_ttl, s.refresh_token_ttl) == (1.5, 3, 60, 120)
    assert (s.login_limit_per_account, s.login_limit_per_address, s.poll_interval) == (4, 7, 2.0)
    assert s.bind == ["127.0.0.1:1", "[::1]:2"]
    assert s.local_agent_args == ["--game-command", "sleep 5"]
    assert s.ide_cookie_secure is True and s.ide_cookie_is_secure
    assert s.console_limits.per_server_connections == 3 and s.console_limits.commands_per_second == 50.0


def test_legacy_console_rate_and_stripe_prices_still_apply(tmp_path: Path) -> None:
    s = settings_from({"ZLH_CONSOLE_COMMANDS_PER_SECOND": "5", "STRIPE_PRICE_PRO": "price_123"}, tmp_path)
    assert (s.console_limits.commands_per_second, s.console_limits.command_burst) == (5.0, 20)
    assert {p["name"]: p["stripe_price_id"] for p in s.plans}["pro"] == "price_123"


@pytest.mark.parametrize(("variable", "value"), [("ZLH_POLL_INTERVAL", "fast"), ("ZLH_DB_THREADS", "2.5"),
                                                 ("DEV_IDE_RETURN_HOSTED_URL", "maybe"), ("ZLH_PLANS", "[1]")])
def test_a_bad_value_is_an_error_naming_its_variable(tmp_path: Path, variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        settings_from({variable: value}, tmp_path)


def test_a_bad_secret_is_named_but_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env={"JWT_SECRET": "short-secret-value"}, data_dir=tmp_path)
    assert "JWT_SECRET" in str(raised.value) and "short-secret-value" not in str(raised.value)
    s = settings_from({"STRIPE_SECRET_KEY": "sk_live_hidden"}, tmp_path)
    assert "sk_live_hidden" not in repr(s) and TEST_SECRET not in repr(s)


def test_unknown_override_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="poll_intervall"):
        settings_from({}, tmp_path, poll_intervall=1)


def write_toml(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hypercorn.toml"
    path.write_text(text)
    return path


def test_hypercorn_toml_default_is_found_next_to_the_packages_not_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path, 'bind = ["127.0.0.1:1"]\n')  # a stray file in the cwd is not read
    s = settings_from({}, tmp_path / "data")
    assert s.hypercorn_path() == PACKAGED_HYPERCORN_TOML
    assert hypercorn_config(s).bind == ["127.0.0.1:8080"]


def test_missing_explicit_hypercorn_toml_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ZLH_HYPERCORN_CONFIG"):
        settings_from({"ZLH_HYPERCORN_CONFIG": str(tmp_path / "nope.toml")}, tmp_path).hypercorn_path()
    with pytest.raises(ConfigError, match="ZLH_CONFIG_DIR"):
        settings_from({"ZLH_CONFIG_DIR": str(tmp_path / "etc")}, tmp_path).hypercorn_path()


def test_config_dir_hypercorn_toml_keys_are_honoured(tmp_path: Path) -> None:
    write_toml(tmp_path / "etc", 'bind = "0.0.0.0:9001"\nh11_max_incomplete_size = 8192\ngraceful_timeout = 3\n'
               'keep_alive_timeout = 7\nread_timeout = 9\nbacklog = 17\naccesslog = "-"\n')
    config = hypercorn_config(settings_from({"ZLH_CONFIG_DIR": str(tmp_path / "etc")}, tmp_path))
    assert config.bind == ["0.0.0.0:9001"]
    assert (config.h11_max_incomplete_size, config.graceful_timeout, config.keep_alive_timeout) == (8192, 3, 7)
    assert (config.read_timeout, config.backlog, config.accesslog) == (9, 17, None)


@pytest.mark.parametrize("key", ["certfile", "keyfile", "ca_certs", "insecure_bind"])
def test_tls_keys_are_refused_with_the_reason_and_the_front_file(tmp_path: Path, key: str) -> None:
    path = write_toml(tmp_path / "etc", f'bind = ["127.0.0.1:0"]\n{key} = "x"\n')
    with pytest.raises(ConfigError) as raised:
        hypercorn_config(settings_from({"ZLH_HYPERCORN_CONFIG": str(path)}, tmp_path))
    message = str(raised.value)
    assert key in message and "load balancer" in message and "deploy/nginx.conf" in message


def test_a_key_the_front_server_does_not_honour_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "etc", 'bind = ["127.0.0.1:0"]\nworkers = 4\n')
    with pytest.raises(ConfigError, match="workers"):
        hypercorn_config(settings_from({"ZLH_HYPERCORN_CONFIG": str(path)}, tmp_path))


def test_host_without_port_keeps_the_configured_port() -> None:
    assert bind_for("0.0.0.0", None, ["127.0.0.1:8080"]) == ["0.0.0.0:8080"]
    assert bind_for(None, 9000, ["127.0.0.1:8080"]) == ["127.0.0.1:9000"]
    assert bind_for("::1", 9000, ["127.0.0.1:8080"]) == ["[::1]:9000"]
    assert bind_for(None, None, ["127.0.0.1:8080"]) == ["127.0.0.1:8080"]


def _run_gateway_process(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ["PATH"], "JWT_SECRET": TEST_SECRET, "ZLH_DATA_DIR": str(tmp_path / "data"),
            "ZLH_DEMO": "0", **env}
    return subprocess.run([sys.executable, "-m", "control", "run", *args], env=full, cwd=tmp_path,
                          check=False, capture_output=True, text=True, timeout=60)


def test_run_with_tls_in_hypercorn_toml_exits_with_the_reason_instead_of_listening_on_nothing(
        tmp_path: Path) -> None:
    path = write_toml(tmp_path / "etc", 'bind = ["127.0.0.1:0"]\ncertfile = "cert.pem"\nkeyfile = "key.pem"\n')
    done = _run_gateway_process(tmp_path, {"ZLH_HYPERCORN_CONFIG": str(path)})
    assert done.returncode != 0
    assert "TLS belongs to the load balancer" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "zlh.db").exists()  # stopped before anything started


def test_run_with_a_bad_number_exits_naming_the_variable(tmp_path: Path) -> None:
    done = _run_gateway_process(tmp_path, {"ZLH_AGENT_TIMEOUT": "soon"})
    assert done.returncode != 0 and "ZLH_AGENT_TIMEOUT" in done.stderr and "Traceback" not in done.stderr
