"""
Signing keys and algorithms: HS256/384/512, ES256/384 and EdDSA keys (in the
variable, as the original, or a file), per-audience keys, kid, rotation with
retired keys published in the JWKS, and certificate-bound tokens (RFC 8705).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tokenissuer.config import ConfigError, resolveSettings
from tokenissuer.signer import SignerKeyError, TokenSigner, signingKeyFrom

from .support import Client, LogCapture, TestPKI, startIssuer
from .test_operations import adminGet


def pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def newKey(algorithm: str) -> Any:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    return ed25519.Ed25519PrivateKey.generate()


def decode(token: str, key: Any, algorithm: str, audience: str = "gschmarri") -> dict[str, Any]:
    return jwt.decode(token, key, algorithms=[algorithm], audience=audience)


class KeyCheckTests(SynchronousTestCase):
    def test_hmacLengthsPerAlgorithm(self) -> None:
        for algorithm, size in (("HS256", 32), ("HS384", 48), ("HS512", 64)):
            signingKeyFrom(algorithm, b"k" * size)
            with self.assertRaises(SignerKeyError) as raised:
                signingKeyFrom(algorithm, b"k" * (size - 1))
            self.assertIn(f"needs at least {size} bytes", str(raised.exception))

    def test_wrongKeyTypes(self) -> None:
        with self.assertRaises(SignerKeyError):
            signingKeyFrom("ES256", pem(newKey("ES384")))
        with self.assertRaises(SignerKeyError):
            signingKeyFrom("EdDSA", pem(newKey("ES256")))
        with self.assertRaises(SignerKeyError) as raised:
            signingKeyFrom("ES256", b"secret-not-a-pem-key-0123456789-0123456789")
        self.assertNotIn("secret-not-a-pem", str(raised.exception))

    def test_kidDerivedOrConfigured(self) -> None:
        key = newKey("ES256")
        derived = signingKeyFrom("ES256", pem(key))
        self.assertEqual(derived.kid, signingKeyFrom("ES256", pem(key)).kid)
        self.assertEqual(signingKeyFrom("ES256", pem(key), "mine").kid, "mine")
        self.assertNotEqual(derived.kid, signingKeyFrom("ES256", pem(newKey("ES256"))).kid)

    def test_rotationKeepsRetiredKeyForOneLifetime(self) -> None:
        now = [1000.0]
        old, new = signingKeyFrom("ES256", pem(newKey("ES256"))), signingKeyFrom("ES256", pem(newKey("ES256")))
        signer = TokenSigner(old, "iss", 600, clock=lambda: now[0])
        token = signer.mint("sub", "aud").token
        self.assertTrue(signer.replaceKeys(new))
        kids = [k["kid"] for k in signer.jwks()["keys"]]
        self.assertEqual(kids, [new.kid, old.kid])
        self.assertEqual(jwt.get_unverified_header(signer.mint("sub", "aud").token)["kid"], new.kid)
        jwk = jwt.PyJWK(next(k for k in signer.jwks()["keys"] if k["kid"] == old.kid))
        self.assertEqual(
            jwt.decode(token, jwk.key, algorithms=["ES256"], audience="aud", options={"verify_exp": False})["sub"],
            "sub",
        )
        now[0] += 601
        self.assertEqual([k["kid"] for k in signer.jwks()["keys"]], [new.kid])

    def test_perAudienceSettings(self) -> None:
        environ = {
            "TOK_ISS_ALLOWED_AUDIENCES": "a b",
            "TOK_ISS_ENV_SECRETS": "KEY_A KEY_B",
            "KEY_A": "a" * 40,
            "KEY_B": "b" * 40,
        }
        settings = resolveSettings({}, environ)
        self.assertEqual(settings.audienceKeyMaterial, {"a": b"a" * 40, "b": b"b" * 40})
        self.assertNotIn("aaaa", repr(settings))
        for broken, expected in (
            ({"TOK_ISS_ENV_SECRETS": "KEY_A"}, "names 1 variable(s)"),
            ({"KEY_B": "short"}, "KEY_B"),
            ({"TOK_ISS_ALLOWED_AUDIENCES": ""}, "needs TOK_ISS_ALLOWED_AUDIENCES"),
        ):
            with self.subTest(broken=broken):
                with self.assertRaises(ConfigError) as raised:
                    resolveSettings({}, {**environ, **broken})
                self.assertIn(expected, str(raised.exception))
        missing = dict(environ)
        del missing["KEY_B"]
        with self.assertRaises(ConfigError) as raised:
            resolveSettings({}, missing)
        self.assertIn("KEY_B, which is not set", str(raised.exception))

    def test_unknownType(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            resolveSettings({}, {"TOK_ISS_TYPE": "RS256", "TOK_ISS_HMAC_SECRET": "k" * 40})
        self.assertIn("EdDSA", str(raised.exception))


class SigningOverTLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.logs = LogCapture(self)
        self.files = self.pki.clientFiles(self.pki.client, "good")

    def start(self, environ: dict[str, str] | None = None, **options: Any) -> None:
        self.port, self.service = startIssuer(self, self.pki, environ=environ, **options)
        assert self.service.adminPort is not None
        self.adminPort = self.service.adminPort.getHost().port  # type: ignore[attr-defined]

    async def token(self, audience: str = "gschmarri", path: str = "/jwthmac/issue", **extra: Any) -> Any:
        client = Client(self.port, self.pki.path("ca.pem"), *self.files)
        body = json.dumps({"audience": audience, **extra}).encode()
        return await deferToThread(client.call, path=path, body=body)

    async def jwks(self) -> tuple[int, Any]:
        status, text = await deferToThread(adminGet, self.adminPort, "/.well-known/jwks.json")
        return status, json.loads(text)

    async def test_asymmetricAlgorithmsVerifyThroughTheJwks(self) -> None:
        for algorithm in ("ES256", "ES384", "EdDSA"):
            key = newKey(algorithm)
            # As the original: the PEM key in the variable.
            self.start(environ={"TOK_ISS_HMAC_SECRET": pem(key).decode(), "TOK_ISS_TYPE": algorithm})
            response = await self.token(path="/jwt/issue", algorithm=algorithm)
            self.assertEqual(response.status, 200, response.body)
            token = response.json()["token"]
            header = jwt.get_unverified_header(token)
            self.assertEqual((header["alg"], header["typ"]), (algorithm, "JWT"))
            status, document = await self.jwks()
            self.assertEqual(status, 200)
            [published] = document["keys"]
            self.assertEqual((published["kid"], published["alg"], published["use"]), (header["kid"], algorithm, "sig"))
            self.assertNotIn("d", published)
            self.assertEqual(decode(token, jwt.PyJWK(published).key, algorithm)["sub"], "Martin2")
            self.assertEqual(decode(token, key.public_key(), algorithm)["iss"], "daheim_token_issuer")
            wrong = await self.token(path="/jwt/issue", algorithm="HS256")
            self.assertEqual((wrong.status, wrong.json()["error"]), (400, "algorithm_mismatch"))
            await self.service.stopService()
        self.assertNotIn("PRIVATE KEY", self.logs.text())

    async def test_hmacHasNoJwks(self) -> None:
        self.start(environ={"TOK_ISS_HMAC_SECRET": "h" * 64, "TOK_ISS_TYPE": "HS512"})
        response = await self.token()
        self.assertEqual(decode(response.json()["token"], b"h" * 64, "HS512")["sub"], "Martin2")
        status, document = await self.jwks()
        self.assertEqual((status, document["error"]), (404, "not_found"))

    async def test_perAudienceKeys(self) -> None:
        self.start(
            environ={"TOK_ISS_ENV_SECRETS": "KEY_G KEY_D", "KEY_G": "g" * 40, "KEY_D": "d" * 40},
            audiences="gschmarri dummy",
        )
        gschmarri = (await self.token("gschmarri")).json()["token"]
        dummy = (await self.token("dummy")).json()["token"]
        self.assertEqual(decode(gschmarri, b"g" * 40, "HS256")["aud"], "gschmarri")
        self.assertEqual(decode(dummy, b"d" * 40, "HS256", "dummy")["aud"], "dummy")
        with self.assertRaises(jwt.InvalidSignatureError):
            decode(gschmarri, b"d" * 40, "HS256")

    async def test_configuredKid(self) -> None:
        self.start(environ={"TOK_ISS_HMAC_SECRET": "h" * 40, "TOK_ISS_KEY_ID": "2026-12"})
        token = (await self.token()).json()["token"]
        self.assertEqual(jwt.get_unverified_header(token)["kid"], "2026-12")

    async def test_rotationByFileAndRetiredKeys(self) -> None:
        first, second, retired = newKey("ES256"), newKey("ES256"), newKey("ES256")
        keyFile = self.pki.write("signing.pem", pem(first))
        retiredFile = self.pki.write(
            "retired.pub",
            retired.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        self.start(
            environ={"TOK_ISS_TYPE": "ES256", "TOK_ISS_RETIRED_KEYS": retiredFile},
            **{"hmac-secret-file": keyFile, "reload-interval": "0.2"},
        )
        oldToken = (await self.token()).json()["token"]
        oldKid = jwt.get_unverified_header(oldToken)["kid"]
        self.pki.write("signing.pem", pem(second))
        await deferLater(reactor, 1.0, lambda: None)
        newToken = (await self.token()).json()["token"]
        newKid = jwt.get_unverified_header(newToken)["kid"]
        self.assertNotEqual(oldKid, newKid)
        _, document = await self.jwks()
        published = {k["kid"]: k for k in document["keys"]}
        self.assertEqual(len(published), 3)
        self.assertIn(oldKid, published)
        self.assertIn(newKid, published)
        for token, kid in ((oldToken, oldKid), (newToken, newKid)):
            self.assertEqual(decode(token, jwt.PyJWK(published[kid]).key, "ES256")["sub"], "Martin2")

    async def test_certificateBoundTokens(self) -> None:
        self.start(environ={"TOK_ISS_HMAC_SECRET": "h" * 40, "TOK_ISS_BIND_TOKEN": "true"})
        claims = decode((await self.token()).json()["token"], b"h" * 40, "HS256")
        der = self.pki.client.certificate.public_bytes(serialization.Encoding.DER)
        expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        self.assertEqual(claims["cnf"], {"x5t#S256": expected})

    async def test_unboundByDefault(self) -> None:
        self.start(environ={"TOK_ISS_HMAC_SECRET": "h" * 40})
        self.assertNotIn("cnf", decode((await self.token()).json()["token"], b"h" * 40, "HS256"))
