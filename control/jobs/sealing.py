"""Vault secrets at rest: AES-256-GCM (authenticated, so a tampered or misplaced ciphertext fails to
open rather than decrypting to garbage) under a key derived with HKDF-SHA256 from Settings.jwt_secret,
so no second secret has to be provisioned. The connection's name is the associated data: a sealed
secret copied onto another row does not open. Never logs or returns a plaintext."""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = "v1"


class SecretUnreadable(Exception):
    """The sealed secret does not open: tampered, moved, or sealed under another jwt_secret."""


class SecretBox:
    def __init__(self, master_secret: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"zlh-gateway/vault",
                   info=b"vault connection secret v1").derive(master_secret.encode())
        self._cipher = AESGCM(key)

    def seal(self, plaintext: str, context: str) -> str:
        nonce = os.urandom(12)
        sealed = self._cipher.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{_VERSION}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, sealed: str, context: str) -> str:
        version, _, body = sealed.partition(".")
        if version != _VERSION:
            raise SecretUnreadable(f"unknown sealing version {version!r}")
        try:
            raw = base64.urlsafe_b64decode(body.encode())
            return self._cipher.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except (InvalidTag, ValueError) as exc:
            raise SecretUnreadable("secret does not open under this key") from exc
