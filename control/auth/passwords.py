"""Password hashing: argon2id (argon2-cffi) for every new hash. Hashes from before (scrypt) are still
verified, and replaced by argon2id at the next successful login, as are argon2 hashes whose
parameters are not today's (`check_needs_rehash`).

A login for an unknown email verifies a dummy hash made with the same parameters as real ones, so
both answers cost the same and timing does not tell which emails exist. Hashing runs in worker
threads: it is deliberately slow and must never stall the Trio loop."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import argon2
import trio

_limiter = trio.CapacityLimiter(4)


@dataclass(frozen=True)
class HashCost:
    """argon2id parameters (Settings: argon2_time_cost, argon2_memory_kib, argon2_parallelism)."""

    time_cost: int
    memory_kib: int
    parallelism: int

    @classmethod
    def from_settings(cls, settings: Any) -> HashCost:
        return cls(settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism)


@dataclass(frozen=True)
class PasswordCheck:
    valid: bool
    rehashed: str | None = None  # a new argon2id hash to store, when the old one is outdated


@lru_cache(maxsize=4)
def hasher(cost: HashCost) -> argon2.PasswordHasher:
    return argon2.PasswordHasher(time_cost=cost.time_cost, memory_cost=cost.memory_kib,
                                 parallelism=cost.parallelism, type=argon2.Type.ID)


@lru_cache(maxsize=4)
def dummy_hash(cost: HashCost) -> str:
    """What an unknown email is checked against: a real argon2id hash of a random secret, same cost."""
    return hasher(cost).hash(secrets.token_urlsafe(24))


def hash_password_sync(password: str, cost: HashCost) -> str:
    return hasher(cost).hash(password)


def _scrypt_matches(password: str, encoded: str) -> bool:
    try:
        _, n, r, p, salt, digest = encoded.split("$")
        derived = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                 dklen=32, maxmem=256 * int(r) * int(n) + 2**20)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(derived, base64.b64decode(digest))


def check_password_sync(password: str, encoded: str | None, cost: HashCost) -> PasswordCheck:
    """Verify `password` against `encoded` (None: an unknown account, checked against the dummy)."""
    ph = hasher(cost)
    if encoded is not None and encoded.startswith("scrypt$"):
        valid = _scrypt_matches(password, encoded)
        return PasswordCheck(valid, ph.hash(password) if valid else None)
    try:
        ph.verify(encoded or dummy_hash(cost), password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return PasswordCheck(False)
    if encoded is None:
        return PasswordCheck(False)
    return PasswordCheck(True, ph.hash(password) if ph.check_needs_rehash(encoded) else None)


async def hash_password(password: str, cost: HashCost) -> str:
    return await trio.to_thread.run_sync(hash_password_sync, password, cost, limiter=_limiter)


async def check_password(password: str, encoded: str | None, cost: HashCost) -> PasswordCheck:
    return await trio.to_thread.run_sync(check_password_sync, password, encoded, cost, limiter=_limiter)
