"""
The service over real TLS on loopback: an in-process issuer on a free port and
the standard library's HTTPS client (in a thread) with real certificates.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import jwt
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from .consumer import consumerVerify
from .support import TEST_HMAC_KEY, Client, LogCapture, TestPKI, startIssuer

HANDSHAKE_REFUSED = (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected, OSError)
ORIGIN = "http://localhost:8000"


def callWithContext(client: Client, configure: Callable[[ssl.SSLContext], Any]) -> Any:
    """One request on a new connection whose client context C{configure} adjusted first."""
    context = client.context()
    configure(context)
    connection = client.connect(context=context)
    try:
        return client.request(connection)
    finally:
        connection.close()


def tls12Connection(port: int, certFile: str | None = None, keyFile: str | None = None) -> tuple[Any, socket.socket]:
    """A pyOpenSSL TLS 1.2 client connection (not yet handshaken) to the issuer, and its socket."""
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    if certFile and keyFile:
        context.use_certificate_file(certFile)
        context.use_privatekey_file(keyFile)
    raw = socket.create_connection(("127.0.0.1", port))
    # pyOpenSSL needs a blocking socket; bound the wait at the OS level instead.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
    connection = SSL.Connection(context, raw)
    connection.set_connect_state()
    return connection, raw


class IssuerOverTLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.logs = LogCapture(self)
        self.port, self.service = startIssuer(self, self.pki)
        self.certFile, self.keyFile = self.pki.clientFiles(self.pki.client, "client")

    def client(self, issued: Any = None, name: str = "", **kwargs: Any) -> Client:
        if issued is None:
            return Client(self.port, self.pki.path("ca.pem"), **kwargs)
        certFile, keyFile = self.pki.clientFiles(issued, name or "c")
        return Client(self.port, self.pki.path("ca.pem"), certFile, keyFile, **kwargs)

    def inThread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return deferToThread(function, *args, **kwargs)

    async def test_tokenWithCorrectClaims(self) -> None:
        response = await self.inThread(self.client(self.pki.client, "good").call)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["Cache-Control"], "no-store")
        token = response.json()["token"]
        claims = jwt.decode(
            token,
            TEST_HMAC_KEY.encode(),
            algorithms=["HS256"],
            audience="gschmarri",
            issuer="daheim_token_issuer",
            options={"require": ["exp", "iat", "sub", "jti"]},
        )
        self.assertEqual(claims["sub"], "Martin2")
        self.assertEqual(claims["flags"], 0)
        self.assertEqual(claims["exp"] - claims["iat"], 3600)
        self.assertEqual(response.json()["expires_in"], 3600)
        consumerVerify(token, TEST_HMAC_KEY.encode(), "gschmarri", "daheim_token_issuer")
        self.assertEqual(len(self.logs.issued()), 1)
        self.assertNotIn(token, self.logs.text())
        self.assertNotIn(TEST_HMAC_KEY, self.logs.text())

    async def test_laterApiPath(self) -> None:
        client = self.client(self.pki.client, "good")
        response = await self.inThread(
            client.call, path="/jwt/issue", body=b'{"audience": "dummy", "algorithm": "HS256"}'
        )
        self.assertEqual(response.status, 200)
        consumerVerify(response.json()["token"], TEST_HMAC_KEY.encode(), "dummy", "daheim_token_issuer")

    async def test_preflightWithoutCertificate(self) -> None:
        response = await self.inThread(
            self.client().call,
            method="OPTIONS",
            body=None,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        self.assertEqual(response.status, 204)
        self.assertEqual(response.headers["Access-Control-Allow-Origin"], ORIGIN)
        self.assertEqual(response.headers["Access-Control-Allow-Credentials"], "true")
        self.assertIn("content-type", response.headers["Access-Control-Allow-Headers"])

    async def test_postWithoutCertificateIs401WithCorsHeaders(self) -> None:
        response = await self.inThread(self.client().call, headers={"Origin": ORIGIN})
        self.assertEqual(response.status, 401)
        self.assertEqual(response.json()["error"], "client_certificate_required")
        self.assertEqual(response.headers["Access-Control-Allow-Origin"], ORIGIN)
        self.assertEqual(response.headers["Vary"], "Origin")
        self.assertEqual(self.logs.issued(), [])

    async def test_preflightThenPostOnOneConnectionWithoutCertificate(self) -> None:
        """What Firefox does with an uncredentialed call: both on one certificate-less connection."""
        client = self.client()

        def exchange() -> list[int]:
            connection = client.connect()
            try:
                preflight = client.request(
                    connection,
                    method="OPTIONS",
                    body=None,
                    headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
                )
                post = client.request(connection, headers={"Origin": ORIGIN})
                return [preflight.status, post.status]
            finally:
                connection.close()

        self.assertEqual(await self.inThread(exchange), [204, 401])

    async def test_refusedClientCertificates(self) -> None:
        """Untrusted, expired, not yet valid and serverAuth-only certificates fail the handshake."""
        cases = {
            "untrusted": (self.pki.untrusted, "issuer not trusted"),
            "expired": (self.pki.expired, "certificate expired"),
            "notyet": (self.pki.notYetValid, "certificate not yet valid"),
            "serverauth": (self.pki.serverAuthOnly, "not allowed for client authentication"),
        }
        for name, (issued, reason) in cases.items():
            for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
                client = self.client(issued, name, maxVersion=version)
                try:
                    response = await self.inThread(client.call)
                except HANDSHAKE_REFUSED:
                    pass
                else:
                    self.fail(f"{name} over {version.name} got HTTP {response.status}")
            self.assertIn(reason, self.logs.text(), name)
        self.assertEqual(self.logs.issued(), [])

    async def test_foreignOriginRefusedNothingMinted(self) -> None:
        response = await self.inThread(
            self.client(self.pki.client, "good").call, headers={"Origin": "https://evil.example"}
        )
        self.assertEqual(response.status, 403)
        self.assertEqual(response.json()["error"], "origin_not_allowed")
        self.assertNotIn("Access-Control-Allow-Origin", response.headers)
        self.assertEqual(self.logs.issued(), [])

    async def test_errorsOverTLS(self) -> None:
        client = self.client(self.pki.client, "good")
        cases = [
            ({"body": b"{oops"}, 400, "malformed_json"),
            ({"body": b'{"audience": "nope"}'}, 403, "audience_not_allowed"),
            ({"path": "/nothing"}, 404, "not_found"),
            ({"method": "GET", "body": None}, 405, "method_not_allowed"),
            ({"body": b'{"audience": "' + b"x" * 5000 + b'"}'}, 413, "body_too_large"),
            ({"headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ]
        for kwargs, status, code in cases:
            response = await self.inThread(client.call, **kwargs)
            self.assertEqual((response.status, response.json()["error"]), (status, code))
        self.assertEqual(self.logs.issued(), [])

    async def test_keepAliveCarriesSeveralRequests(self) -> None:
        client = self.client(self.pki.client, "good")

        def twoOnOne() -> list[Any]:
            connection = client.connect()
            try:
                return [client.request(connection), client.request(connection, body=b'{"audience": "dummy"}')]
            finally:
                connection.close()

        first, second = await self.inThread(twoOnOne)
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(len(self.logs.issued()), 2)
        peers = {event["peer"] for event in self.logs.issued()}
        self.assertEqual(len(peers), 1, "both requests should come over one connection")

    async def assertResumptionKeepsStatus(self, version: ssl.TLSVersion, issued: Any, expectedStatus: int) -> None:
        client = self.client(issued, "resume", maxVersion=version) if issued else self.client(maxVersion=version)
        context = client.context()

        def resume() -> tuple[Any, Any]:
            first = client.connect(context=context)
            try:
                firstResponse = client.request(first)
                session = first.sock.session  # type: ignore[union-attr]
            finally:
                first.close()
            second = client.connect(session=session, context=context)
            try:
                return firstResponse, client.request(second)
            finally:
                second.close()

        first, second = await self.inThread(resume)
        self.assertFalse(first.sessionReused)
        self.assertTrue(second.sessionReused, f"{version.name}: session was not resumed")
        self.assertEqual((first.status, second.status), (expectedStatus, expectedStatus))

    async def test_resumedSessionKeepsCertificateTLS12(self) -> None:
        await self.assertResumptionKeepsStatus(ssl.TLSVersion.TLSv1_2, self.pki.client, 200)

    async def test_resumedSessionKeepsCertificateTLS13(self) -> None:
        await self.assertResumptionKeepsStatus(ssl.TLSVersion.TLSv1_3, self.pki.client, 200)

    async def test_resumedSessionWithoutCertificateStays401TLS12(self) -> None:
        await self.assertResumptionKeepsStatus(ssl.TLSVersion.TLSv1_2, None, 401)

    async def test_resumedSessionWithoutCertificateStays401TLS13(self) -> None:
        await self.assertResumptionKeepsStatus(ssl.TLSVersion.TLSv1_3, None, 401)

    async def test_oldProtocolsRefused(self) -> None:
        client = self.client(self.pki.client, "good")

        def tls11() -> Any:
            context = client.context()
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("ALL:@SECLEVEL=0")
            return client.request(client.connect(context=context))

        with self.assertRaises(HANDSHAKE_REFUSED):
            await self.inThread(tls11)

    async def test_onlyIntermediateCipherSuites(self) -> None:
        client = self.client(self.pki.client, "good", maxVersion=ssl.TLSVersion.TLSv1_2)

        def withCiphers(ciphers: str) -> Any:
            return callWithContext(client, lambda context: context.set_ciphers(ciphers))

        for weak in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA", "AES128-GCM-SHA256"):
            with self.assertRaises(HANDSHAKE_REFUSED, msg=weak):
                await self.inThread(withCiphers, weak)
        response = await self.inThread(withCiphers, "ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertEqual(response.status, 200)

    async def test_onlyIntermediateGroups(self) -> None:
        client = self.client(self.pki.client, "good")

        def withCurve(curve: str) -> Any:
            return callWithContext(client, lambda context: context.set_ecdh_curve(curve))

        for refused in ("secp521r1",):
            with self.assertRaises(HANDSHAKE_REFUSED, msg=refused):
                await self.inThread(withCurve, refused)
        for accepted in ("prime256v1", "secp384r1"):
            response = await self.inThread(withCurve, accepted)
            self.assertEqual(response.status, 200, accepted)

    async def test_clientRenegotiationRefused(self) -> None:
        """A TLS 1.2 client asking to renegotiate gets "no renegotiation" (pyOpenSSL as the client)."""
        from OpenSSL import SSL

        def renegotiate() -> str:
            connection, raw = tls12Connection(self.port, self.certFile, self.keyFile)
            try:
                connection.do_handshake()
                connection.renegotiate()
                connection.do_handshake()
            except SSL.Error as error:
                return str(error)
            finally:
                raw.close()
            return "renegotiated"

        self.assertIn("no renegotiation", await self.inThread(renegotiate))

    async def test_serverSendsOnlyItsOwnChainAndNamesClientCAs(self) -> None:
        """The client CA must not leak into the server's chain; the CertificateRequest lists it."""

        def handshake() -> tuple[list[str], list[str]]:
            connection, raw = tls12Connection(self.port)
            try:
                connection.do_handshake()
                chain = connection.get_peer_cert_chain(as_cryptography=True) or []
                requested = connection.get_client_ca_list()
                return (
                    [c.subject.rfc4514_string() for c in chain],
                    [name.CN for name in requested],  # type: ignore[attr-defined]
                )
            finally:
                raw.close()

        chain, requested = await self.inThread(handshake)
        self.assertEqual(chain, ["CN=localhost"])
        self.assertEqual(requested, ["tokenissuer test CA"])

    async def test_noCompression(self) -> None:
        client = self.client(self.pki.client, "good")

        def compression() -> Any:
            connection = client.connect()
            try:
                return connection.sock.compression()  # type: ignore[union-attr]
            finally:
                connection.close()

        self.assertIsNone(await self.inThread(compression))


class RequiredClientAuthTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.port, _ = startIssuer(self, self.pki, **{"client-auth": "required"})

    async def test_handshakeWithoutCertificateFails(self) -> None:
        client = Client(self.port, self.pki.path("ca.pem"))
        with self.assertRaises(HANDSHAKE_REFUSED):
            await deferToThread(client.call)

    async def test_preflightWithoutCertificateFailsToo(self) -> None:
        client = Client(self.port, self.pki.path("ca.pem"))
        with self.assertRaises(HANDSHAKE_REFUSED):
            await deferToThread(
                client.call,
                method="OPTIONS",
                body=None,
                headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
            )

    async def test_certificateGetsToken(self) -> None:
        certFile, keyFile = self.pki.clientFiles(self.pki.client, "client")
        response = await deferToThread(Client(self.port, self.pki.path("ca.pem"), certFile, keyFile).call)
        self.assertEqual(response.status, 200)


class SessionKeyRotationTests(TestCase):
    """Session-ticket keys are renewed: old sessions stop resuming, new ones resume again."""

    timeout = 60

    async def test_rotationEndsResumptionOfOlderSessions(self) -> None:
        pki = TestPKI(self.mktemp())
        port, service = startIssuer(self, pki, **{"ticket-key-rotation": "0"})
        certFile, keyFile = pki.clientFiles(pki.client, "good")
        client = Client(port, pki.path("ca.pem"), certFile, keyFile)
        context = client.context()

        def sessionOf() -> Any:
            connection = client.connect(context=context)
            try:
                client.request(connection)
                return connection.sock.session  # type: ignore[union-attr]
            finally:
                connection.close()

        def resumes(session: Any) -> bool:
            connection = client.connect(session=session, context=context)
            try:
                self.assertEqual(client.request(connection).status, 200)
                return connection.sock.session_reused  # type: ignore[union-attr]
            finally:
                connection.close()

        before = await self.inThread(sessionOf)
        self.assertTrue(await self.inThread(resumes, before))
        service.rotateSessionKeys()
        self.assertFalse(await self.inThread(resumes, before))
        after = await self.inThread(sessionOf)
        self.assertTrue(await self.inThread(resumes, after))

    def inThread(self, function: Callable[..., Any], *args: Any) -> Any:
        return deferToThread(function, *args)
