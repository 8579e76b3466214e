"""
An independent re-implementation of the consuming service's token check, as
described in shared/NOTES.md: it decodes the JWT by hand (no PyJWT), so a token
that PyJWT accepts but the real consumer would reject still fails here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


class ConsumerRejected(Exception):
    pass


def _b64decode(segment: str) -> bytes:
    if "=" in segment:
        raise ConsumerRejected("padded base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def consumerVerify(token: str, key: bytes, audience: str, issuer: str, now: float | None = None) -> dict[str, Any]:
    """Accept the token exactly when the original's consumer would; return its claims."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ConsumerRejected("not three segments")
    header = json.loads(_b64decode(parts[0]))
    if header.get("alg") != "HS256":
        raise ConsumerRejected("unexpected alg")
    if header.get("typ") != "JWT":
        raise ConsumerRejected("typ must be exactly JWT")
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _b64decode(parts[2])):
        raise ConsumerRejected("bad signature")
    claims = json.loads(_b64decode(parts[1]))
    if not isinstance(claims.get("aud"), str) or claims["aud"] != audience:
        raise ConsumerRejected("aud must be our name as one string")
    if claims.get("iss") != issuer:
        raise ConsumerRejected("wrong iss")
    issuedAt = claims.get("iat")
    if not isinstance(issuedAt, int) or isinstance(issuedAt, bool):
        raise ConsumerRejected("iat must be an integer")
    current = int(time.time() if now is None else now)
    if issuedAt > current:
        raise ConsumerRejected("iat in the future (no clock skew allowed)")
    if current - issuedAt > 3600:
        raise ConsumerRejected("iat older than 3600 seconds")
    flags = claims.get("flags")
    if not isinstance(flags, int) or isinstance(flags, bool) or flags < 0:
        raise ConsumerRejected("flags must be an unsigned integer")
    return claims
