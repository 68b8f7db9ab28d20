"""Password hashing with scrypt (memory-hard, stdlib). Hashing runs in a worker thread: it is
deliberately slow and must never stall the Trio loop."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import trio

_R, _P, _DKLEN = 8, 1, 32
_limiter = trio.CapacityLimiter(4)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=_DKLEN, maxmem=256 * r * n + 2**20)


def hash_password_sync(password: str, n: int) -> str:
    salt = os.urandom(16)
    return f"scrypt${n}${_R}${_P}${_b64(salt)}${_b64(_derive(password, salt, n, _R, _P))}"


def verify_password_sync(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        derived = _derive(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(derived, base64.b64decode(digest))


async def hash_password(password: str, n: int) -> str:
    return await trio.to_thread.run_sync(hash_password_sync, password, n, limiter=_limiter)


async def verify_password(password: str, encoded: str) -> bool:
    return await trio.to_thread.run_sync(verify_password_sync, password, encoded, limiter=_limiter)
