"""
Mint signed JWTs.

This module knows nothing of HTTP or TLS: it takes a subject and an audience and
returns a token, so it can be tested, benchmarked and reused on its own. It
holds the signing keys (one active key, or one per audience, plus retired public
keys still published while their tokens can be alive) and their JWKS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import Algorithm
from jwt.api_jws import PyJWS

#: RFC 7518 section 3.2: an HMAC key must be at least as long as the hash output.
MINIMUM_HMAC_KEY_BYTES = 32
HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
EC_CURVES: dict[str, type[ec.EllipticCurve]] = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}
ALGORITHMS = ("HS256", "HS384", "HS512", "ES256", "ES384", "EdDSA")
ALGORITHM = "HS256"


class SignerKeyError(ValueError):
    """The signing key is unusable; the message never contains the key."""


def _b64urlBytes(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64url(data: bytes) -> str:
    return _b64urlBytes(data).decode("ascii")


def _jsonBytes(document: Any, sortKeys: bool = False) -> bytes:
    """Compact JSON (no spaces), as JWS segments and RFC 7638 thumbprints want it."""
    return json.dumps(document, separators=(",", ":"), sort_keys=sortKeys).encode("utf-8")


class RandomJTI:
    """
    Random token ids (128 bits, base64url), drawn from the operating system's
    generator a page at a time rather than with one system call per token.
    """

    _IDS_PER_DRAW = 256

    def __init__(self, bytesPerId: int = 16, read: Callable[[int], bytes] = os.urandom) -> None:
        self._size = bytesPerId
        self._read = read
        self._pool = b""
        self._offset = 0

    def __call__(self) -> str:
        if self._offset >= len(self._pool):
            self._pool = self._read(self._size * self._IDS_PER_DRAW)
            self._offset = 0
        chunk = self._pool[self._offset : self._offset + self._size]
        self._offset += self._size
        return _b64url(chunk)


def _intBytes(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def publicJwk(publicKey: Any, algorithm: str, kid: str | None = None) -> dict[str, str]:
    """The public JWK (RFC 7517/7518/8037) of an EC or Ed25519 public key."""
    if isinstance(publicKey, ec.EllipticCurvePublicKey):
        size = (publicKey.curve.key_size + 7) // 8
        numbers = publicKey.public_numbers()
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[publicKey.curve.name]
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": _b64url(_intBytes(numbers.x, size)),
            "y": _b64url(_intBytes(numbers.y, size)),
        }
    elif isinstance(publicKey, ed25519.Ed25519PublicKey):
        raw = publicKey.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    else:
        raise SignerKeyError("only EC and Ed25519 public keys can be published")
    jwk.update({"alg": algorithm, "use": "sig"})
    if kid is not None:
        jwk["kid"] = kid
    return jwk


def jwkThumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint: SHA-256 over the required members in lexical order."""
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = _jsonBytes({name: jwk[name] for name in required}, sortKeys=True)
    return _b64url(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class SigningKey:
    """One key for one algorithm; C{secret} is HMAC bytes or a private key object."""

    algorithm: str
    kid: str
    secret: Any = field(repr=False)

    def __repr__(self) -> str:
        return f"SigningKey(algorithm={self.algorithm!r}, kid={self.kid!r}, secret=<redacted>)"

    @property
    def isAsymmetric(self) -> bool:
        return not self.algorithm.startswith("HS")

    def publicJwk(self) -> dict[str, str] | None:
        if not self.isAsymmetric:
            return None
        return publicJwk(self.secret.public_key(), self.algorithm, self.kid)

    @cached_property
    def _signing(self) -> tuple[Algorithm, Any, bytes]:
        """
        PyJWT's algorithm with the key prepared once, and the encoded header
        (the same bytes C{jwt.encode} makes), instead of per token.
        """
        algorithm = PyJWS().get_algorithm_by_name(self.algorithm)
        header = _jsonBytes({"alg": self.algorithm, "kid": self.kid, "typ": "JWT"}, sortKeys=True)
        return algorithm, algorithm.prepare_key(self.secret), _b64urlBytes(header) + b"."

    def sign(self, claims: dict[str, Any]) -> str:
        """The compact JWS of C{claims} (RFC 7515), signed with this key."""
        algorithm, preparedKey, header = self._signing
        signingInput = header + _b64urlBytes(_jsonBytes(claims))
        return (signingInput + b"." + _b64urlBytes(algorithm.sign(signingInput, preparedKey))).decode("ascii")


def signingKeyFrom(algorithm: str, material: bytes, kid: str | None = None, where: str = "the key") -> SigningKey:
    """
    Check key material for an algorithm: HMAC keys at least the hash size
    (RFC 7518 3.2); ES256/ES384 a PKCS#8 PEM key on P-256/P-384; EdDSA an
    Ed25519 PKCS#8 PEM key. The kid is configured, or derived from the key.
    """
    if algorithm not in ALGORITHMS:
        raise SignerKeyError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if not isinstance(material, bytes):
        raise SignerKeyError("the key must be bytes")
    if algorithm in HMAC_KEY_BYTES:
        needed = HMAC_KEY_BYTES[algorithm]
        if len(material) < needed:
            raise SignerKeyError(
                f"the HMAC key from {where} is {len(material)} bytes long; {algorithm} needs at least "
                f"{needed} bytes (RFC 7518 section 3.2)"
            )
        # A label-keyed hash: identifies the key without revealing anything usable about it.
        derived = _b64url(hashlib.sha256(b"tokenissuer kid\0" + material).digest())[:16]
        return SigningKey(algorithm, kid or derived, material)
    try:
        key = serialization.load_pem_private_key(material, password=None)
    except Exception:
        raise SignerKeyError(f"{where} holds no unencrypted PKCS#8 PEM private key for {algorithm}") from None
    if algorithm in EC_CURVES:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, EC_CURVES[algorithm]):
            raise SignerKeyError(f"{where} is not an EC key on the curve {algorithm} needs")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignerKeyError(f"{where} is not an Ed25519 key (EdDSA)")
    jwk = publicJwk(key.public_key(), algorithm)
    return SigningKey(algorithm, kid or jwkThumbprint(jwk), key)


@dataclass(frozen=True)
class MintedToken:
    """A token and the claims inside it (the claims are safe to log, the token is not)."""

    token: str
    claims: dict[str, Any]

    def __repr__(self) -> str:
        # Keep the token itself out of tracebacks and debug output.
        return f"MintedToken(claims={self.claims!r}, token=<redacted>)"


class TokenSigner:
    """
    Sign tokens in the shape the original issuer's consumers accept.

    Header: alg, typ "JWT", kid. Claims: aud (one string), iat (truncated
    integer seconds, because the consumer rejects an iat even slightly in its
    future), exp = iat + ttl, sub, iss, flags (unsigned integer), a random jti,
    and, for certificate-bound tokens, cnf (RFC 8705).
    """

    def __init__(
        self,
        key: SigningKey | None,
        issuer: str,
        ttl: int,
        audienceKeys: dict[str, SigningKey] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        newJTI: Callable[[], str] | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("the token lifetime must be a positive number of seconds")
        if key is None and not audienceKeys:
            raise SignerKeyError("no signing key")
        self.issuer = issuer
        self.ttl = ttl
        self._clock = clock
        self._newJTI = newJTI or RandomJTI()
        self._key = key
        self._audienceKeys = dict(audienceKeys or {})
        self._checkOneAlgorithm()
        #: Public JWKs no longer used for signing, with the time until which tokens signed by them live.
        self._retired: dict[str, tuple[dict[str, str], float]] = {}
        self._pinned: list[dict[str, str]] = []

    def _checkOneAlgorithm(self) -> None:
        algorithms = {k.algorithm for k in self._allKeys()}
        if len(algorithms) != 1:
            raise SignerKeyError("all signing keys must use the same algorithm")

    def _allKeys(self) -> list[SigningKey]:
        return ([self._key] if self._key is not None else []) + list(self._audienceKeys.values())

    def __repr__(self) -> str:
        return f"TokenSigner(issuer={self.issuer!r}, ttl={self.ttl}, algorithm={self.algorithm!r}, keys=<redacted>)"

    @property
    def algorithm(self) -> str:
        return self._allKeys()[0].algorithm

    def keyFor(self, audience: str) -> SigningKey:
        key = self._audienceKeys.get(audience, self._key)
        if key is None:
            raise SignerKeyError(f"no signing key for the audience {audience[:100]!r}")
        return key

    def mint(self, subject: str, audience: str, flags: int = 0, certificateSHA256: bytes | None = None) -> MintedToken:
        """Return a signed token for C{subject} to present to C{audience}."""
        if flags < 0:
            raise ValueError("flags must be an unsigned integer")
        key = self.keyFor(audience)
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
        if certificateSHA256 is not None:
            claims["cnf"] = {"x5t#S256": _b64url(certificateSHA256)}
        return MintedToken(token=key.sign(claims), claims=claims)

    def replaceKeys(self, key: SigningKey | None, audienceKeys: dict[str, SigningKey] | None = None) -> bool:
        """
        Sign with new keys from now on. Public keys that stop being used stay in
        the JWKS for one token lifetime, so tokens they signed still verify.
        Returns whether anything changed.
        """
        before = {k.kid: k for k in self._allKeys()}
        previous = (self._key, self._audienceKeys)
        self._key, self._audienceKeys = key, dict(audienceKeys or {})
        try:
            self._checkOneAlgorithm()
        except SignerKeyError:
            self._key, self._audienceKeys = previous
            raise
        after = {k.kid for k in self._allKeys()}
        retireUntil = self._clock() + self.ttl
        for kid, old in before.items():
            jwk = old.publicJwk()
            if kid not in after and jwk is not None:
                self._retired[kid] = (jwk, retireUntil)
        return set(before) != after

    def publishRetired(self, jwks: list[dict[str, str]]) -> None:
        """Also publish these public keys (configured retired keys) until told otherwise."""
        self._pinned = list(jwks)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """Public keys for consumers: the active ones, then retired ones still needed."""
        now = self._clock()
        self._retired = {kid: entry for kid, entry in self._retired.items() if entry[1] > now}
        keys: dict[str, dict[str, str]] = {}
        for signingKey in self._allKeys():
            jwk = signingKey.publicJwk()
            if jwk is not None:
                keys.setdefault(signingKey.kid, jwk)
        for kid, (jwk, _) in self._retired.items():
            keys.setdefault(kid, jwk)
        for jwk in self._pinned:
            keys.setdefault(jwk["kid"], jwk)
        return {"keys": list(keys.values())}


class HmacTokenSigner(TokenSigner):
    """The common case: one HS256 key (bytes), as the original issuer."""

    def __init__(
        self,
        key: bytes,
        issuer: str,
        ttl: int,
        clock: Callable[[], float] = time.time,
        newJTI: Callable[[], str] | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("the token lifetime must be a positive number of seconds")
        super().__init__(signingKeyFrom(ALGORITHM, key), issuer, ttl, clock=clock, newJTI=newJTI)

    def replaceKey(self, key: bytes) -> bool:
        """Sign from now on with C{key} (after the same checks); True if it differs from the old one."""
        return self.replaceKeys(signingKeyFrom(ALGORITHM, key))
