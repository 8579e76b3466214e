"""
The HTTP layer without sockets: raw HTTP/1.1 bytes go into a real IssuerSite
channel over a StringTransport, with a fake clock and a fake "which client
certificate does this connection carry" function.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tokenissuer import devpki
from tokenissuer.cors import CorsPolicy
from tokenissuer.signer import HmacTokenSigner
from tokenissuer.tls import ClientIdentity
from tokenissuer.web import MAX_BODY_BYTES, IssuePolicy, IssuerSite, buildResourceTree

from .consumer import consumerVerify
from .support import LogCapture

KEY = b"k" * 40
ALLOWED_ORIGIN = "http://localhost:8000"

_CA = devpki.makeCA()
_CLIENT = devpki.issueClient(_CA, "Martin2")


class CountingSigner(HmacTokenSigner):
    """A real signer that remembers how many tokens it minted."""

    minted = 0

    def mint(self, subject: str, audience: str, flags: int = 0, certificateSHA256: bytes | None = None) -> Any:
        self.minted += 1
        return super().mint(subject, audience, flags, certificateSHA256)


class ParsedResponse:
    def __init__(self, status: int, headers: dict[str, list[str]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def parseResponses(data: bytes) -> list[ParsedResponse]:
    """Split raw HTTP/1.1 responses (with Content-Length) into parsed answers."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[0])
        responses.append(ParsedResponse(status, headers, rest[:length]))
        data = rest[length:]
    return responses


def rawRequest(
    method: str = "POST",
    path: str = "/jwthmac/issue",
    body: bytes | None = b'{"audience": "gschmarri"}',
    headers: dict[str, str] | None = None,
    contentType: str | None = "application/json",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if contentType is not None:
        lines.append(f"Content-Type: {contentType}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None and "Transfer-Encoding" not in (headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class IssueEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        # Real time plus a fraction, so PyJWT's own exp/iat checks apply and iat must be truncated.
        self.now = int(time.time())
        self.clock.advance(self.now + 0.75)
        self.signer = CountingSigner(KEY, "daheim_token_issuer", 3600, clock=self.clock.seconds)
        self.identity = ClientIdentity(_CLIENT.certificate)
        self.policy = IssuePolicy(
            signer=self.signer,
            cors=CorsPolicy.fromStrings([ALLOWED_ORIGIN]),
            audiences=frozenset({"gschmarri", "dummy"}),
        )
        self.logs = LogCapture(self)

    def exchange(
        self, *requests: bytes, identity: ClientIdentity | None = None
    ) -> tuple[list[ParsedResponse], StringTransport]:
        chosen = self.identity if identity is None else identity
        site = IssuerSite(buildResourceTree(self.policy, lambda transport: chosen), reactor=self.clock)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        for request in requests:
            protocol.dataReceived(request)
        responses = parseResponses(transport.value())
        protocol.connectionLost(None)  # type: ignore[arg-type]
        return responses, transport

    def one(self, request: bytes, identity: ClientIdentity | None = None) -> ParsedResponse:
        responses, _ = self.exchange(request, identity=identity)
        self.assertEqual(len(responses), 1)
        return responses[0]

    def assertError(self, response: ParsedResponse, status: int, code: str) -> None:
        self.assertEqual(response.status, status)
        self.assertEqual(response.header("content-type"), "application/json")
        document = response.json()
        self.assertEqual(document["error"], code)
        self.assertIsInstance(document["message"], str)
        self.assertTrue(document["message"])
        self.assertNotIn("Traceback", document["message"])

    def test_eachAnswerIsOneWrite(self) -> None:
        """
        Status line, headers and body of an answer reach the transport in one
        call (one TLS record), answers with a body and without, on one keep-alive connection.
        """
        writes: list[bytes] = []

        class CountingTransport(StringTransport):
            def write(self, data: bytes) -> None:
                writes.append(data)
                super().write(data)

            def writeSequence(self, iovec: list[bytes]) -> None:
                writes.append(b"".join(iovec))
                super().write(b"".join(iovec))

        site = IssuerSite(buildResourceTree(self.policy, lambda transport: self.identity), reactor=self.clock)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = CountingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        preflight = rawRequest(
            method="OPTIONS",
            body=None,
            headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        for request in (rawRequest(), preflight, rawRequest(path="/nowhere")):
            protocol.dataReceived(request)
        protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual([r.status for r in parseResponses(transport.value())], [200, 204, 404])
        self.assertEqual(len(writes), 3)
        self.assertEqual([len(parseResponses(w)) for w in writes], [1, 1, 1])

    def test_everyAnswerCarriesItsHeadersOnce(self) -> None:
        """Server, Cache-Control and nosniff on every answer, exactly once; never Twisted's own Server header."""
        preflight = rawRequest(
            method="OPTIONS", body=None, headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"}
        )
        responses, _ = self.exchange(rawRequest(), preflight, rawRequest(path="/nowhere"), rawRequest(method="GET"))
        self.assertEqual([r.status for r in responses], [200, 204, 404, 405])
        for response in responses:
            self.assertEqual(response.headers["server"], ["tokenissuer"])
            self.assertEqual(response.headers["cache-control"], ["no-store"])
            self.assertEqual(response.headers["x-content-type-options"], ["nosniff"])

    def test_tokenBodyIsWhatJsonDumpsMakes(self) -> None:
        response = self.one(rawRequest())
        document = response.json()
        self.assertEqual(response.body, json.dumps(document, separators=(",", ":")).encode())
        self.assertEqual(list(document), ["token", "expires_in"])

    # Success

    def test_issuesTokenForCertificateSubject(self) -> None:
        response = self.one(rawRequest())
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("cache-control"), "no-store")
        self.assertEqual(response.header("content-type"), "application/json")
        document = response.json()
        self.assertEqual(document["expires_in"], 3600)
        claims = jwt.decode(
            document["token"], KEY, algorithms=["HS256"], audience="gschmarri", issuer="daheim_token_issuer"
        )
        self.assertEqual(claims["sub"], "Martin2")
        self.assertEqual(claims["iat"], self.now)
        self.assertEqual(claims["exp"], self.now + 3600)
        self.assertEqual(
            consumerVerify(document["token"], KEY, "gschmarri", "daheim_token_issuer", now=self.now)["sub"],
            "Martin2",
        )

    def test_laterApiPathAcceptsMatchingAlgorithm(self) -> None:
        response = self.one(rawRequest(path="/jwt/issue", body=b'{"audience": "dummy", "algorithm": "HS256"}'))
        self.assertEqual(response.status, 200)
        self.assertEqual(jwt.get_unverified_header(response.json()["token"])["alg"], "HS256")

    def test_otherAlgorithmRefused(self) -> None:
        response = self.one(rawRequest(path="/jwt/issue", body=b'{"audience": "dummy", "algorithm": "ES256"}'))
        self.assertError(response, 400, "algorithm_mismatch")
        self.assertEqual(self.signer.minted, 0)

    def test_allowedOriginGetsCredentialedCorsHeaders(self) -> None:
        response = self.one(rawRequest(headers={"Origin": ALLOWED_ORIGIN}))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("access-control-allow-origin"), ALLOWED_ORIGIN)
        self.assertEqual(response.header("access-control-allow-credentials"), "true")
        self.assertEqual(response.header("vary"), "Origin")

    def test_charsetUtf8Accepted(self) -> None:
        response = self.one(rawRequest(contentType="application/json; charset=UTF-8"))
        self.assertEqual(response.status, 200)

    def test_keepAliveServesSeveralRequests(self) -> None:
        responses, transport = self.exchange(rawRequest(), rawRequest(body=b'{"audience": "dummy"}'))
        self.assertEqual([r.status for r in responses], [200, 200])
        self.assertFalse(transport.disconnecting)
        audiences = [jwt.decode(r.json()["token"], options={"verify_signature": False})["aud"] for r in responses]
        self.assertEqual(audiences, ["gschmarri", "dummy"])

    def test_issuedEventLoggedWithoutTokenOrKey(self) -> None:
        response = self.one(rawRequest(headers={"Origin": ALLOWED_ORIGIN}))
        token = response.json()["token"]
        [event] = self.logs.issued()
        self.assertEqual((event["sub"], event["aud"], event["origin"]), ("Martin2", "gschmarri", ALLOWED_ORIGIN))
        self.assertEqual(event["jti"], jwt.decode(token, options={"verify_signature": False})["jti"])
        text = self.logs.text()
        self.assertNotIn(token, text)
        self.assertNotIn(token.split(".")[2], text)
        self.assertNotIn(KEY.decode(), text)

    # Preflight

    def test_preflightFromAllowedOriginNeedsNoCertificate(self) -> None:
        response = self.one(
            rawRequest(
                method="OPTIONS",
                body=None,
                contentType=None,
                headers={
                    "Origin": ALLOWED_ORIGIN,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            ),
            identity=ClientIdentity(None),
        )
        self.assertEqual(response.status, 204)
        self.assertEqual(response.header("access-control-allow-origin"), ALLOWED_ORIGIN)
        self.assertEqual(response.header("access-control-allow-credentials"), "true")
        self.assertEqual(response.header("access-control-allow-methods"), "POST")
        allowedHeaders = [h.strip() for h in (response.header("access-control-allow-headers") or "").split(",")]
        self.assertIn("content-type", allowedHeaders)
        self.assertIn("accept", allowedHeaders)
        self.assertTrue(int(response.header("access-control-max-age") or "0") > 0)
        self.assertEqual(response.header("vary"), "Origin")
        self.assertEqual(self.signer.minted, 0)

    def test_preflightFromForeignOriginGetsNoGrant(self) -> None:
        response = self.one(
            rawRequest(
                method="OPTIONS",
                body=None,
                contentType=None,
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
            )
        )
        self.assertError(response, 403, "origin_not_allowed")
        self.assertIsNone(response.header("access-control-allow-origin"))
        self.assertIsNone(response.header("access-control-allow-methods"))

    def test_neverWildcard(self) -> None:
        for origin in (ALLOWED_ORIGIN, "https://evil.example", "null"):
            response = self.one(rawRequest(headers={"Origin": origin}))
            self.assertNotEqual(response.header("access-control-allow-origin"), "*")

    def test_plainOptionsListsMethods(self) -> None:
        response = self.one(rawRequest(method="OPTIONS", body=None, contentType=None))
        self.assertEqual(response.status, 204)
        self.assertEqual(response.header("allow"), "OPTIONS, POST")
        self.assertIsNone(response.header("access-control-allow-origin"))

    # 401 / 403

    def test_noCertificateIs401WithReadableCorsAnswer(self) -> None:
        response = self.one(rawRequest(headers={"Origin": ALLOWED_ORIGIN}), identity=ClientIdentity(None))
        self.assertError(response, 401, "client_certificate_required")
        self.assertIn("credentials: 'include'", response.json()["message"])
        self.assertEqual(response.header("access-control-allow-origin"), ALLOWED_ORIGIN)
        self.assertEqual(response.header("access-control-allow-credentials"), "true")
        self.assertEqual(self.signer.minted, 0)

    def test_noCertificateWithoutOrigin(self) -> None:
        response = self.one(rawRequest(), identity=ClientIdentity(None))
        self.assertError(response, 401, "client_certificate_required")
        self.assertIsNone(response.header("access-control-allow-origin"))

    def test_foreignOriginRefusedAndNothingMinted(self) -> None:
        response = self.one(rawRequest(headers={"Origin": "https://evil.example"}))
        self.assertError(response, 403, "origin_not_allowed")
        self.assertIsNone(response.header("access-control-allow-origin"))
        self.assertNotIn("token", response.json())
        self.assertEqual(self.signer.minted, 0)
        self.assertEqual(self.logs.issued(), [])

    def test_audienceNotAllowed(self) -> None:
        response = self.one(rawRequest(body=b'{"audience": "other"}'))
        self.assertError(response, 403, "audience_not_allowed")
        self.assertEqual(self.signer.minted, 0)

    def test_anyAudienceWhenNoAllowList(self) -> None:
        self.policy = IssuePolicy(signer=self.signer, cors=self.policy.cors, audiences=None)
        response = self.one(rawRequest(body=b'{"audience": "anything"}'))
        self.assertEqual(response.status, 200)

    def test_certificateWithoutCommonName(self) -> None:
        nameless = devpki.issue(_CA, "", usages=[])
        response = self.one(rawRequest(), identity=ClientIdentity(nameless.certificate))
        self.assertError(response, 403, "subject_missing")

    # 400

    def test_badBodies(self) -> None:
        cases = [
            (b"{not json", "malformed_json"),
            (b"", "malformed_json"),
            (b'{"audience": NaN}', "malformed_json"),
            (b'{"audience": "a", "audience": "gschmarri"}', "malformed_json"),
            (b"[" * 2000 + b"]" * 2000, "malformed_json"),
            (b'["gschmarri"]', "body_not_object"),
            (b'"gschmarri"', "body_not_object"),
            (b"{}", "audience_missing"),
            (b'{"aud": "gschmarri"}', "audience_missing"),
            (b'{"audience": 5}', "audience_not_string"),
            (b'{"audience": null}', "audience_not_string"),
            (b'{"audience": ["gschmarri"]}', "audience_not_string"),
            (b'{"audience": ""}', "audience_empty"),
            (b'{"audience": "a\\u0000b"}', "audience_invalid"),
            (b'{"audience": "' + b"a" * 300 + b'"}', "audience_invalid"),
            (b'{"audience": "\xff"}', "body_not_utf8"),
        ]
        for body, code in cases:
            with self.subTest(body=body[:40]):
                self.assertError(self.one(rawRequest(body=body)), 400, code)
        self.assertEqual(self.signer.minted, 0)

    # 404 / 405 / 413 / 415

    def test_unknownPathReadableByAllowedOrigin(self) -> None:
        response = self.one(rawRequest(path="/jwt/issuer", headers={"Origin": ALLOWED_ORIGIN}))
        self.assertError(response, 404, "not_found")
        self.assertEqual(response.header("access-control-allow-origin"), ALLOWED_ORIGIN)
        foreign = self.one(rawRequest(path="/jwt/issuer", headers={"Origin": "https://evil.example"}))
        self.assertIsNone(foreign.header("access-control-allow-origin"))

    def test_unknownPaths(self) -> None:
        for path in ("/", "/jwthmac", "/jwthmac/issue/extra", "/jwt/issue/", "/issue", "/jwthmac/other"):
            with self.subTest(path=path):
                self.assertError(self.one(rawRequest(path=path)), 404, "not_found")

    def test_otherMethods(self) -> None:
        for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD"):
            with self.subTest(method=method):
                responses, _ = self.exchange(rawRequest(method=method, body=None, contentType=None))
                self.assertEqual(responses[0].status, 405)
                self.assertEqual(responses[0].header("allow"), "OPTIONS, POST")

    def test_declaredOversizedBodyAnsweredAtOnceAndClosed(self) -> None:
        head = rawRequest(body=None).replace(b"\r\n\r\n", f"\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n".encode())
        responses, transport = self.exchange(head + b"x" * 1000)
        self.assertEqual(len(responses), 1)
        self.assertError(responses[0], 413, "body_too_large")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.signer.minted, 0)

    def test_chunkedOversizedBodyRefused(self) -> None:
        chunk = b"x" * 1000
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY_BYTES // 1000 + 2)) + b"0\r\n\r\n"
        response = self.one(rawRequest(body=None, headers={"Transfer-Encoding": "chunked"}) + body)
        self.assertError(response, 413, "body_too_large")

    def test_bodyAtTheLimitAccepted(self) -> None:
        body = b'{"audience": "gschmarri", "pad": "' + b"p" * (MAX_BODY_BYTES - 36) + b'"}'
        self.assertEqual(len(body), MAX_BODY_BYTES)
        self.assertEqual(self.one(rawRequest(body=body)).status, 200)

    def test_wrongContentTypes(self) -> None:
        for contentType in (
            None,
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/json; charset=latin-1",
        ):
            with self.subTest(contentType=contentType):
                self.assertError(self.one(rawRequest(contentType=contentType)), 415, "unsupported_media_type")

    # 500

    def test_internalErrorIsJsonWithoutTraceback(self) -> None:
        def broken(subject: str, audience: str, flags: int = 0, certificateSHA256: bytes | None = None) -> Any:
            raise RuntimeError("secret-internal-detail")

        self.signer.mint = broken  # type: ignore[method-assign]
        response = self.one(rawRequest(headers={"Origin": ALLOWED_ORIGIN}))
        self.assertError(response, 500, "internal_error")
        self.assertEqual(response.header("access-control-allow-origin"), ALLOWED_ORIGIN)
        self.assertNotIn(b"secret-internal-detail", response.body)
        self.flushLoggedErrors(RuntimeError)
