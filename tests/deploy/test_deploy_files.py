"""The shipped deployment files are valid for the tools that read them: the replica's systemd unit
(`systemd-analyze verify`, no warning) and the nginx front (`nginx -t`). Skipped where the tool is
not installed."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.nginx import nginx_binary, nginx_process, temp_paths

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "zlh-gateway.service"
NGINX = DEPLOY / "nginx.conf"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies_without_warnings(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "ExecStart=/opt/zlh/venv/bin/zlh-gateway run" in text
    # verify checks that ExecStart exists: point it at this checkout's installed entry point.
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/zlh/venv/bin/zlh-gateway", str(Path(sys.executable).parent / "zlh-gateway")))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_systemd_unit_has_the_usual_hardening() -> None:
    options = dict(line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and line[0] != "#")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                       "RestrictSUIDSGID": "yes", "KillSignal": "SIGTERM"}.items():
        assert options.get(key) == value, key
    assert options["User"] != "root"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zlh.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.skipif(nginx_binary() is None, reason="nginx not installed")
def test_nginx_front_passes_nginx_t(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    front = tmp_path / "zlh.conf"  # the shipped file, with this test's certificate
    front.write_text(NGINX.read_text().replace("/etc/ssl/zlh/fullchain.pem", str(cert))
                     .replace("/etc/ssl/zlh/privkey.pem", str(key)))
    main = tmp_path / "nginx.conf"
    main.write_text(nginx_process(tmp_path, worker_connections=64)
                    + f"http {{\n{temp_paths(tmp_path)}    include {front};\n}}\n")
    done = subprocess.run([str(nginx_binary()), "-t", "-p", str(tmp_path), "-c", str(main), "-e",
                           str(tmp_path / "error.log")], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_nginx_front_streams_and_upgrades_websockets() -> None:
    text = NGINX.read_text()
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;", "client_max_body_size 0;",
                      "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header Upgrade $http_upgrade;",
                      "proxy_http_version 1.1;", "listen 443 ssl;"):
        assert directive in text, directive
