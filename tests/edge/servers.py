"""Real PowerDNS and Prometheus for the edge tests: installed from Debian packages when missing
(unattended; services are kept from auto-starting during the install), then started here on free
loopback ports with their own config and data under a temp dir, and stopped by the test that started
them. `python -m tests.edge.servers install` is the Makefile's install step.

Free ports come from binding port 0 and closing it: these daemons take a port number, not a socket."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PACKAGES = {"pdns_server": "pdns-server", "prometheus": "prometheus", "dig": "dnsutils"}
SQLITE_SCHEMA = Path("/usr/share/doc/pdns-backend-sqlite3/schema.sqlite3.sql")
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def ensure_installed() -> None:
    """Install PowerDNS (with its SQLite backend), Prometheus and dig if any is missing."""
    packages = [pkg for binary, pkg in PACKAGES.items() if shutil.which(binary) is None]
    if not SQLITE_SCHEMA.exists():
        packages.append("pdns-backend-sqlite3")
    if not packages:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Keep the packages' own services from starting: the tests start their own copies.
    made_policy = not POLICY_RC.exists()
    if made_policy:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdin=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                        "-o", "DPkg::Lock::Timeout=300", *packages],
                       check=True, env=env, stdin=subprocess.DEVNULL)
    finally:
        if made_policy:
            POLICY_RC.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f}s")


class Daemon:
    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str]) -> None:
        with open(self.dir / "log", "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.dir)

    def log_tail(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class PowerDnsServer(Daemon):
    """pdns_server with the gsqlite3 backend, DNS on 127.0.0.1:dns_port, API on api_url."""

    def __init__(self, api_key: str = "pdns-test-key") -> None:
        super().__init__("zlh-pdns-")
        self.api_key = api_key
        self.dns_port = free_port()
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        database = self.dir / "pdns.sqlite3"
        with sqlite3.connect(database) as db:
            db.executescript(SQLITE_SCHEMA.read_text())
        (self.dir / "pdns.conf").write_text("\n".join([
            "launch=gsqlite3", f"gsqlite3-database={database}",
            "local-address=127.0.0.1", f"local-port={self.dns_port}",
            "api=yes", f"api-key={self.api_key}", "webserver=yes", "webserver-address=127.0.0.1",
            f"webserver-port={self.api_port}", "webserver-allow-from=127.0.0.1/32",
            f"socket-dir={self.dir}", "guardian=no", "daemon=no", "disable-syslog=yes", "write-pid=no",
            "cache-ttl=0", "negquery-cache-ttl=0", "query-cache-ttl=0", "zone-cache-refresh-interval=0",
            "receiver-threads=1", "distributor-threads=1", "loglevel=4", "",
        ]))
        self._spawn(["pdns_server", f"--config-dir={self.dir}"])
        wait_until(self._api_up, 20, "PowerDNS")

    def _api_up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"pdns_server exited: {self.log_tail()}")
        return httpx.get(f"{self.api_url}/api/v1/servers/localhost", headers={"X-API-Key": self.api_key},
                         timeout=1).status_code == 200

    def create_zone(self, zone: str) -> None:
        name = zone.strip(".") + "."
        response = httpx.post(f"{self.api_url}/api/v1/servers/localhost/zones", timeout=5,
                              headers={"X-API-Key": self.api_key},
                              json={"name": name, "kind": "Native", "nameservers": [f"ns1.{name}"]})
        assert response.status_code == 201, response.text


class PrometheusServer(Daemon):
    """prometheus scraping nothing but one http_sd job, fast refresh, on 127.0.0.1:port."""

    def __init__(self) -> None:
        super().__init__("zlh-prom-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, sd_url: str, token: str) -> None:
        (self.dir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1m\n"
            "scrape_configs:\n  - job_name: zlh-agents\n    http_sd_configs:\n"
            f"      - url: {sd_url}\n        refresh_interval: 1s\n"
            # `type` spelled out: Prometheus 2.42's http_sd sends the bare credentials without it.
            f"        authorization:\n          type: Bearer\n          credentials: {token}\n"
        )
        self._spawn(["prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                     "--log.level=warn"])
        wait_until(self._ready, 30, "Prometheus")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log_tail()}")
        return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200


if __name__ == "__main__" and sys.argv[1:] == ["install"]:
    ensure_installed()
