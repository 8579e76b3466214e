"""
Tests for L{tokenissuer.signer}: the shape, claims and secrecy of minted tokens.
"""

from __future__ import annotations

import base64
import json
import time

import jwt
from twisted.trial.unittest import SynchronousTestCase

from tokenissuer.signer import (
    MINIMUM_HMAC_KEY_BYTES,
    HmacTokenSigner,
    MintedToken,
    RandomJTI,
    SignerKeyError,
    TokenSigner,
    signingKeyFrom,
)

KEY = b"0123456789abcdef0123456789abcdef-test-key"
ISSUER = "test_issuer"
AUDIENCE = "https://service.example.org"
SUBJECT = "alice"


def _b64decode(segment: str) -> bytes:
    """Decode one unpadded base64url JWT segment."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _segmentJSON(token: str, index: int) -> dict:
    return json.loads(_b64decode(token.split(".")[index]))


def _signer(key: bytes = KEY, ttl: int = 300, clock=lambda: 1000.9, jti: str | None = "fixed-jti") -> HmacTokenSigner:
    if jti is None:
        return HmacTokenSigner(key, ISSUER, ttl, clock=clock)
    return HmacTokenSigner(key, ISSUER, ttl, clock=clock, newJTI=lambda: jti)


class TokenShapeTests(SynchronousTestCase):
    """
    The consumer parses tokens strictly, so the header and encoding must be
    exactly what the original issuer produced.
    """

    def test_threeSegments(self) -> None:
        """A compact JWS has exactly three dot-separated segments."""
        token = _signer().mint(SUBJECT, AUDIENCE).token
        self.assertEqual(len(token.split(".")), 3)

    def test_noPadding(self) -> None:
        """JWS uses unpadded base64url; a padded segment would be rejected."""
        token = _signer().mint(SUBJECT, AUDIENCE).token
        for segment in token.split("."):
            self.assertNotIn("=", segment)
            self.assertNotIn("+", segment)
            self.assertNotIn("/", segment)

    def test_header(self) -> None:
        """The header names HS256, JWT and the key id (which the consumer ignores), nothing else."""
        token = _signer().mint(SUBJECT, AUDIENCE).token
        header = _segmentJSON(token, 0)
        self.assertEqual(header, {"alg": "HS256", "typ": "JWT", "kid": header["kid"]})
        self.assertRegex(header["kid"], r"^[A-Za-z0-9_-]{16}$")
        self.assertNotIn(KEY.decode("latin-1")[:8], header["kid"])

    def test_tokenIsString(self) -> None:
        """The token is text, ready to be put into a JSON answer."""
        self.assertIsInstance(_signer().mint(SUBJECT, AUDIENCE).token, str)


class ClaimsTests(SynchronousTestCase):
    """
    The claims are the contract with the consumer: exactly these names and types.
    """

    def test_exactClaimNames(self) -> None:
        """No claim is added or missing."""
        claims = _segmentJSON(_signer().mint(SUBJECT, AUDIENCE).token, 1)
        self.assertEqual(set(claims), {"aud", "iat", "exp", "sub", "iss", "flags", "jti"})

    def test_audienceIsString(self) -> None:
        """The consumer expects aud as one string, not a list."""
        claims = _segmentJSON(_signer().mint(SUBJECT, AUDIENCE).token, 1)
        self.assertEqual(claims["aud"], AUDIENCE)
        self.assertIsInstance(claims["aud"], str)

    def test_issuedAtTruncated(self) -> None:
        """
        iat is truncated, never rounded up, because the consumer rejects an iat
        even slightly in its future.
        """
        claims = _segmentJSON(_signer(clock=lambda: 1000.9).mint(SUBJECT, AUDIENCE).token, 1)
        self.assertEqual(claims["iat"], 1000)
        self.assertIs(type(claims["iat"]), int)

    def test_issuedAtWholeSecond(self) -> None:
        """A clock on a whole second gives that second."""
        claims = _segmentJSON(_signer(clock=lambda: 2000.0).mint(SUBJECT, AUDIENCE).token, 1)
        self.assertEqual(claims["iat"], 2000)

    def test_expiry(self) -> None:
        """exp is iat plus the configured lifetime."""
        claims = _segmentJSON(_signer(ttl=300, clock=lambda: 1000.9).mint(SUBJECT, AUDIENCE).token, 1)
        self.assertEqual(claims["exp"], 1300)
        self.assertIs(type(claims["exp"]), int)

    def test_subject(self) -> None:
        """sub is the subject given to mint."""
        claims = _segmentJSON(_signer().mint(SUBJECT, AUDIENCE).token, 1)
        self.assertEqual(claims["sub"], SUBJECT)

    def test_issuer(self) -> None:
        """iss is the configured issuer name."""
        claims = _segmentJSON(_signer().mint(SUBJECT, AUDIENCE).token, 1)
        self.assertEqual(claims["iss"], ISSUER)

    def test_flagsDefaultZero(self) -> None:
        """flags defaults to the integer 0 (not false, not a string)."""
        claims = _segmentJSON(_signer().mint(SUBJECT, AUDIENCE).token, 1)
        self.assertEqual(claims["flags"], 0)
        self.assertIs(type(claims["flags"]), int)

    def test_flagsGiven(self) -> None:
        """Explicit flags are carried into the token."""
        claims = _segmentJSON(_signer().mint(SUBJECT, AUDIENCE, flags=5).token, 1)
        self.assertEqual(claims["flags"], 5)

    def test_negativeFlagsRejected(self) -> None:
        """flags is unsigned for the consumer."""
        self.assertRaises(ValueError, _signer().mint, SUBJECT, AUDIENCE, flags=-1)

    def test_jtiFromFactory(self) -> None:
        """jti comes from the injected factory, so tests can pin it."""
        claims = _segmentJSON(_signer(jti="abc").mint(SUBJECT, AUDIENCE).token, 1)
        self.assertEqual(claims["jti"], "abc")

    def test_defaultJtiRandom(self) -> None:
        """The default jti differs between two tokens minted in the same second."""
        signer = _signer(jti=None)
        first = signer.mint(SUBJECT, AUDIENCE).claims["jti"]
        second = signer.mint(SUBJECT, AUDIENCE).claims["jti"]
        self.assertIsInstance(first, str)
        self.assertTrue(first)
        self.assertNotEqual(first, second)

    def test_defaultJtiIs128RandomBits(self) -> None:
        """The default jti is 16 random bytes in unpadded base64url, unique across many tokens."""
        signer = _signer(jti=None)
        ids = [signer.mint(SUBJECT, AUDIENCE).claims["jti"] for _ in range(2000)]
        self.assertEqual(len(set(ids)), len(ids))
        for jti in ids[:50]:
            self.assertEqual(len(_b64decode(jti)), 16)
            self.assertNotIn("=", jti)

    def test_mintedClaimsMatchToken(self) -> None:
        """MintedToken.claims is what is actually inside the token."""
        minted = _signer().mint(SUBJECT, AUDIENCE)
        self.assertEqual(minted.claims, _segmentJSON(minted.token, 1))


class RandomJTITests(SynchronousTestCase):
    """Token ids come from the OS generator, a page at a time, never repeated."""

    def test_drawsAPageAtATimeAndNeverReuses(self) -> None:
        """Each id is the next unused 16 bytes; a new page is drawn only when one is used up."""
        draws: list[int] = []
        counter = iter(range(10**6))

        def read(size: int) -> bytes:
            # Each 16-byte chunk holds its own running number, so every honest id is distinct.
            draws.append(size)
            return b"".join(next(counter).to_bytes(16, "big") for _ in range(size // 16))

        newId = RandomJTI(read=read)
        ids = [newId() for _ in range(RandomJTI._IDS_PER_DRAW + 1)]
        self.assertEqual(draws, [16 * RandomJTI._IDS_PER_DRAW] * 2)
        self.assertEqual([int.from_bytes(_b64decode(jti), "big") for jti in ids], list(range(len(ids))))
        self.assertEqual(len(set(ids)), len(ids))


class SameBytesAsPyJWTTests(SynchronousTestCase):
    """
    Keys are prepared and headers encoded once per key; the tokens must stay
    byte for byte what C{jwt.encode} makes of the same claims.
    """

    def test_hmacTokensEqualJwtEncode(self) -> None:
        for algorithm, size in (("HS256", 32), ("HS384", 48), ("HS512", 64)):
            key = signingKeyFrom(algorithm, bytes(range(size)), kid="k1")
            signer = TokenSigner(key, ISSUER, 300, clock=lambda: 1000.0, newJTI=lambda: "j")
            minted = signer.mint(SUBJECT, AUDIENCE, flags=3)
            expected = jwt.encode(minted.claims, key.secret, algorithm=algorithm, headers={"typ": "JWT", "kid": "k1"})
            self.assertEqual(minted.token, expected, algorithm)

    def test_asymmetricTokensVerify(self) -> None:
        """EdDSA is deterministic (equal bytes); ECDSA is not, so its tokens are verified instead."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        edKey = ed25519.Ed25519PrivateKey.generate()
        pem = edKey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        key = signingKeyFrom("EdDSA", pem)
        minted = TokenSigner(key, ISSUER, 300, newJTI=lambda: "j").mint(SUBJECT, AUDIENCE)
        expected = jwt.encode(minted.claims, edKey, algorithm="EdDSA", headers={"typ": "JWT", "kid": key.kid})
        self.assertEqual(minted.token, expected)
        for algorithm, curve in (("ES256", ec.SECP256R1()), ("ES384", ec.SECP384R1())):
            ecKey = ec.generate_private_key(curve)
            pem = ecKey.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            key = signingKeyFrom(algorithm, pem)
            token = TokenSigner(key, ISSUER, 300).mint(SUBJECT, AUDIENCE).token
            self.assertEqual(jwt.get_unverified_header(token), {"alg": algorithm, "kid": key.kid, "typ": "JWT"})
            claims = jwt.decode(token, ecKey.public_key(), algorithms=[algorithm], audience=AUDIENCE)
            self.assertEqual(claims["sub"], SUBJECT)


class VerificationTests(SynchronousTestCase):
    """
    A standard JWT library, given the key, accepts the token; without it, refuses.
    """

    def _mintNow(self) -> str:
        return _signer(clock=time.time).mint(SUBJECT, AUDIENCE).token

    def test_verifiesWithKey(self) -> None:
        """PyJWT verifies signature, audience, issuer, iat and exp."""
        claims = jwt.decode(self._mintNow(), KEY, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
        self.assertEqual(claims["sub"], SUBJECT)

    def test_wrongKeyFails(self) -> None:
        """A different key does not verify the signature."""
        self.assertRaises(
            jwt.InvalidSignatureError,
            jwt.decode,
            self._mintNow(),
            KEY + b"x",
            algorithms=["HS256"],
            audience=AUDIENCE,
            issuer=ISSUER,
        )

    def test_wrongAudienceFails(self) -> None:
        """A token for one audience is not accepted by another."""
        self.assertRaises(
            jwt.InvalidAudienceError,
            jwt.decode,
            self._mintNow(),
            KEY,
            algorithms=["HS256"],
            audience="https://other.example.org",
            issuer=ISSUER,
        )

    def test_expiredWithOldClock(self) -> None:
        """A token minted long ago has expired for a verifier on the real clock."""
        token = _signer(clock=lambda: 1000.9).mint(SUBJECT, AUDIENCE).token
        self.assertRaises(
            jwt.ExpiredSignatureError, jwt.decode, token, KEY, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER
        )


class KeyTests(SynchronousTestCase):
    """
    Short keys are refused and the key never leaks into messages or reprs.
    """

    def test_minimumIs32(self) -> None:
        """RFC 7518 section 3.2: at least the 32-byte SHA-256 output."""
        self.assertEqual(MINIMUM_HMAC_KEY_BYTES, 32)

    def test_shortKeyRejected(self) -> None:
        """A 31-byte key raises SignerKeyError."""
        self.assertRaises(SignerKeyError, HmacTokenSigner, b"Q" * 31, ISSUER, 60)

    def test_emptyKeyRejected(self) -> None:
        """An empty key raises SignerKeyError."""
        self.assertRaises(SignerKeyError, HmacTokenSigner, b"", ISSUER, 60)

    def test_exactly32Accepted(self) -> None:
        """A 32-byte key is long enough."""
        HmacTokenSigner(b"Q" * 32, ISSUER, 60)

    def test_textKeyRejected(self) -> None:
        """A str key is refused rather than silently encoded."""
        self.assertRaises(SignerKeyError, HmacTokenSigner, "Q" * 40, ISSUER, 60)

    def test_shortKeyNotInMessage(self) -> None:
        """The error for a short key does not repeat the key."""
        key = b"Zebra-Secret-Xylophone-Quokka99"
        self.assertEqual(len(key), 31)
        error = self.assertRaises(SignerKeyError, HmacTokenSigner, key, ISSUER, 60)
        message = str(error)
        self.assertNotIn(key.decode("ascii"), message)
        self.assertNotIn(repr(key), message)
        self.assertNotIn("Zebra", message)

    def test_reprHidesKey(self) -> None:
        """repr(signer) can end up in logs; it must not show the key."""
        text = repr(_signer())
        self.assertNotIn(KEY.decode("ascii"), text)
        self.assertNotIn(repr(KEY), text)
        self.assertNotIn("0123456789abcdef", text)

    def test_nonPositiveTtlRejected(self) -> None:
        """A zero lifetime would mint tokens that are already expired."""
        self.assertRaises(ValueError, HmacTokenSigner, KEY, ISSUER, 0)


class MintedTokenReprTests(SynchronousTestCase):
    """
    A token is a bearer credential: debugging output must not reveal it.
    """

    def test_reprHidesToken(self) -> None:
        """repr(MintedToken) shows no part of the signed token."""
        minted = _signer().mint(SUBJECT, AUDIENCE)
        text = repr(minted)
        self.assertNotIn(minted.token, text)
        for segment in minted.token.split("."):
            self.assertNotIn(segment, text)

    def test_reprOfConstructed(self) -> None:
        """Even a hand-built MintedToken keeps its token out of repr."""
        self.assertNotIn("sekrit-token", repr(MintedToken(token="sekrit-token", claims={})))
