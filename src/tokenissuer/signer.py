"""
Mint signed JWTs.

This module knows nothing of HTTP or TLS: it takes a subject and an audience and
returns a token, so it can be tested, benchmarked and reused on its own.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

#: RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
MINIMUM_HMAC_KEY_BYTES = 32

ALGORITHM = "HS256"


class SignerKeyError(ValueError):
    """The signing key is unusable; the message never contains the key."""


@dataclass(frozen=True)
class MintedToken:
    """A token and the claims inside it (the claims are safe to log, the token is not)."""

    token: str
    claims: dict[str, Any]

    def __repr__(self) -> str:
        # Keep the token itself out of tracebacks and debug output.
        return f"MintedToken(claims={self.claims!r}, token=<redacted>)"


class HmacTokenSigner:
    """
    Sign tokens with HS256 in the shape the original issuer's consumers accept.

    Claims: aud (one string), iat (truncated integer seconds, because the
    consumer rejects an iat even slightly in its future), exp = iat + ttl, sub,
    iss, flags (unsigned integer) and a random jti.
    """

    algorithm = ALGORITHM

    def __init__(
        self,
        key: bytes,
        issuer: str,
        ttl: int,
        clock: Callable[[], float] = time.time,
        newJTI: Callable[[], str] = lambda: secrets.token_urlsafe(16),
    ) -> None:
        if ttl <= 0:
            raise ValueError("the token lifetime must be a positive number of seconds")
        self._key = self._checkedKey(key)
        self.issuer = issuer
        self.ttl = ttl
        self._clock = clock
        self._newJTI = newJTI

    @staticmethod
    def _checkedKey(key: bytes) -> bytes:
        if not isinstance(key, bytes):
            raise SignerKeyError("the HMAC key must be bytes")
        if len(key) < MINIMUM_HMAC_KEY_BYTES:
            raise SignerKeyError(
                f"the HMAC key is {len(key)} bytes long; HS256 needs at least "
                f"{MINIMUM_HMAC_KEY_BYTES} bytes (RFC 7518 section 3.2)"
            )
        return key

    def replaceKey(self, key: bytes) -> bool:
        """Sign from now on with C{key} (after the same checks); True if it differs from the old one."""
        key = self._checkedKey(key)
        changed = key != self._key
        self._key = key
        return changed

    def __repr__(self) -> str:
        return f"HmacTokenSigner(issuer={self.issuer!r}, ttl={self.ttl}, key=<redacted>)"

    def mint(self, subject: str, audience: str, flags: int = 0) -> MintedToken:
        """Return a signed token for C{subject} to present to C{audience}."""
        if flags < 0:
            raise ValueError("flags must be an unsigned integer")
        issuedAt = int(self._clock())
        claims: dict[str, Any] = {
            "aud": audience,
            "iat": issuedAt,
            "exp": issuedAt + self.ttl,
            "sub": subject,
            "iss": self.issuer,
            "flags": flags,
            "jti": self._newJTI(),
        }
        token = jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"typ": "JWT"})
        return MintedToken(token=token, claims=claims)
