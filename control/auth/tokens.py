"""The JWT kinds. One fixed algorithm (HS256); each kind has its own issuer, audience and signing key
(derived from the configured secret), so a token of one kind can never verify as another."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import jwt

from gateway.errors import ApiError
from storage.clock import utcnow

ALGORITHM = "HS256"
VERIFIED_CACHE_SIZE = 4096  # tokens whose signature was checked, kept until they expire or are evicted


class TokenKind(str, Enum):
    ACCESS = "access"
    REFRESH = "refresh"
    IDE = "ide"
    CONSOLE = "console"


def token_hash(token: str) -> str:
    """What the database keeps instead of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenService:
    def __init__(self, secret: str, issuer: str) -> None:
        master = secret.encode()
        self._keys = {kind: hmac.new(master, f"zlh-jwt:{kind.value}".encode(), hashlib.sha256).digest()
                      for kind in TokenKind}
        self._issuer = issuer
        # Verifying a signature (PyJWT) was the largest cost of a hot read (~85 µs of GET /api/servers/:id).
        # A token's claims never change, so a token that verified once needs only its expiry checked
        # again; invalid tokens are never kept, and the cache is bounded (oldest first out).
        self._verified: dict[tuple[TokenKind, str], dict[str, Any]] = {}

    def _iss(self, kind: TokenKind) -> str:
        return f"{self._issuer}/{kind.value}"

    def _aud(self, kind: TokenKind) -> str:
        return f"zlh:{kind.value}"

    def issue(self, kind: TokenKind, subject: str | int, ttl: int, **claims: Any) -> str:
        now = utcnow()
        payload = {
            "iss": self._iss(kind),
            "aud": self._aud(kind),
            "sub": str(subject),
            "iat": _epoch(now),
            "exp": _epoch(now) + ttl,
            "jti": secrets.token_urlsafe(16),
            **claims,
        }
        return jwt.encode(payload, self._keys[kind], algorithm=ALGORITHM)

    def verify(self, kind: TokenKind, token: str) -> dict[str, Any]:
        """The claims of a valid token of `kind`; ApiError 401 otherwise."""
        known = self._verified.get((kind, token))
        if known is not None:
            if known["exp"] <= _epoch(utcnow()) or known["exp"] <= time.time():
                self._verified.pop((kind, token), None)
                raise ApiError(401, "TOKEN_EXPIRED")
            return dict(known)
        claims = self._decode(kind, token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.pop(next(iter(self._verified), None), None)  # type: ignore[arg-type]
        self._verified[(kind, token)] = claims
        return dict(claims)

    def _decode(self, kind: TokenKind, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._keys[kind],
                algorithms=[ALGORITHM],
                audience=self._aud(kind),
                issuer=self._iss(kind),
                options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_iat": False},
                leeway=0,
            )
        except jwt.ExpiredSignatureError as exc:
            raise ApiError(401, "TOKEN_EXPIRED") from exc
        except jwt.InvalidTokenError as exc:
            raise ApiError(401, "INVALID_TOKEN") from exc
        if claims["exp"] <= _epoch(utcnow()):
            raise ApiError(401, "TOKEN_EXPIRED")
        return claims


def _epoch(moment: datetime) -> int:
    return int(moment.replace(tzinfo=UTC).timestamp())
